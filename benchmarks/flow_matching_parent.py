"""The demo's flow-matching parent trained in one process, for comparing parent variants.

    python -m benchmarks.flow_matching_parent --demo DEMO_DIR --name NAME [--prediction data|velocity]
        [--steps 1500] [--depth 4] [--width 128] [--heads 4] [--mlp-ratio 4] [--time-scale S] [--seed 0]
        [--images-per-prompt 16]

DEMO_DIR is a finished `emf demo --out DEMO_DIR`: its shards and its parent's architecture are
reused (--depth, --width, --heads, --mlp-ratio, --time-scale, --prediction change it). The recipe
is the `emf` spec's pretraining (logit-normal(0, 1) times, plain squared error, lr 1e-3, batch 64,
EMA) in emf_dist.train.local with the shards in memory. Writes
the export to DEMO_DIR/parents/NAME and prints flow matching's overall accuracy at 1 / 4 / 32 Euler
steps; `python -m benchmarks.meanflow_finetune_variants --parent DEMO_DIR/parents/NAME` fine-tunes it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from benchmarks.meanflow_finetune_variants import load_demo, score
from emf_dist.export import export_model
from emf_dist.meanflow import MeanFlowConfig, MeanFlowLoss
from emf_dist.model import VelocityNet
from emf_dist.time_sampling import TimeSamplerConfig
from emf_dist.train.config import OptimConfig, ScalingOptions, TrainConfig
from emf_dist.train.local import train_local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--prediction", choices=("data", "velocity"), default="data")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mlp-ratio", type=float, default=4.0)
    parser.add_argument("--time-scale", type=float, help="default: the demo parent's")
    parser.add_argument("--seed", type=int, default=0, help="initialisation, data order and noise")
    parser.add_argument("--images-per-prompt", type=int, default=16)
    args = parser.parse_args()
    data, info = load_demo(args.demo)
    # The demo parent's own architecture, with the variant's changes.
    cfg = dataclasses.replace(info.model, width=args.width, depth=args.depth, heads=args.heads,
                              mlp_ratio=args.mlp_ratio, prediction=args.prediction,
                              time_scale=args.time_scale or info.model.time_scale)
    torch.manual_seed(args.seed)
    model = VelocityNet(cfg)
    objective = MeanFlowLoss(MeanFlowConfig(mode="flow_matching", adaptive_p=0.0,
                                            time=TimeSamplerConfig(mu=0.0, sigma=1.0)))
    run = TrainConfig(steps=args.steps, micro_batch=64, seed=args.seed, scaling=ScalingOptions(num_workers=1),
                      optim=OptimConfig(lr=1e-3, warmup_steps=50))
    result = train_local(model, objective, data, run, log_every=250)
    result["ema"].copy_to(model)
    export = export_model(model, dataclasses.replace(info, model=cfg), os.path.join(args.demo, "parents", args.name))
    score({"flow_matching": export}, export + "-report", args.images_per_prompt,
          flow_matching_steps=[1, 4, 32])


if __name__ == "__main__":
    main()
