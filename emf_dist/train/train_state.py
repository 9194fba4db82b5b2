"""One rank's training progress: what a checkpoint stores beside the weights, the optimizer
and the sampling RNG so that a resumed run continues exactly where the last one stopped.

Checkpoints hold it as JSON with these field names (checkpoint.py); a field added later needs
a default, so that checkpoints written before it still load.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from emf_dist.config import from_dict, to_dict


@dataclass
class DataPosition:
    """Where a rank's batch stream stands; resuming replays the epoch's stream up to it."""

    epoch: int = 0
    """Passes over the dataset this rank's stream has finished."""
    taken: int = 0
    """Micro-batches taken from the current epoch."""


@dataclass
class TrainState:
    """The counters of one rank's training loop (field order is the checkpoint's JSON order)."""

    step: int = 0
    """Optimizer steps done."""
    data: DataPosition = field(default_factory=DataPosition)
    """The batch stream's position, brought up to date when a checkpoint is written."""
    skipped_samples: int = 0
    """Samples this rank's stream skipped because they failed to read or decode, as of the last
    checkpoint; restored into the stream so the reported count stays cumulative across resumes."""
    bad_steps: int = 0
    """Micro-batches dropped on every rank because some rank's loss was NaN/inf, over the run."""
    attempts: int = 0
    """Micro-batches tried, good and bad, over the run: the count that faults.nan_at_micro_batches
    refers to."""

    def as_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_saved(cls, saved: dict) -> TrainState:
        """The state a checkpoint holds; an unknown key or a wrong type raises ConfigError."""
        return from_dict(cls, saved, path="state")
