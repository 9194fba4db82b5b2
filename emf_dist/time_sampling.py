"""Sampling the (r, t) pairs of the MeanFlow loss, and EMF's progress schedule.

Two draws from the time distribution are sorted so that r <= t; then a share of the pairs
gets r = t (those rows are plain flow matching and need no JVP). EMF moves the logit-normal
mu, sigma and the r != t share linearly with training progress p in [0, 1], taking the
model from instantaneous to average velocity: the EMF code goes mu -0.5 -> 0.5,
sigma 1.0 -> 2.0, r != t 25% -> 75%. MeanFlow's own default is constant logit-normal(-0.4, 1.0)
with 25% r != t.

Under either law, pairs spanning nearly all of [0, 1] are rare (a few percent even at EMF's
end point), yet one-step sampling asks exactly u(z_1, 0, 1). ``full_interval`` sets that share
of the r != t rows to (r, t) = (0, 1), so a short fine-tune trains the 1-step query directly
(on the demo recipe it did not raise 1-step accuracy: docs/benchmarks.md, "The main job").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class TimeSamplerConfig:
    distribution: Literal["uniform", "logit_normal"] = "logit_normal"  # law of each time draw
    mu: float = -0.4  # logit-normal location (at progress 0 under the EMF schedule)
    sigma: float = 1.0  # logit-normal scale (at progress 0 under the EMF schedule)
    r_neq_t: float = 0.25  # share of pairs with r != t (at progress 0 under the EMF schedule)
    schedule: Literal["constant", "emf"] = "constant"  # "emf": move the three values above linearly with progress
    mu_end: float = 0.5  # mu at progress 1 (EMF schedule only)
    sigma_end: float = 2.0  # sigma at progress 1 (EMF schedule only)
    r_neq_t_end: float = 0.75  # share of r != t at progress 1 (EMF schedule only)
    full_interval: float = 0.0  # share of the r != t rows set to (r, t) = (0, 1), the 1-step query

    def validate(self) -> list[str]:
        problems = []
        for name in ("r_neq_t", "r_neq_t_end", "full_interval"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("sigma", "sigma_end"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        return problems

    @classmethod
    def emf(cls) -> TimeSamplerConfig:
        """The EMF code's defaults."""
        return cls(mu=-0.5, sigma=1.0, r_neq_t=0.25, schedule="emf", mu_end=0.5, sigma_end=2.0, r_neq_t_end=0.75)


def schedule_at(cfg: TimeSamplerConfig, progress: float) -> tuple[float, float, float]:
    """(mu, sigma, r_neq_t) at training progress p in [0, 1]."""
    if cfg.schedule == "constant":
        return cfg.mu, cfg.sigma, cfg.r_neq_t
    p = min(max(progress, 0.0), 1.0)
    lerp = lambda a, b: a + (b - a) * p  # noqa: E731
    return lerp(cfg.mu, cfg.mu_end), lerp(cfg.sigma, cfg.sigma_end), lerp(cfg.r_neq_t, cfg.r_neq_t_end)


def sample_times(cfg: TimeSamplerConfig, batch: int, progress: float = 0.0, *, device=None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (r, t), each [batch], with 0 <= r <= t <= 1."""
    mu, sigma, r_neq_t = schedule_at(cfg, progress)
    if cfg.distribution == "uniform":
        draws = torch.rand(2, batch, generator=generator, device=device)
    else:
        draws = torch.sigmoid(mu + sigma * torch.randn(2, batch, generator=generator, device=device))
    t = torch.maximum(draws[0], draws[1])
    r = torch.minimum(draws[0], draws[1])
    # Exactly round(r_neq_t * batch) rows keep r != t: a fixed share keeps the JVP pass's
    # cost (it only runs on those rows) the same from step to step.
    order = torch.randperm(batch, generator=generator, device=device)
    keep = order < round(r_neq_t * batch)
    full = order < round(cfg.full_interval * round(r_neq_t * batch))  # a fixed number of the kept rows
    return torch.where(full, 0.0, torch.where(keep, r, t)), torch.where(full, 1.0, t)
