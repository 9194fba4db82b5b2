"""MeanFlow step vs flow-matching step: time and peak memory, same model, same batch.

    python -m benchmarks.meanflow_step            # the full table (docs/benchmarks.md)
    python -m benchmarks.meanflow_step --quick    # one size, one round, fewer repeats

The MeanFlow steps run the JVP three ways, side by side: the fused step (``objective.jvp: fused``,
what ``auto`` picks for our DiT: the hand-written tangent of emf_dist/model_jvp.py inside the
gradient pass), the two-pass step with that pass on its own (``explicit``) and with PyTorch's
forward-mode AD (``forward_ad``). The "demo" size is the demo's fine-tune: its model and per-worker
micro-batch. Every configuration runs in its own processes (benchmarks/measure.py: one times it, one reads its peak
memory) and the rounds are interleaved, so slow drift on a shared machine hits all alike; each figure
is the fastest round's median.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks.measure import best_over_rounds, print_ratio_table, random_batch_step, time_and_peak
from emf_dist.meanflow import MeanFlowConfig, MeanFlowLoss
from emf_dist.model import ModelConfig, VelocityNet, parameter_count
from emf_dist.time_sampling import TimeSamplerConfig

SIZES = {  # tiny, small: 32 x 32 RGB input, patch 2: 256 image tokens. demo: 16 x 16, patch 4: 16 tokens
    "tiny": dict(width=96, depth=4, heads=4, batch=16),
    "small": dict(width=192, depth=6, heads=6, batch=16),
    "demo": dict(width=128, depth=4, heads=4, batch=32, input_size=16, patch_size=4, prediction="data"),
}
VARIANTS = [("flow matching", 0.0, "auto"), ("MeanFlow, 25% r!=t", 0.25, "fused"),
            ("MeanFlow, 75% r!=t", 0.75, "fused"), ("MeanFlow, 100% r!=t", 1.0, "fused"),
            ("MeanFlow, 75% r!=t, two-pass", 0.75, "explicit"), ("MeanFlow, 100% r!=t, two-pass", 1.0, "explicit"),
            ("MeanFlow, 75% r!=t, two-pass forward AD", 0.75, "forward_ad")]


def build_step(spec: dict):
    torch.manual_seed(0)
    size = dict(SIZES[spec["size"]])
    batch = size.pop("batch")
    cfg = ModelConfig(**{"input_size": 32, "patch_size": 2, **size}, text_dim=384, time_embedding="dual",
                      checkpointing=spec["checkpointing"])
    model = VelocityNet(cfg)
    mode = "flow_matching" if spec["r_neq_t"] == 0 else "meanflow"
    objective = MeanFlowLoss(MeanFlowConfig(mode=mode, time=TimeSamplerConfig(r_neq_t=spec["r_neq_t"]),
                                            jvp=spec["jvp"]))
    step = random_batch_step(model, objective, batch, generator=torch.Generator().manual_seed(0))
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
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per process; the figure is their median")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every measured process")
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated, of: " + ", ".join(SIZES))
    args = parser.parse_args(argv)
    sizes = ["tiny"] if args.quick else args.sizes.split(",")
    rounds, repeats = (1, 3) if args.quick else (args.rounds, args.repeats)
    configs = [(size, checkpointing, name, r_neq_t, jvp) for size in sizes for checkpointing in (False, True)
               for name, r_neq_t, jvp in VARIANTS]
    specs = [dict(size=size, checkpointing=checkpointing, r_neq_t=r_neq_t, jvp=jvp, repeats=repeats,
                  threads=args.threads)
             for size, checkpointing, _, r_neq_t, jvp in configs]
    results = dict(zip([c[:3] for c in configs], best_over_rounds("benchmarks.meanflow_step", specs, rounds)))
    print_ratio_table(results, lambda size, r: f"{size} ({r['params'] / 1e6:.1f} M, batch {SIZES[size]['batch']})")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        print(json.dumps(measure(json.loads(sys.argv[1]))))
    else:
        main(sys.argv[1:])
