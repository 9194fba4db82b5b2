"""What two ranks on two cores pay around the bare step: CPU sharing, DeepSpeed's ZeRO stage, the
per-step checks, side by side in one run.

    python -m benchmarks.rank_overhead [--steps 30] [--objectives flow_matching distill8]

The `emf` spec's model and a fixed random batch of 32 per rank (as in benchmarks/demo_step_vs_batch),
each case in fresh processes, one thread per process like a 1-CPU Ray Train worker:

- bare, 1 process: the step alone on an otherwise idle machine;
- bare, 2 processes: two independent copies at once (what sharing the machine costs, no communication);
- ZeRO-N, 2 ranks: gloo + DeepSpeed engines stepping together, with the worker loop's per-step
  any-rank check and EMA update (emf_dist/train/worker.py), without Ray or data loading.

Prints the median milliseconds per step of each case and its ratio to the bare step.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.demo_step_vs_batch import MODEL, TEXT_TOKENS
from benchmarks.measure import random_batch_step, time_and_peak
from emf_dist.ema import EMA
from emf_dist.meanflow import MeanFlowConfig, MeanFlowLoss
from emf_dist.model import VelocityNet
from emf_dist.split_distill import SplitDistillConfig, SplitDistillLoss
from emf_dist.train.config import TrainConfig, ZeroConfig
from emf_dist.train.engine import build_engine

BATCH = 32


def _objective(name: str):
    if name == "flow_matching":
        return MeanFlowLoss(MeanFlowConfig(mode="flow_matching", adaptive_p=0.0))
    steps = int(name.removeprefix("distill"))
    teacher = VelocityNet(MODEL).eval().requires_grad_(False)
    return SplitDistillLoss(SplitDistillConfig(teacher_steps=steps, adaptive_p=1.0), teacher)


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, MODEL.in_channels, MODEL.input_size, MODEL.input_size, generator=g)
    tokens = torch.randn(BATCH, TEXT_TOKENS, MODEL.text_dim, generator=g)
    mask = torch.ones(BATCH, TEXT_TOKENS, dtype=torch.bool)
    return x, tokens, mask, torch.randn(BATCH, MODEL.text_dim, generator=g)


def _bare(rank: int, objective_name: str, steps: int, out) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(rank)
    model, objective = VelocityNet(MODEL), _objective(objective_name)
    timed = time_and_peak(lambda: random_batch_step(model, objective, BATCH, TEXT_TOKENS), steps, warmup=3)
    out.put(timed["seconds"])


def _ranks(rank: int, world: int, port: int, stage: int, objective_name: str, steps: int, out) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model, objective = VelocityNet(MODEL), _objective(objective_name)
    cfg = TrainConfig(micro_batch=BATCH, steps=steps, zero=ZeroConfig(stage=stage))
    engine = build_engine(model, cfg, world, on_gpu=False)
    ema, batch, times = EMA(engine.module), _inputs(rank), []
    for _ in range(steps + 3):
        start = time.perf_counter()
        loss, _ = objective(engine, *batch, net=engine.module)
        flag = torch.tensor([0.0 if torch.isfinite(loss.detach()) else 1.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        engine.backward(loss)
        engine.step()
        ema.update(engine.module)
        times.append(time.perf_counter() - start)
    out.put(statistics.median(times[3:]))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(target, args_of, processes: int) -> float:
    """Start ``processes`` copies of target at once; the slowest one's median step."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_of(i), out)) for i in range(processes)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"{target.__name__} exited with {p.exitcode}")
    return max(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--objectives", nargs="+", default=["flow_matching", "distill8"])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(f"median ms per step of {BATCH} per process, {args.steps} steps, one thread per process")
    for name in args.objectives:
        bare = _run(_bare, lambda i: (i, name, args.steps), 1)
        cells = {"bare, 1 process": bare, "bare, 2 processes": _run(_bare, lambda i: (i, name, args.steps), 2)}
        for stage in args.stages:
            port = _free_port()
            cells[f"ZeRO-{stage}, 2 ranks"] = _run(_ranks, lambda i: (i, 2, port, stage, name, args.steps), 2)
        print(f"{name}: " + "   ".join(f"{k} {v * 1e3:6.1f} ({v / bare:.2f})" for k, v in cells.items()), flush=True)


if __name__ == "__main__":
    main()
