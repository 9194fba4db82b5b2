"""The demo recipe's bare training step against batch size: what one rank's step costs without
the distributed trainer around it.

    python -m benchmarks.demo_step_vs_batch [--batches 32 64 128] [--steps 15] [--threads 1]

The `emf` spec's model (16 px, patch 4, width 128, 4 blocks, data prediction, MiniLM-sized text),
AdamW, random inputs of the shards' shapes; flow matching, and the spec's MeanFlow fine-tune (EMF's
freezing, `objective.velocity: teacher`, `split_share: 0.5`, 70% r != t, the middle of its schedule)
as the fused step (`objective.jvp: auto`) and as the two-pass step (`explicit`), and the distill
step's rounds (`emf_dist/split_distill.py`, every parameter trainable) with 4 and 8 teacher steps,
and with 4 plus the adversarial critic (`distill.adversarial`, emf_dist/critic.py), side by side. One thread by default, as in a 1-CPU Ray Train worker. Compare with the steps/s the demo's progress
lines report (docs/benchmarks.md, "The main job").
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from benchmarks.measure import random_batch_step, time_and_peak
from emf_dist.convert import freeze_for_emf_finetune, meanflow_from_flow_matching
from emf_dist.critic import SceneCritic
from emf_dist.meanflow import MeanFlowConfig, MeanFlowLoss
from emf_dist.model import ModelConfig, VelocityNet
from emf_dist.split_distill import SplitDistillConfig, SplitDistillLoss
from emf_dist.time_sampling import TimeSamplerConfig

MODEL = ModelConfig(input_size=16, patch_size=4, width=128, depth=4, heads=4, text_dim=384, time_embedding="single",
                    prediction="data", checkpointing=False)
TEXT_TOKENS = 16


def step_ms(model: VelocityNet, objective: MeanFlowLoss, batch: int, steps: int) -> float:
    """Median milliseconds of one AdamW step on a fixed random batch, after 3 warm-up steps."""
    timed = time_and_peak(lambda: random_batch_step(model, objective, batch, TEXT_TOKENS), steps, warmup=3)
    return timed["seconds"] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    parent = VelocityNet(MODEL)
    student = meanflow_from_flow_matching(MODEL, parent.state_dict())
    freeze_for_emf_finetune(student)
    flow_matching = MeanFlowLoss(MeanFlowConfig(mode="flow_matching", adaptive_p=0.0))
    teacher = VelocityNet(MODEL).eval().requires_grad_(False)
    finetune = MeanFlowConfig(adaptive_p=0.5, velocity="teacher", split_share=0.5, time=TimeSamplerConfig(r_neq_t=0.7))
    fused, two_pass = (MeanFlowLoss(replace(finetune, jvp=jvp), teacher=teacher) for jvp in ("auto", "explicit"))
    distilled = meanflow_from_flow_matching(MODEL, parent.state_dict())
    frozen = meanflow_from_flow_matching(MODEL, parent.state_dict()).eval().requires_grad_(False)
    distill = {k: SplitDistillLoss(SplitDistillConfig(teacher_steps=k), frozen) for k in (4, 8)}
    critic = SceneCritic(MODEL.in_channels, MODEL.input_size, MODEL.text_dim)
    adversarial = SplitDistillLoss(SplitDistillConfig(teacher_steps=4, adversarial=0.05), frozen, critic)
    print(f"bare step, {args.threads} thread(s), median of {args.steps} steps:")
    for batch in args.batches:
        print(f"  batch {batch:4d}: flow matching {step_ms(parent, flow_matching, batch, args.steps):7.1f} ms   "
              f"MeanFlow fine-tune, fused {step_ms(student, fused, batch, args.steps):7.1f} ms   "
              f"two-pass {step_ms(student, two_pass, batch, args.steps):7.1f} ms   distill, teacher 4 / 8 steps "
              f"{step_ms(distilled, distill[4], batch, args.steps):7.1f} / "
              f"{step_ms(distilled, distill[8], batch, args.steps):7.1f} ms   with the critic, teacher 4 steps "
              f"{step_ms(distilled, adversarial, batch, args.steps):7.1f} ms", flush=True)


if __name__ == "__main__":
    main()
