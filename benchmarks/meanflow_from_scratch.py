"""MeanFlow trained from scratch in one process (`mode: meanflow`), for objectives meant for that setting.

    python -m benchmarks.meanflow_from_scratch --demo DEMO_DIR --name NAME [--steps 3000] [--r-neq-t 0.5]
        [--adaptive-p 1.0] [--alpha START END] [--seed 0] [--images-per-prompt 16]

DEMO_DIR is a finished `emf demo --out DEMO_DIR`: its shards and its parent's architecture are reused,
with EMF's dual time embedding, from a random initialisation. The objective is MeanFlow's own recipe
(logit-normal(-0.4, 1) times, v = e - x, the adaptive weight's p = 1) with the given share of r != t
rows, and with --alpha AlphaFlow's curriculum of those rows (objective.alpha, 1 0 in AlphaFlow's
paper), at the flow-matching parent's learning rate and batch (1e-3, 64, EMA). Writes the export to
DEMO_DIR/variants/NAME and prints MeanFlow's overall accuracy at 1 / 2 / 4 steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from benchmarks.meanflow_finetune_variants import load_demo, score
from emf_dist.alpha_flow import AlphaCurriculum
from emf_dist.export import SamplingInfo, export_model
from emf_dist.meanflow import MeanFlowConfig, MeanFlowLoss
from emf_dist.model import VelocityNet
from emf_dist.time_sampling import TimeSamplerConfig
from emf_dist.train.config import OptimConfig, ScalingOptions, TrainConfig
from emf_dist.train.local import train_local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--r-neq-t", type=float, default=0.5, help="share of rows with r != t")
    parser.add_argument("--adaptive-p", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, nargs=2, default=(0.0, 0.0), metavar=("START", "END"),
                        help="AlphaFlow's curriculum over the whole run (objective.alpha)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation, data order and noise")
    parser.add_argument("--images-per-prompt", type=int, default=16)
    args = parser.parse_args()
    data, info = load_demo(args.demo)
    cfg = dataclasses.replace(info.model, time_embedding="dual")
    torch.manual_seed(args.seed)
    model = VelocityNet(cfg)
    objective_cfg = MeanFlowConfig(adaptive_p=args.adaptive_p, time=TimeSamplerConfig(r_neq_t=args.r_neq_t),
                                   alpha=AlphaCurriculum(start=args.alpha[0], end=args.alpha[1]))
    if problems := objective_cfg.validate():
        parser.error("; ".join(problems))
    run = TrainConfig(steps=args.steps, micro_batch=64, seed=args.seed, scaling=ScalingOptions(num_workers=1),
                      optim=OptimConfig(lr=1e-3, warmup_steps=50))
    result = train_local(model, MeanFlowLoss(objective_cfg), data, run, log_every=250)
    result["ema"].copy_to(model)
    out = os.path.join(args.demo, "variants", args.name)
    export = export_model(model, dataclasses.replace(info, model=cfg, sampling=SamplingInfo(mean_flow=True)),
                          os.path.join(out, "export"))
    score({"meanflow": export}, os.path.join(out, "report"), args.images_per_prompt, meanflow_steps=[1, 2, 4])


if __name__ == "__main__":
    main()
