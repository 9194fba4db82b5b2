"""AlphaFlow's consistency-step target and its curriculum from trajectory flow matching to MeanFlow.

AlphaFlow (Zhang et al., arXiv 2510.20771) writes MeanFlow's r != t rows as one member of a family.
For a consistency-step ratio alpha in (0, 1] the row's interval [r, t] is cut at s = t - alpha (t - r):
the first piece is walked with the velocity v, the rest with the network's own average velocity,

    u_tgt = (alpha (t - r) v + (s - r) u(z_s, r, s)) / (t - r),    z_s = z_t - alpha (t - r) v,

and u(z_t, r, t) regresses on sg(u_tgt). alpha = 1 is trajectory flow matching (u_tgt = v); as alpha
goes to 0 the difference quotient becomes MeanFlow's derivative and the target MeanFlow's,
v - (t - r) du/dt. The paper finds the two parts of MeanFlow's target pull against each other early
in training, so it anneals alpha from 1 to 0 along a sigmoid of training progress, and below a small
clamp it switches to MeanFlow's own JVP target (alpha = 0).

The error of a row falls with alpha (the difference to MeanFlow's target is alpha times it), and so
would its gradient. The official code multiplies its loss weight, which is 1 / (err + c) there
(p = 1), by alpha; for the adaptive weight 1 / (err + c)^p that restoring factor is alpha^(2p - 1)
(alpha^-1 at p = 0, the paper's written loss), which keeps a row's gradient at MeanFlow's scale.
What it does to the demo's fine-tune and to MeanFlow from scratch: docs/benchmarks.md, "AlphaFlow's
curriculum".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class AlphaCurriculum:
    """alpha over training progress p in [0, 1]: ``start`` before ``window_start``, ``end`` after
    ``window_end``, a sigmoid of sharpness ``sharpness`` in between (AlphaFlow's: 1 -> 0 over the whole
    run, sharpness 25, clamp 0.005). The default, 0 throughout, is MeanFlow's objective unchanged."""
    start: float = 0.0
    end: float = 0.0
    window_start: float = 0.0
    window_end: float = 1.0
    sharpness: float = 25.0
    # alpha below clamp is 0 (MeanFlow's JVP target), above 1 - clamp it is 1 (trajectory flow matching)
    clamp: float = 0.005

    @property
    def enabled(self) -> bool:
        return self.start > 0 or self.end > 0

    def validate(self) -> list[str]:
        problems = []
        for name in ("start", "end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"alpha.{name} is a share of the interval and must lie in [0, 1], got "
                                f"{getattr(self, name)}")
        if not 0.0 <= self.window_start < self.window_end <= 1.0:
            problems.append(f"need 0 <= alpha.window_start < alpha.window_end <= 1 (training progress), got "
                            f"{self.window_start}, {self.window_end}")
        if self.sharpness <= 0 or not 0.0 <= self.clamp < 0.5:
            problems.append(f"need alpha.sharpness > 0 and 0 <= alpha.clamp < 0.5, got {self.sharpness}, {self.clamp}")
        return problems

    def at(self, progress: float) -> float:
        """alpha at training progress p, clamped to 0 or 1 near either end."""
        if progress <= self.window_start:
            alpha = self.start
        elif progress >= self.window_end:
            alpha = self.end
        else:
            middle = (self.window_start + self.window_end) / 2
            position = (progress - middle) / (self.window_end - self.window_start)
            alpha = self.start + (self.end - self.start) / (1 + math.exp(-self.sharpness * position))
        if alpha < self.clamp:
            return 0.0
        return 1.0 if alpha > 1 - self.clamp else alpha


@torch.no_grad()
def alpha_flow_target(net: nn.Module, z, r, t, v, alpha: float, text: tuple, drop) -> torch.Tensor:
    """sg target of u(z_t, r, t) for rows with r < t and 0 < alpha <= 1: alpha of the interval walked with
    ``v``, the rest with the network's own u(z_s, r, s). alpha = 1 needs no network call."""
    if alpha >= 1.0:
        return v
    gap = (t - r).view(-1, 1, 1, 1).to(v.dtype)
    s = t - alpha * (t - r)
    z_s = z - alpha * gap * v
    u_rest = net(z_s.to(z.dtype), r, s, *text, drop).to(v.dtype)
    return alpha * v + (1 - alpha) * u_rest


def alpha_row_weight(alpha: float, adaptive_p: float) -> float:
    """The factor on an alpha row's loss weight that keeps its gradient at MeanFlow's scale (module docstring)."""
    return alpha ** (2 * adaptive_p - 1)
