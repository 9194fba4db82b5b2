"""The distributed trainer against the bare core step, and ZeRO stages side by side.

    python -m benchmarks.train_throughput --data DATASET_DIR [--steps 30]

DATASET_DIR is a folder written by `emf prep` with `encoder.max_length=16` (e.g. the demo's
`steps/prep` folder); the model (4 blocks, width 128, patch 4) takes the shards' resolution. Measured in one run, on one local Ray instance:

- bare core step: MeanFlowLoss + AdamW in this process on batches already in memory;
- the full system (Ray Train + DeepSpeed + WebDataset streaming) with 1 worker, same micro-batch,
  so (system step time / bare step time - 1) is the overhead of everything around the core;
- 2 workers (scaling efficiency = samples/s with 2 / (2 x samples/s with 1));
- ZeRO stages 0-3 with 2 workers: samples/s and per-worker peak RSS.

The system's figures come from the last logging window of each run (the first steps, with
worker start-up and warm-up, are excluded).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from emf_dist.config import from_dict
from emf_dist.manifest import read_manifest
from emf_dist.meanflow import MeanFlowLoss
from emf_dist.model import VelocityNet
from emf_dist.train import train
from emf_dist.train_config import TrainConfig


def run_config(data: str, storage: str, name: str, steps: int, workers: int, stage: int) -> TrainConfig:
    return from_dict(TrainConfig, {
        "name": name, "storage_path": storage, "steps": steps, "micro_batch": 16, "checkpoint_every": steps,
        "encoder": {"max_length": 16}, "data": {"url": data, "loader_workers": 1},
        "model": {"width": 128, "depth": 4, "heads": 4, "input_size": read_manifest(data).image.resolution},
        "scaling": {"num_workers": workers},
        "logging": {"every": steps // 3, "wandb": "disabled"}, "zero": {"stage": stage}}, validate=True)


def bare_step_seconds(cfg: TrainConfig, repeats: int) -> float:
    """The core step alone: same model, objective and micro-batch, data already in memory, and the
    same compute as one Ray worker with 1 CPU (which runs torch with OMP_NUM_THREADS=1)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = VelocityNet(cfg.model)
    objective = MeanFlowLoss(cfg.objective)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    b, m = cfg.micro_batch, cfg.model
    x = torch.randn(b, m.in_channels, m.input_size, m.input_size)
    tokens, mask, pooled = torch.randn(b, 16, m.text_dim), torch.ones(b, 16, dtype=torch.bool), torch.randn(b, m.text_dim)
    generator = torch.Generator().manual_seed(0)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        loss, _ = objective(model, x, tokens, mask, pooled, progress=i / (repeats + 2), generator=generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[len(times[2:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    import ray
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="emf-bench-")
    runs = {}
    for workers, stage in [(1, 0), (2, 0), (2, 1), (2, 2), (2, 3)]:
        cfg = run_config(args.data, storage, f"w{workers}-z{stage}", args.steps, workers, stage)
        runs[(workers, stage)] = train(cfg).metrics
    bare = bare_step_seconds(run_config(args.data, storage, "bare", args.steps, 1, 0), repeats=args.steps // 3)
    one = runs[(1, 0)]
    system_step = 16 / one["samples_per_s"]
    print(f"bare core step {bare:.3f} s; system step (1 worker, ZeRO-0) {system_step:.3f} s; "
          f"overhead {system_step / bare - 1:+.1%}")
    two = runs[(2, 0)]
    print(f"samples/s: 1 worker {one['samples_per_s']:.1f}, 2 workers {two['samples_per_s']:.1f}; "
          f"scaling efficiency {two['samples_per_s'] / (2 * one['samples_per_s']):.2f}")
    print("| ZeRO stage | workers | samples/s | ratio to stage 0 | per-worker peak RSS MiB |")
    print("|---|---|---|---|---|")
    for stage in range(4):
        m = runs[(2, stage)]
        print(f"| {stage} | 2 | {m['samples_per_s']:.1f} | {m['samples_per_s'] / two['samples_per_s']:.2f} | "
              f"{m['memory_mib']:.0f} |")


if __name__ == "__main__":
    main()
