"""Time and peak memory of one piece of work, each measurement in a fresh process.

CPU PyTorch has no allocator peak counter, so peak memory is read from the kernel: the child
runs with glibc's mmap threshold fixed at 64 KiB, so every tensor of note is its own mapping
and freeing it lowers RSS (by default the threshold grows and freed memory stays resident).
After the warm-up runs (optimizer state exists, caches are built) the peak-RSS mark is reset
through /proc/self/clear_refs; the peak of the measured runs minus the RSS at that moment is
the memory the work itself needs at its peak.
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


def time_and_peak(setup: Callable[[], Callable[[], None]], repeats: int, warmup: int = 1) -> dict:
    """``setup()`` builds everything and returns the work; returns median seconds and peak MiB."""
    work = setup()
    for _ in range(warmup):
        work()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    baseline = _status_kib("VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"seconds": times[len(times) // 2], "peak_mib": (_status_kib("VmHWM") - baseline) / 1024.0}


def run_isolated(module: str, spec: dict) -> dict:
    """Run ``python -m module '<spec json>'`` in a fresh process; parse the JSON line it prints last."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
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
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

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
