"""MeanFlow step vs flow-matching step: time and peak memory, same model, same batch.

    python -m benchmarks.meanflow_step            # the full table (docs/benchmarks.md)
    python -m benchmarks.meanflow_step --quick    # one size, fewer repeats

Every configuration runs in its own process (benchmarks/measure.py) and the rounds are
interleaved (FM, MF, FM, MF, ...), so slow drift on a shared machine hits both alike; each
ratio uses the minimum over rounds of the per-round medians.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks.measure import random_batch_step, run_isolated, time_and_peak
from emf_dist.meanflow import MeanFlowConfig, MeanFlowLoss
from emf_dist.model import ModelConfig, VelocityNet, parameter_count
from emf_dist.time_sampling import TimeSamplerConfig

SIZES = {  # 32 x 32 RGB input, patch 2: 256 image tokens; 16 text tokens
    "tiny": dict(width=96, depth=4, heads=4, batch=16),
    "small": dict(width=192, depth=6, heads=6, batch=16),
}


def build_step(spec: dict):
    torch.manual_seed(0)
    size = SIZES[spec["size"]]
    cfg = ModelConfig(input_size=32, patch_size=2, width=size["width"], depth=size["depth"], heads=size["heads"],
                      text_dim=384, time_embedding="dual", checkpointing=spec["checkpointing"])
    model = VelocityNet(cfg)
    mode = "flow_matching" if spec["r_neq_t"] == 0 else "meanflow"
    objective = MeanFlowLoss(MeanFlowConfig(mode=mode, time=TimeSamplerConfig(r_neq_t=spec["r_neq_t"])))
    step = random_batch_step(model, objective, size["batch"], generator=torch.Generator().manual_seed(0))
    return step, parameter_count(model)


def measure(spec: dict) -> dict:
    torch.set_num_threads(spec.get("threads", 2))
    holder = {}

    def setup():
        step, holder["params"] = build_step(spec)
        return step

    result = time_and_peak(setup, repeats=spec["repeats"], warmup=2)
    return {**result, "params": holder["params"]}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = ["tiny"] if args.quick else list(SIZES)
    repeats = 3 if args.quick else 5
    variants = [("flow matching", 0.0), ("MeanFlow, 25% r!=t", 0.25), ("MeanFlow, 75% r!=t", 0.75),
                ("MeanFlow, 100% r!=t", 1.0)]
    print("| model | checkpointing | step | seconds | ratio to FM | peak MiB | ratio to FM |")
    print("|---|---|---|---|---|---|---|")
    for size in sizes:
        for checkpointing in (False, True):
            best: dict[str, dict] = {}
            for _ in range(args.rounds):
                for name, r_neq_t in variants:
                    spec = dict(size=size, checkpointing=checkpointing, r_neq_t=r_neq_t, repeats=repeats)
                    result = run_isolated("benchmarks.meanflow_step", spec)
                    if name not in best or result["seconds"] < best[name]["seconds"]:
                        best[name] = result
            fm = best["flow matching"]
            label = f"{size} ({fm['params'] / 1e6:.1f} M, batch {SIZES[size]['batch']})"
            for name, _ in variants:
                r = best[name]
                print(f"| {label} | {'on' if checkpointing else 'off'} | {name} | {r['seconds']:.3f} | "
                      f"{r['seconds'] / fm['seconds']:.2f} | {r['peak_mib']:.0f} | {r['peak_mib'] / fm['peak_mib']:.2f} |",
                      flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        print(json.dumps(measure(json.loads(sys.argv[1]))))
    else:
        main(sys.argv[1:])
