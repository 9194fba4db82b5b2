"""The single-process training loop: for tests, benchmarks and trying a model on a laptop.

It takes the same TrainConfig as `emf train` and builds its optimizer, schedule and objective RNG
with the same code (setup.py). ``scaling.num_workers`` ranks are simulated: every optimizer step
takes ``grad_accum`` micro-batches from each rank's stream, each with that rank's objective RNG,
and averages their gradients, which is what the DeepSpeed workers' all-reduce computes. Given the
workers' batch streams (setup.build_batches) it therefore reproduces a ZeRO-0 run
(tests/test_train_distributed.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from emf_dist.ema import EMA
from emf_dist.train.config import TrainConfig
from emf_dist.train.setup import build_critic_optimizer, build_optimizer, objective_generator, step_critic

Batch = dict[str, torch.Tensor]  # image, tokens, mask, pooled: the shard loader's batch layout


@dataclass
class InMemoryData:
    images: torch.Tensor  # [N, C, H, W] in [-1, 1] (or latents)
    tokens: torch.Tensor  # [N, L, D]
    mask: torch.Tensor  # [N, L] bool
    pooled: torch.Tensor  # [N, D]

    def __len__(self) -> int:
        return self.images.shape[0]

    def stream(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """Batches drawn with replacement, forever, from ``generator`` (the rank's objective RNG)."""
        while True:
            index = torch.randint(len(self), (batch_size,), generator=generator)
            yield {"image": self.images[index], "tokens": self.tokens[index], "mask": self.mask[index],
                   "pooled": self.pooled[index]}


def train_local(model: nn.Module, objective, data: InMemoryData | list[Iterator[Batch]], cfg: TrainConfig,
                ema: EMA | None = None, log_every: int = 0) -> dict:
    """Train ``model`` in place for cfg.steps optimizer steps; returns the EMA and the per-step mse.

    ``data``: in-memory samples (each simulated rank draws from them with its own RNG), or one
    batch iterator per rank (len == cfg.scaling.num_workers)."""
    if cfg.distill.rounds > 1:
        raise ValueError(f"train_local runs one distillation round; run cfg.distill_round(i) for each of the "
                         f"{cfg.distill.rounds}, each from the round before's EMA weights")
    ranks = cfg.scaling.num_workers
    generators = [objective_generator(cfg, rank) for rank in range(ranks)]
    streams = [data.stream(cfg.micro_batch, g) for g in generators] if isinstance(data, InMemoryData) else data
    if len(streams) != ranks:
        raise ValueError(f"got {len(streams)} batch streams for scaling.num_workers {ranks}")
    params, optimizer, schedule = build_optimizer(model, cfg.optim, cfg.steps)
    critic = getattr(objective, "critic", None)  # adversarial distillation's, trained beside the model
    critic_optimizer = build_critic_optimizer(critic, cfg) if critic is not None else None
    ema = ema or EMA(model, cfg.ema_decay)
    history, start = [], time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        mse = _accumulate_gradients(model, objective, streams, generators, cfg, progress=step / cfg.steps)
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if critic_optimizer is not None:  # its gradient, too, is the mean over the ranks' micro-batches
            step_critic(critic, critic_optimizer)
        schedule.step()
        ema.update(model)
        history.append(mse)
        if log_every and (step + 1) % log_every == 0:
            _progress_line(step + 1, cfg.steps, history[-log_every:], time.perf_counter() - start)
    model.eval()
    return {"ema": ema, "mse": history}


def _accumulate_gradients(model, objective, streams, generators, cfg: TrainConfig, progress: float) -> float:
    """Backward of every rank's grad_accum micro-batches, scaled so the gradient is their mean."""
    count = len(streams) * cfg.grad_accum
    mse = 0.0
    for _ in range(cfg.grad_accum):
        for stream, generator in zip(streams, generators):
            batch = next(stream)
            loss, stats = objective(model, batch["image"], batch["tokens"], batch["mask"], batch["pooled"],
                                    progress, generator=generator)
            (loss / count).backward()
            mse += float(stats["mse"]) / count
    return mse


def _progress_line(step: int, steps: int, recent: list[float], elapsed: float) -> None:
    rate = step / elapsed
    print(f"step {step}/{steps}  mse {sum(recent) / len(recent):.4f}  {rate:.1f} steps/s  "
          f"eta {(steps - step) / rate:.0f}s", flush=True)
