"""MeanFlow fine-tuning variants from one flow-matching parent, scored by the scene benchmark.

    python -m benchmarks.meanflow_finetune_variants --demo DEMO_DIR --name NAME [--steps 800]
        [--velocity data|teacher] [--guidance-w 1.0] [--adaptive-p 0.5] [--lr 5e-4]
        [--full-interval 0.0] [--r-neq-t 0.5 0.9] [--decay constant|cosine|linear] [--train-all]
        [--ema-decay 0.999] [--split-share 0.0] [--split-steps 2] [--identity eulerian|lagrangian]
        [--tangent velocity|model] [--alpha START END --alpha-window FROM TO]
        [--time-embedding dual|decoupled --decoder-depth N] [--seed 0] [--images-per-prompt 16] [--parent FM_EXPORT]

DEMO_DIR is a finished `emf demo --out DEMO_DIR`: its shards and its exported flow-matching
parent (or the one --parent names, e.g. from benchmarks.flow_matching_parent) are reused, so
every variant starts from the same weights and sees the same data. The fine-tune is the demo's
(EMF conversion and freezing, EMF schedule r != t 0.5 -> 0.9, batch 64, EMA) in one process
(emf_dist.train.local, the shards decoded into memory), which isolates the objective from the
distributed trainer. Prints MeanFlow's overall accuracy at 1 / 2 / 4 steps
and writes the model and report under DEMO_DIR/variants/NAME.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os

import torch

from emf_dist.alpha_flow import AlphaCurriculum
from emf_dist.config import from_dict
from emf_dist.convert import freeze_for_emf_finetune, meanflow_from_flow_matching
from emf_dist.eval.run import EvalConfig, run_benchmark_job
from emf_dist.export import SamplingInfo, export_model, load_model
from emf_dist.meanflow import MeanFlowConfig, MeanFlowLoss
from emf_dist.time_sampling import TimeSamplerConfig
from emf_dist.train.config import OptimConfig, ScalingOptions, TrainConfig
from emf_dist.train.local import InMemoryData, train_local
from emf_dist.train.shard_loader import decode_sample, raw_samples


def load_shards(folder: str) -> InMemoryData:
    samples = []
    for url in sorted(glob.glob(os.path.join(folder, "*.tar"))):
        with open(url, "rb") as stream:
            for raw in raw_samples(url, stream):
                samples.append(decode_sample(raw, "png"))
    return InMemoryData(*(torch.stack([s[k] for s in samples]) for k in ("image", "tokens", "mask", "pooled")))


def demo_parent(demo: str) -> str:
    """The export folder of a finished demo's flow-matching parent."""
    return glob.glob(os.path.join(demo, "steps/pretrain/*/pretrain/export"))[0]


def load_demo(demo: str):
    """This process's threads set to the cores `taskset` leaves it; the demo's shards in memory and its
    parent's export info (architecture, encoder, data spec)."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    return load_shards(os.path.join(demo, "steps", "prep")), load_model(demo_parent(demo))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--parent", help="the flow-matching parent's export folder (default: the demo's)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--velocity", choices=("data", "teacher"), default="teacher")
    parser.add_argument("--guidance-w", type=float, default=1.0)
    parser.add_argument("--adaptive-p", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--full-interval", type=float, default=0.0)
    parser.add_argument("--r-neq-t", type=float, nargs=2, default=(0.5, 0.9), metavar=("START", "END"),
                        help="share of r != t rows at the start and the end of the fine-tune")
    parser.add_argument("--decay", choices=("constant", "cosine", "linear"), default="constant")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--train-all", action="store_true",
                        help="train every parameter instead of EMF's blocks, time embeddings and final modulation")
    parser.add_argument("--split-share", type=float, default=0.0,
                        help="share of the r != t rows (the longest) on the interval-splitting target (objective.split_share)")
    parser.add_argument("--split-steps", type=int, default=2,
                        help="sub-intervals of a split row's target (objective.split_steps)")
    parser.add_argument("--identity", choices=("eulerian", "lagrangian"), default="eulerian",
                        help="the JVP rows' target: MeanFlow's du/dt, or du/dr at the step's end (objective.identity)")
    parser.add_argument("--tangent", choices=("velocity", "model"), default="velocity",
                        help="the JVP's direction: v, or the network's own velocity (objective.tangent, iMF)")
    parser.add_argument("--alpha", type=float, nargs=2, default=(0.0, 0.0), metavar=("START", "END"),
                        help="AlphaFlow's curriculum of the JVP rows' consistency-step ratio (objective.alpha; "
                             "AlphaFlow's: 1 0)")
    parser.add_argument("--alpha-window", type=float, nargs=2, default=(0.0, 1.0), metavar=("FROM", "TO"),
                        help="the progress span of alpha's sigmoid sweep")
    parser.add_argument("--time-embedding", choices=("dual", "decoupled"), default="dual",
                        help="the conversion: EMF's dual time embedding, or Decoupled MeanFlow's (model.time_embedding)")
    parser.add_argument("--decoder-depth", type=int, default=0, help="decoupled: the last blocks, conditioned on r")
    parser.add_argument("--seed", type=int, default=0, help="the fine-tune's seed (data order, noise, times)")
    parser.add_argument("--images-per-prompt", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores `taskset` leaves this process

    out = os.path.join(args.demo, "variants", args.name)
    data = load_shards(os.path.join(args.demo, "steps", "prep"))
    parent, info = load_model(args.parent or demo_parent(args.demo))
    model = meanflow_from_flow_matching(parent.cfg, parent.state_dict(), args.time_embedding, args.decoder_depth)
    if not args.train_all:
        freeze_for_emf_finetune(model)
    time_cfg = TimeSamplerConfig(schedule="emf", mu=-0.5, sigma=1.0, mu_end=0.5, sigma_end=2.0,
                                 r_neq_t=args.r_neq_t[0], r_neq_t_end=args.r_neq_t[1],
                                 full_interval=args.full_interval)
    objective_cfg = MeanFlowConfig(adaptive_p=args.adaptive_p, time=time_cfg, velocity=args.velocity,
                                   guidance_w=args.guidance_w, split_share=args.split_share,
                                   split_steps=args.split_steps, identity=args.identity,
                                   tangent=args.tangent,
                                   alpha=AlphaCurriculum(start=args.alpha[0], end=args.alpha[1],
                                                         window_start=args.alpha_window[0],
                                                         window_end=args.alpha_window[1]))
    if problems := objective_cfg.validate():
        parser.error("; ".join(problems))
    teacher = parent.eval().requires_grad_(False) if args.velocity == "teacher" else None
    run = TrainConfig(steps=args.steps, micro_batch=64, ema_decay=args.ema_decay, seed=args.seed,
                      scaling=ScalingOptions(num_workers=1),
                      optim=OptimConfig(lr=args.lr, warmup_steps=50, decay=args.decay, min_lr_ratio=args.min_lr_ratio))
    result = train_local(model, MeanFlowLoss(objective_cfg, teacher=teacher), data, run, log_every=100)
    result["ema"].copy_to(model)
    export = export_model(model, dataclasses.replace(info, model=model.cfg, sampling=SamplingInfo(mean_flow=True)),
                          os.path.join(out, "export"))
    score({"meanflow": export}, os.path.join(out, "report"), args.images_per_prompt, meanflow_steps=[1, 2, 4])


def score(models: dict, out: str, images_per_prompt: int, meanflow_steps=(), flow_matching_steps=()) -> None:
    """The demo's scene benchmark (its layout, 48 prompts) at the given step counts, no CFG."""
    eval_cfg = from_dict(EvalConfig, {"run_encoders": False, "benchmark": {
        "prompts_per_task": 8, "images_per_prompt": images_per_prompt, "cell": 8, "min_size": 6, "max_size": 7,
        "flow_matching_steps": list(flow_matching_steps), "flow_matching_guidance": [1.0],
        "meanflow_steps": list(meanflow_steps), "calibration_scenes": 0, "progress": False}}, validate=True)
    run_benchmark_job(models, eval_cfg, out)


if __name__ == "__main__":
    main()
