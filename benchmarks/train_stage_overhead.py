"""A training stage's fixed cost: `train()` of a few steps, several times on one Ray instance.

    python -m benchmarks.train_stage_overhead [--fits 2] [--preload MODULES] [--env NAME=VALUE ...] [--wait 20]
                                                 [--start-coordinator]

Preps 64 scenes into a temporary folder, starts a local Ray instance (2 CPUs, as the demo's head)
with ``RAY_preload_python_modules=MODULES`` when given (Ray's idle workers then import them before
a worker group asks for them), waits ``--wait`` seconds (what the demo's first steps give idle
workers), then times each fit of 4 steps on 2 workers, with ``--env`` variables set in the driver
(Ray Train hands its own on to its controller). Run it once with and once without an option, one
after the other; the first fit also pays for Ray Train's first actors. ``--start-coordinator`` starts
Ray Data's autoscaling coordinator right after ``ray.init``, as `emf demo` does
(emf_dist.ray_env.start_autoscaling_coordinator), instead of leaving it to the first fit.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from emf_dist.config import from_dict
from emf_dist.train.config import TrainConfig


def tiny_fit(data: str, storage: str, name: str) -> TrainConfig:
    return from_dict(TrainConfig, {
        "name": name, "storage_path": storage, "steps": 4, "micro_batch": 4, "checkpoint_every": 2,
        "encoder": {"max_length": 8}, "data": {"url": data, "loader_workers": 0},
        "model": {"width": 32, "depth": 2, "heads": 2}, "logging": {"every": 2, "wandb": "disabled"}}, validate=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fits", type=int, default=2)
    parser.add_argument("--preload", default="", help="comma-separated modules, e.g. torch,deepspeed")
    parser.add_argument("--env", nargs="*", default=[], help="NAME=VALUE, e.g. RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0")
    parser.add_argument("--wait", type=float, default=20.0)
    parser.add_argument("--start-coordinator", action="store_true")
    args = parser.parse_args()
    os.environ.update(item.split("=", 1) for item in args.env)
    if args.preload:
        os.environ["RAY_preload_python_modules"] = args.preload  # read by the raylet ray.init starts
    import ray

    from data_prep.config import PrepConfig
    from data_prep.job import run_prep
    from emf_dist.ray_env import start_autoscaling_coordinator
    from emf_dist.train.driver import train
    folder = tempfile.mkdtemp(prefix="emf-stage-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    if args.start_coordinator and not start_autoscaling_coordinator():
        raise SystemExit("this Ray has no autoscaling coordinator to start")
    run_prep(from_dict(PrepConfig, {"out": f"{folder}/shards", "samples_per_shard": 32, "source": {"count": 64},
                                    "encoder": {"max_length": 8}, "progress": False}, validate=True),
             echo=lambda _: None)
    time.sleep(args.wait)
    for fit in range(args.fits):
        start = time.perf_counter()
        train(tiny_fit(f"{folder}/shards", f"{folder}/runs", f"fit{fit}"))
        print(f"preload={args.preload or '-'}  env={' '.join(args.env) or '-'}  "
              f"coordinator={'started' if args.start_coordinator else 'on first use'}  fit {fit}: "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
