"""Rounds of one-step distillation (emf_dist/split_distill.py) from one MeanFlow export, each scored.

    python -m benchmarks.split_distill_rounds --demo DEMO_DIR --start MF_EXPORT --name NAME
        [--rounds 3] [--steps 300] [--teacher-steps 4] [--guidance 1.0] [--lr 5e-4] [--decay constant] [--adaptive-p 0.5]
        [--images-per-prompt 16] [--batch 64] [--ranks 1] [--seed 0] [--adversarial LAMBDA] [--critic-width 16]

Round i starts from round i-1's EMA weights, which are also its frozen teacher (round 1: the
export given). Each round is the spec's distill step in one process (global batch 64 unless --batch, fresh AdamW and
EMA, the demo's shards decoded into memory; seed i, as the spec's distill_i), so rounds, round
length and the teacher's step count can be compared without the distributed trainer. With
--adversarial the critic (emf_dist/critic.py) is built once and trained through every round. Prints
MeanFlow's overall accuracy at 1 / 2 / 4 steps after every round and writes each round's model
and report under DEMO_DIR/variants/NAME_rI.
"""
from __future__ import annotations

import argparse
import copy
import os

import torch

from benchmarks.meanflow_finetune_variants import load_shards, score
from emf_dist.export import export_model, load_model
from emf_dist.split_distill import SplitDistillConfig, SplitDistillLoss
from emf_dist.train.config import OptimConfig, ScalingOptions, TrainConfig
from emf_dist.train.local import train_local
from emf_dist.train.setup import build_critic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True)
    parser.add_argument("--start", required=True, help="the MeanFlow export to distil (e.g. the demo's finetune export)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per round")
    parser.add_argument("--teacher-steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=1.0, help="the first round's teacher CFG scale over its k steps")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--decay", choices=("constant", "cosine", "linear"), default="constant",
                        help="each round's learning rate after its warm-up (optim.decay)")
    parser.add_argument("--adaptive-p", type=float, default=0.5, help="the loss weight 1/(err^2 + c)^p (0: plain MSE)")
    parser.add_argument("--images-per-prompt", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64, help="the global batch (the spec's: 2 workers x 32)")
    parser.add_argument("--ranks", type=int, default=1, help="simulated ranks, each drawing batch / ranks rows")
    parser.add_argument("--seed", type=int, default=0, help="round i is seeded seed + i")
    parser.add_argument("--adversarial", type=float, default=0.0, help="the critic's weight lambda (distill.adversarial)")
    parser.add_argument("--critic-width", type=int, default=16)
    args = parser.parse_args()
    if args.batch % args.ranks:
        parser.error(f"--batch {args.batch} does not split into --ranks {args.ranks} equal micro-batches")
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores `taskset` leaves this process

    data = load_shards(os.path.join(args.demo, "steps", "prep"))
    model, info = load_model(args.start)
    objective_cfg = SplitDistillConfig(teacher_steps=args.teacher_steps, guidance=args.guidance,
                                       adaptive_p=args.adaptive_p, adversarial=args.adversarial,
                                       critic_width=args.critic_width)
    critic = None
    for round_number in range(1, args.rounds + 1):
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        model.requires_grad_(True)
        run = TrainConfig(steps=args.steps, micro_batch=args.batch // args.ranks, seed=args.seed + round_number,
                          scaling=ScalingOptions(num_workers=args.ranks),
                          optim=OptimConfig(lr=args.lr, warmup_steps=50, decay=args.decay),
                          mode="meanflow_distill", distill=objective_cfg)
        if critic is None:
            critic = build_critic(run, model)
        objective = SplitDistillLoss(objective_cfg.round(round_number - 1), teacher, critic)
        result = train_local(model, objective, data, run, log_every=100)
        result["ema"].copy_to(model)
        out = os.path.join(args.demo, "variants", f"{args.name}_r{round_number}")
        export = export_model(model, info, os.path.join(out, "export"))
        print(f"round {round_number}/{args.rounds}:", flush=True)
        score({"meanflow": export}, os.path.join(out, "report"), args.images_per_prompt, meanflow_steps=[1, 2, 4])


if __name__ == "__main__":
    main()
