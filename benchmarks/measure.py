"""Time and peak memory of one piece of work, each in a fresh process of its own.

CPU PyTorch has no allocator peak counter, so peak memory is read from the kernel: the memory
process runs with glibc's mmap threshold fixed at 64 KiB, so every tensor of note is its own
mapping and freeing it lowers RSS (by default the threshold grows and freed memory stays
resident). After the warm-up runs (optimizer state exists, caches are built) the peak-RSS mark
is reset through /proc/self/clear_refs; the peak of the measured runs minus the RSS at that
moment is the memory the work itself needs at its peak.

The time is taken in a second process under glibc's default settings, the ones training runs
under: with the threshold pinned every large temporary costs fresh page faults, which slows the
work by a factor that grows with its number of temporaries (a JVP pass has more than a gradient
pass), so times taken there are not step times (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


PINNED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "65536"}
MEMORY_REPEATS = 2


def memory_is_measurable() -> bool:
    """Whether this process started with the mmap threshold pinned, so that RSS follows live tensors."""
    return os.environ.get("MALLOC_MMAP_THRESHOLD_") == PINNED_MMAP_THRESHOLD["MALLOC_MMAP_THRESHOLD_"]


def time_and_peak(setup: Callable[[], Callable[[], None]], repeats: int, warmup: int = 1) -> dict:
    """``setup()`` builds everything and returns the work. Returns its median seconds over ``repeats``
    runs, or, in a process started with the pinned threshold, its peak MiB over a few runs (the
    other figure is None: run_isolated takes each from the process that can measure it)."""
    work = setup()
    for _ in range(warmup):
        work()
    if memory_is_measurable():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        baseline = _status_kib("VmRSS")
        for _ in range(MEMORY_REPEATS):
            work()
        return {"seconds": None, "peak_mib": (_status_kib("VmHWM") - baseline) / 1024.0}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"seconds": times[len(times) // 2], "peak_mib": None}


def run_isolated(module: str, spec: dict, timed: bool = True) -> dict:
    """Run ``python -m module '<spec json>'`` in a fresh process with the mmap threshold pinned and,
    if ``timed``, in a second one with glibc's defaults; the JSON line each prints last, merged: the
    memory process's figures, its None seconds replaced by the timed process's."""
    result = _run_json(module, spec, dict(os.environ, **PINNED_MMAP_THRESHOLD))
    if timed:
        default = {key: value for key, value in os.environ.items() if key not in PINNED_MMAP_THRESHOLD}
        result["seconds"] = _run_json(module, spec, default)["seconds"]
    return result


def _run_json(module: str, spec: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def random_batch_step(model, objective, batch: int, text_tokens: int = 16, generator=None) -> Callable[[], None]:
    """One AdamW step of ``objective`` on a fixed random batch of the model's input shapes, as a closure."""
    cfg = model.cfg
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    tokens, pooled = torch.randn(batch, text_tokens, cfg.text_dim), torch.randn(batch, cfg.text_dim)
    mask = torch.ones(batch, text_tokens, dtype=torch.bool)
    critic = getattr(objective, "critic", None)  # adversarial distillation's, stepped with the model here
    trained = [p for p in model.parameters() if p.requires_grad] + (list(critic.parameters()) if critic else [])
    optimizer = torch.optim.AdamW(trained, lr=1e-4)

    def step() -> None:
        loss, _ = objective(model, x, tokens, mask, pooled, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def best_over_rounds(module: str, specs: list[dict], rounds: int) -> list[dict]:
    """Every spec measured once per round, the rounds interleaved so that a machine's drift hits
    every spec alike; for each spec the result of its fastest round."""
    best: list[dict | None] = [None] * len(specs)
    for _ in range(rounds):
        for i, spec in enumerate(specs):
            result = run_isolated(module, spec)
            if best[i] is None or result["seconds"] < best[i]["seconds"]:
                best[i] = result
    return best


def print_ratio_table(results: dict[tuple[str, bool, str], dict], label: Callable[[str, dict], str]) -> None:
    """Markdown rows of ``results`` keyed (model, checkpointing, step): time and peak memory, each beside
    its ratio to the "flow matching" step of the same model and checkpointing; ``label(model, result)``
    names the model's row."""
    print("| model | checkpointing | step | seconds | ratio to FM | peak MiB | ratio to FM |")
    print("|---|---|---|---|---|---|---|")
    for (model, checkpointing, step), r in results.items():
        fm = results[(model, checkpointing, "flow matching")]
        print(f"| {label(model, r)} | {'on' if checkpointing else 'off'} | {step} | {r['seconds']:.3f} | "
              f"{r['seconds'] / fm['seconds']:.2f} | {r['peak_mib']:.0f} | {r['peak_mib'] / fm['peak_mib']:.2f} |",
              flush=True)
