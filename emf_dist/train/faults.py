"""Fault injection, so that tests can watch the run recover: a rank that dies after a given
optimizer step (Ray Train replaces the worker group, which resumes from the last checkpoint),
and rank 0's loss read as NaN at given micro-batch attempts (skipped on every rank).

``fault_injector`` builds the plan once per rank from ``cfg.faults``; it is None where that rank
has nothing to inject, so an ordinary run's loop does no fault work at all. The loop asks at
two points: ``poisons(attempt)`` after a micro-batch's loss, ``after_step(step)`` after an
optimizer step.
"""
from __future__ import annotations

import os

from emf_dist import storage
from emf_dist.train.config import TrainConfig


class FaultInjector:
    """The faults one rank injects; see the module docstring for when the loop asks."""

    def __init__(self, rank: int, kill_after_step: int | None, kill_marker: str, nan_attempts: frozenset[int]):
        self.rank = rank
        self.kill_after_step = kill_after_step  # None: this rank never exits
        self.kill_marker = kill_marker  # in the run's storage, so the replacement worker survives the step
        self.nan_attempts = nan_attempts

    def poisons(self, attempt: int) -> bool:
        """Whether micro-batch attempt ``attempt`` (counted over the run, retries included) is bad."""
        return attempt in self.nan_attempts

    def after_step(self, step: int) -> None:
        """Exit the process right after optimizer step ``kill_after_step``, once per run."""
        if step != self.kill_after_step:
            return
        fs, path = storage.filesystem(self.kill_marker)
        if fs.exists(path):
            return
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        fs.pipe(path, b"killed")
        print(f"[fault injection] rank {self.rank} exits after step {step}", flush=True)
        os._exit(1)


def fault_injector(cfg: TrainConfig, rank: int) -> FaultInjector | None:
    """This rank's faults from cfg.faults, or None when it injects none.

    faults.kill_rank exits after faults.kill_at_step; only rank 0's loss reads as NaN at
    faults.nan_at_micro_batches (one rank is enough: the ranks agree to skip)."""
    faults = cfg.faults
    kill_after_step = faults.kill_at_step if rank == faults.kill_rank else None
    nan_attempts = frozenset(faults.nan_at_micro_batches) if rank == 0 else frozenset()
    if kill_after_step is None and not nan_attempts:
        return None
    marker = storage.join(cfg.storage_path, cfg.name, f".fault_injected_rank{rank}")
    return FaultInjector(rank, kill_after_step, marker, nan_attempts)
