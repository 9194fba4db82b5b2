"""Exponential moving average of the weights: the weights that get exported and sampled."""

from __future__ import annotations

import torch
import torch.nn as nn


class EMA:
    """Float32 shadow copies of a model's parameters, on the parameters' device.

    The decay warms up as min(decay, (1 + n) / (10 + n)) over the first updates, so early
    averages are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, param in model.named_parameters():
            self.shadow[name].lerp_(param.detach().float(), weight)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            param.copy_(self.shadow[name].to(param.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state["shadow"]) ^ set(self.shadow)
        if unknown:
            raise ValueError(f"EMA state does not match the model; differing parameters: {sorted(unknown)[:5]}")
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
