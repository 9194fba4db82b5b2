"""What every GPU table of benchmarks.gpu_step shares: the CUDA check, the header that says
where and when a table was measured, CUDA-event timing with the allocator's peak, and the child
process that measures one configuration where a failure must not end the table."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys

import torch


def require_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks.gpu_step measures the CUDA path and needs a CUDA device; this machine has none. "
                 "CPU figures: python -m benchmarks.jvp_attention / python -m benchmarks.meanflow_step")
    try:
        import emf_dist.triton_attention  # noqa: F401
    except ImportError as error:
        sys.exit(f"benchmarks.gpu_step needs triton (it comes with CUDA builds of torch): {error}")


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)),
                          capture_output=True, text=True)


def provenance() -> str:
    """Today's date and the checked-out commit ("+ local changes" when the tree differs from it),
    so that a table pasted into docs/benchmarks.md says which code it measured."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except OSError:  # no git on this machine
        commit, dirty = None, ""
    code = commit.stdout.strip() if commit is not None and commit.returncode == 0 else "unknown"
    return f"{datetime.date.today().isoformat()}, commit {code}{' + local changes' if dirty else ''}"


def command() -> str:
    return f"python -m benchmarks.gpu_step {' '.join(sys.argv[1:])}"


def header() -> str:
    import triton

    return (f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"triton {triton.__version__}. Measured {provenance()}. Command: {command()}")


def cuda_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def peak_mib(fn) -> float:
    """The allocator's peak during one call, minus what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def time_and_peak(work, repeats: int, warmup: int = 2) -> tuple[float, float] | None:
    """(median seconds, peak MiB) of ``work()``; None where the GPU ran out of memory (math
    attention at 16k tokens)."""
    try:
        return cuda_seconds(work, repeats, warmup), peak_mib(work)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def run_one(part: str, spec: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m benchmarks.gpu_step PART --one SPEC`` in its own process: an LLVM abort or a
    CUDA fault there ends that process, not the table."""
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_step", part, "--one", json.dumps(spec)],
                          capture_output=True, text=True, env=env)


def failure(proc: subprocess.CompletedProcess, width: int) -> str:
    """The failed child's last line of stderr (its exception), cut to ``width`` for a table cell."""
    return (proc.stderr.strip().splitlines() or ["no output"])[-1][:width]
