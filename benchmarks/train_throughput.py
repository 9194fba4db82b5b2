"""The distributed trainer against the bare core step, and ZeRO stages side by side.

    python -m benchmarks.train_throughput --data DATASET_DIR [--steps 60] [--micro-batch 32]

DATASET_DIR is a folder written by `emf prep` with `encoder.max_length=16` (e.g. the demo's
`steps/prep` folder); the model (4 blocks, width 128, patch 4) takes the shards' resolution. Measured in one run, on one local Ray instance:

- bare core step: MeanFlowLoss + AdamW on batches already in memory, in a Ray task with 1 CPU
  (the same process environment as one Ray Train worker: OMP_NUM_THREADS=1), once before and
  once after the 1-worker run so the machine's drift shows;
- the full system (Ray Train + DeepSpeed + WebDataset streaming) with 1 worker, same micro-batch,
  so (system step time / bare step time - 1) is the overhead of everything around the core;
- 2 workers (scaling efficiency = samples/s with 2 / (2 x samples/s with 1));
- ZeRO stages 0-3 with 2 workers: samples/s and per-worker peak RSS.

The system's figures come from the last logging window of each run (the last third of the
steps: the first steps, with worker start-up and warm-up, are excluded); the bare step is the
mean over as many steps after as many warm-up steps.
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
from emf_dist.train.config import TrainConfig
from emf_dist.train.driver import train


def run_config(data: str, storage: str, name: str, steps: int, micro_batch: int, workers: int,
               stage: int) -> TrainConfig:
    return from_dict(TrainConfig, {
        "name": name, "storage_path": storage, "steps": steps, "micro_batch": micro_batch, "checkpoint_every": steps,
        "encoder": {"max_length": 16}, "data": {"url": data, "loader_workers": 1},
        "model": {"width": 128, "depth": 4, "heads": 4, "input_size": read_manifest(data).image.resolution},
        "scaling": {"num_workers": workers},
        "logging": {"every": steps // 3, "wandb": "disabled"}, "zero": {"stage": stage}}, validate=True)


def bare_step_seconds(cfg: TrainConfig, repeats: int) -> float:
    """The core step alone: same model, objective and micro-batch, data already in memory.
    Mean seconds per step over ``repeats`` steps after ``repeats`` warm-up steps."""
    torch.manual_seed(0)
    model = VelocityNet(cfg.model)
    objective = MeanFlowLoss(cfg.objective)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    b, m = cfg.micro_batch, cfg.model
    x = torch.randn(b, m.in_channels, m.input_size, m.input_size)
    tokens, mask, pooled = torch.randn(b, 16, m.text_dim), torch.ones(b, 16, dtype=torch.bool), torch.randn(b, m.text_dim)
    generator = torch.Generator().manual_seed(0)
    for i in range(2 * repeats):
        if i == repeats:
            start = time.perf_counter()
        loss, _ = objective(model, x, tokens, mask, pooled, progress=i / (2 * repeats), generator=generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro-batch", type=int, default=32)
    args = parser.parse_args()
    import ray
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="emf-bench-")
    config = lambda name, workers, stage: run_config(  # noqa: E731
        args.data, storage, name, args.steps, args.micro_batch, workers, stage)
    bare_task = ray.remote(num_cpus=1)(bare_step_seconds)
    bare = [ray.get(bare_task.remote(config("bare", 1, 0), args.steps // 3))]
    runs = {}
    for workers, stage in [(1, 0), (2, 0), (2, 1), (2, 2), (2, 3)]:
        runs[(workers, stage)] = train(config(f"w{workers}-z{stage}", workers, stage)).metrics
        if workers == 1:
            bare.append(ray.get(bare_task.remote(config("bare", 1, 0), args.steps // 3)))
    one = runs[(1, 0)]
    system_step = args.micro_batch / one["samples_per_s"]
    bare_step = sum(bare) / len(bare)
    print(f"micro-batch {args.micro_batch}: bare core step {bare[0]:.3f} s before, {bare[1]:.3f} s after; "
          f"system step (1 worker, ZeRO-0) {system_step:.3f} s; overhead {system_step / bare_step - 1:+.1%}")
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
