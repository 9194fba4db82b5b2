"""A single-process training loop on in-memory data: for tests, benchmarks and small demos.

The distributed trainer (Ray Train + DeepSpeed) wraps the same objective; this loop is the
reference it is compared against, and the quickest way to try a model on a laptop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from emf_dist.ema import EMA
from emf_dist.meanflow import MeanFlowLoss
from emf_dist.model import VelocityNet
from emf_dist.train_config import OptimConfig


@dataclass
class InMemoryData:
    images: torch.Tensor  # [N, C, H, W] in [-1, 1] (or latents)
    tokens: torch.Tensor  # [N, L, D]
    mask: torch.Tensor  # [N, L] bool
    pooled: torch.Tensor  # [N, D]

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.images[index], self.tokens[index], self.mask[index], self.pooled[index]


@dataclass
class LocalTrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup: int = 50  # linear learning-rate warm-up steps
    decay: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up, towards min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 0  # print a progress line every N steps (0: never)


def train_local(model: VelocityNet, objective: MeanFlowLoss, data: InMemoryData, cfg: LocalTrainConfig,
                ema: EMA | None = None) -> dict:
    """Train ``model`` in place; returns the EMA and the loss history. Progress p = step / steps."""
    generator = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    lr_shape = OptimConfig(warmup_steps=cfg.warmup, decay=cfg.decay, min_lr_ratio=cfg.min_lr_ratio)  # as emf train
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_shape.lr_factor(s, cfg.steps))
    ema = ema or EMA(model, cfg.ema_decay)
    history = []
    start = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        index = torch.randint(len(data), (cfg.batch_size,), generator=generator)
        loss, stats = objective(model, *data.batch(index), progress=step / cfg.steps, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        schedule.step()
        ema.update(model)
        history.append(float(stats["mse"]))
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            elapsed = time.perf_counter() - start
            rate = (step + 1) / elapsed
            print(f"step {step + 1}/{cfg.steps}  mse {sum(history[-cfg.log_every:]) / cfg.log_every:.4f}  "
                  f"{rate:.1f} steps/s  eta {(cfg.steps - step - 1) / rate:.0f}s", flush=True)
    model.eval()
    return {"ema": ema, "mse": history}
