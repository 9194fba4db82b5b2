"""EMF's dual time embedding on diffusers transformers: phi_end(t) + phi_interval(t - r).

The model's own timestep embedding becomes phi_end. phi_interval is a second embedder of the
interval t - r, a copy of the model's timestep MLP (same features, same shapes) whose output layer
is zeroed, so phi_interval = 0 and the converted model equals the original for every (r, t) at
step 0. The sum replaces the original embedding, so it feeds every place the original fed:

    SANA (AdaLayerNormSingle):  emb -> silu -> linear -> every block's 6 x dim modulation,
                                emb -> the final scale_shift_table (norm_out)
    SD3 (CombinedTimestepTextProjEmbeddings): temb = emb + pooled text projection -> every
                                block's AdaLayerNormZero, the context norms, norm_out

The interval reaches the embedding through the transformer's own ``timestep`` argument, stacked
as [B, 2] = (timestep(t), timestep(t - r)): diffusers hands ``timestep`` unchanged to the time
embedding and nowhere else, so the stock forward (and its gradient checkpointing) runs as is.
A plain [B] timestep means r = t (interval 0), so a diffusers pipeline can still call the model.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


def stack_timesteps(timestep: torch.Tensor, interval: torch.Tensor) -> torch.Tensor:
    return torch.stack([timestep, interval], dim=-1)


def split_timesteps(timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if timestep.ndim == 2:
        return timestep[:, 0], timestep[:, 1]
    return timestep, torch.zeros_like(timestep)


class IntervalEmbedding(nn.Module):
    """phi_interval: the model's timestep features and a copy of its timestep MLP, output layer zeroed.

    Copying the hidden layer (rather than drawing it afresh) starts the interval path on features
    the pretrained MLP already spreads well over the timestep range."""

    def __init__(self, time_proj: nn.Module, timestep_embedder: nn.Module):
        super().__init__()
        self.time_proj = copy.deepcopy(time_proj)
        self.timestep_embedder = copy.deepcopy(timestep_embedder)
        last = self.timestep_embedder.linear_2
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)

    def forward(self, interval: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(self.time_proj(interval).to(dtype=dtype))


class DualAdaLayerNormSingle(nn.Module):
    """SANA's AdaLayerNormSingle with phi_end + phi_interval. Keeps the original's parameter names
    (``emb.*``, ``linear.*``) and adds ``interval_embedder.*``."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.emb, self.silu, self.linear = original.emb, original.silu, original.linear
        self.interval_embedder = IntervalEmbedding(original.emb.time_proj, original.emb.timestep_embedder)

    def forward(self, timestep, added_cond_kwargs=None, batch_size=None, hidden_dtype=None):
        timestep, interval = split_timesteps(timestep)
        added_cond_kwargs = added_cond_kwargs or {"resolution": None, "aspect_ratio": None}
        embedded = self.emb(timestep, **added_cond_kwargs, batch_size=batch_size, hidden_dtype=hidden_dtype)
        embedded = embedded + self.interval_embedder(interval, embedded.dtype)
        return self.linear(self.silu(embedded)), embedded


class DualTimestepTextProjEmbeddings(nn.Module):
    """SD3's CombinedTimestepTextProjEmbeddings with phi_end + phi_interval. Keeps the original's
    parameter names (``timestep_embedder.*``, ``text_embedder.*``) and adds ``interval_embedder.*``."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.time_proj, self.timestep_embedder = original.time_proj, original.timestep_embedder
        self.text_embedder = original.text_embedder
        self.interval_embedder = IntervalEmbedding(original.time_proj, original.timestep_embedder)

    def forward(self, timestep, pooled_projection):
        timestep, interval = split_timesteps(timestep)
        dtype = pooled_projection.dtype
        time = self.timestep_embedder(self.time_proj(timestep).to(dtype=dtype))
        time = time + self.interval_embedder(interval, dtype)
        return time + self.text_embedder(pooled_projection)
