"""Float64-capable twins of the two diffusers pieces that force float32, for float64 oracles.

diffusers computes the sinusoidal timestep features (``Timesteps``) and SANA's linear attention in
float32 whatever the input precision. That is what training wants (bf16 would lose
d/dt sin(1000 t)), but it caps a float64 model at float32 accuracy, which a float64
finite-difference check of the JVP cannot live with. ``promote_float64`` swaps both for twins
that compute in ``promote_types(input, float32)``: for float32, bf16 and fp16 inputs they run the
very same operations (bit-identical results, tested), for float64 inputs they stay in float64.
Training never needs it; the tests apply it before comparing against float64 finite differences.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class PreciseTimesteps(nn.Module):
    """diffusers' ``Timesteps`` (get_timestep_embedding), computed in at least float32, float64 when given float64."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1,
                 max_period: int = 10000):
        super().__init__()
        self.num_channels, self.flip_sin_to_cos = num_channels, flip_sin_to_cos
        self.downscale_freq_shift, self.scale, self.max_period = downscale_freq_shift, scale, max_period

    @classmethod
    def like(cls, timesteps: nn.Module) -> "PreciseTimesteps":
        return cls(timesteps.num_channels, timesteps.flip_sin_to_cos, timesteps.downscale_freq_shift, timesteps.scale)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        # The frequency table in float32, exactly as diffusers builds it (a constant of the model).
        exponent = -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        freqs = torch.exp(exponent / (half - self.downscale_freq_shift))
        dtype = torch.promote_types(timesteps.dtype, torch.float32)
        angles = self.scale * (timesteps[:, None].to(dtype) * freqs[None, :].to(dtype))
        emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        if self.flip_sin_to_cos:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        if self.num_channels % 2:
            emb = F.pad(emb, (0, 1, 0, 0))
        return emb


class PreciseSanaLinearAttnProcessor:
    """SanaLinearAttnProcessor2_0 with ``promote_types(x, float32)`` where the original casts to float32."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        original_dtype = hidden_states.dtype
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = query.transpose(1, 2).unflatten(1, (attn.heads, -1))
        key = key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)
        value = value.transpose(1, 2).unflatten(1, (attn.heads, -1))
        dtype = torch.promote_types(original_dtype, torch.float32)
        query, key, value = F.relu(query).to(dtype), F.relu(key).to(dtype), value.to(dtype)
        # A row of ones appended to the values gives the normaliser sum_j k_j . q in the last row.
        value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)
        out = torch.matmul(torch.matmul(value, key), query)
        out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
        out = out.flatten(1, 2).transpose(1, 2).to(original_dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if original_dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


def promote_float64(module: nn.Module) -> nn.Module:
    """Swap, in place, every diffusers ``Timesteps`` and SANA linear-attention processor for its twin."""
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0
    from diffusers.models.embeddings import Timesteps

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Timesteps):
                setattr(parent, name, PreciseTimesteps.like(child))
        if isinstance(getattr(parent, "processor", None), SanaLinearAttnProcessor2_0):
            parent.set_processor(PreciseSanaLinearAttnProcessor())
    return module
