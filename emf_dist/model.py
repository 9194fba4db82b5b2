"""The velocity network: a DiT with text cross-attention and EMF's dual time embedding.

    u = net(z, r, t, text)      average velocity of the flow over [r, t]

Inputs are latents or pixels [B, C, H, W]. The image is cut into patches; each block is
adaLN-Zero self-attention, cross-attention to the text token states (with their padding
mask), and an adaLN-Zero MLP. The conditioning vector is

    c = phi_end(t) + phi_interval(t - r) + proj(pooled text)        ("dual", EMF)
    c = phi(t) + proj(pooled text)                                   ("single", flow matching)

Plain PyTorch: no Ray, no DeepSpeed. Activation checkpointing of the blocks is a flag, used
only when gradients are being recorded (the JVP pass runs under no_grad and keeps nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from emf_dist.attention import attention
from emf_dist.model_jvp import velocity_and_tangent


@dataclass
class ModelConfig:
    input_size: int = 32  # height = width of the network input (pixels or latent cells)
    in_channels: int = 3  # 3 for RGB pixels, 4 or 16 for VAE latents
    patch_size: int = 2  # tokens = (input_size / patch_size)^2
    width: int = 256  # hidden size of every token
    depth: int = 6  # number of transformer blocks
    heads: int = 4  # attention heads; width must be divisible by heads
    mlp_ratio: float = 4.0  # MLP hidden size = width * mlp_ratio
    text_dim: int = 384  # size of the text encoder's token states and pooled vector
    # "single": flow matching, phi(t) everywhere; "dual": EMF's MeanFlow, phi_end(t) + phi_interval(t - r)
    # everywhere; "decoupled": Decoupled MeanFlow (arXiv 2510.24474), the flow-matching model's own phi,
    # of t in the first depth - decoder_depth blocks (the encoder) and of r in the rest and the final layer
    # (the decoder). At r = t both are the flow-matching model; decoupling adds no parameter.
    time_embedding: Literal["single", "dual", "decoupled"] = "dual"
    decoder_depth: int = 0  # time_embedding decoupled: the last blocks, conditioned on r
    # Times are multiplied by this before the sinusoidal features. DiT uses 1000 (t in steps);
    # smaller values give a smoother u(t) and a better-conditioned du/dt for MeanFlow.
    time_scale: float = 1000.0
    checkpointing: bool = False  # recompute each block in the backward pass (saves activation memory)
    # What the last layer predicts. "velocity": u itself. "data": a clean image x, returned as
    # u = (z_t - x) / max(t, data_min_t), so a one-step sample z_1 - u(z_1, 0, 1) is the network's x
    # and the network never has to reproduce the noise (JiT's x-prediction; pixel MeanFlow).
    prediction: Literal["velocity", "data"] = "velocity"
    data_min_t: float = 0.05  # the clamp on t in that division (near t = 0, z_t is x already)

    @property
    def tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def validate(self) -> list[str]:
        problems = []
        if self.input_size % self.patch_size:
            problems.append(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.width % self.heads:
            problems.append(f"width {self.width} is not divisible by heads {self.heads}")
        elif (self.width // self.heads) % 2:
            problems.append(f"head size width/heads = {self.width // self.heads} must be even")
        if self.width % 4:
            problems.append(f"width {self.width} must be divisible by 4 (2-D sin-cos position embedding)")
        for name in ("input_size", "in_channels", "patch_size", "depth", "heads", "text_dim"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.data_min_t <= 1:
            problems.append(f"data_min_t must lie in (0, 1], got {self.data_min_t}")
        if not self.mlp_ratio > 0:
            problems.append(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.time_embedding == "decoupled" and not 1 <= self.decoder_depth <= self.depth:
            problems.append(f"time_embedding decoupled conditions the last decoder_depth blocks on r: it must lie in "
                            f"[1, depth = {self.depth}], got {self.decoder_depth}")
        if self.time_embedding != "decoupled" and self.decoder_depth:
            problems.append(f"decoder_depth is for time_embedding decoupled; with {self.time_embedding} set it to 0")
        if not self.time_scale > 0:
            problems.append(f"time_scale must be > 0, got {self.time_scale}")
        return problems


# DiT's sizes (Peebles & Xie, Table 1) plus two small ones for CPU tests and demos.
PRESETS: dict[str, dict] = {
    "test": dict(width=32, depth=2, heads=2),
    "demo": dict(width=192, depth=6, heads=6),
    "S": dict(width=384, depth=12, heads=6),
    "B": dict(width=768, depth=12, heads=12),
    "L": dict(width=1024, depth=24, heads=16),
    "XL": dict(width=1152, depth=28, heads=16),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(ModelConfig(**PRESETS[name]), **overrides)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a scalar in [0, 1], then an MLP (as in DiT)."""

    def __init__(self, width: int, scale: float, frequencies: int = 256, zero_output: bool = False):
        super().__init__()
        self.scale, self.frequencies = scale, frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))
        if zero_output:  # EMF's interval path starts as a no-op (FastGen does the same)
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        # At least float32: sin(1000 t) loses the time derivative in bf16.
        dtype = torch.promote_types(s.dtype, torch.float32)
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=s.device, dtype=dtype) / half)
        angles = (self.scale * s.to(dtype))[:, None] * freqs[None]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x, context=None, key_mask=None, keys_values=None):
        """Self-attention, or cross-attention to ``context``; ``keys_values``: self.kv(context) already
        computed (a sampler's steps share the text's)."""
        if keys_values is None:
            keys_values = self.kv(x if context is None else context)
        batch, n, width = x.shape
        q = self.q(x).view(batch, n, self.heads, -1).transpose(1, 2)
        k, v = keys_values.view(batch, keys_values.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v, key_mask)
        return self.out(y.transpose(1, 2).reshape(batch, n, width))


class Block(nn.Module):
    """adaLN-Zero self-attention, cross-attention to text, adaLN-Zero MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.self_attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.cross_attn = Attention(width, heads)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c, text_keys_values, text_mask):
        """``text_keys_values``: self.cross_attn.kv of the projected text tokens (TextContext)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.self_attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attn(self.norm2(x), key_mask=text_mask, keys_values=text_keys_values)
        return x + gate2[:, None] * self.mlp(modulate(self.norm3(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch_values: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, patch_values)

    def forward(self, x, c):
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


@dataclass
class TextContext:
    """What a forward computes from the text alone: the same at every step a sampler takes over one
    batch, so a k-step sampler computes it once (VelocityNet.text_context) instead of k times."""
    pooled: torch.Tensor  # pooled_proj of the pooled text [B, width]
    mask: torch.Tensor  # [B, L] bool, after text dropout
    keys_values: list[torch.Tensor]  # each block's cross-attention kv of the projected tokens [B, L, 2 width]


class VelocityNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        problems = cfg.validate()
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))
        self.cfg = cfg
        w, p, ch = cfg.width, cfg.patch_size, cfg.in_channels
        self.patch_embed = nn.Conv2d(ch, w, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_2d(w, cfg.input_size // p), persistent=False)
        if cfg.time_embedding == "dual":
            self.t_end_embedder = TimestepEmbedder(w, cfg.time_scale)
            self.t_interval_embedder = TimestepEmbedder(w, cfg.time_scale, zero_output=True)
        else:
            self.t_embedder = TimestepEmbedder(w, cfg.time_scale)
        self.text_proj = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, w))
        self.pooled_proj = nn.Sequential(nn.Linear(cfg.text_dim, w), nn.SiLU(), nn.Linear(w, w))
        # The "no text" condition for classifier-free guidance: one learned token (so every
        # attention row keeps a key) and a learned pooled vector.
        self.null_token = nn.Parameter(torch.zeros(cfg.text_dim))
        self.null_pooled = nn.Parameter(torch.zeros(cfg.text_dim))
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalLayer(w, p * p * ch)
        self._init_weights()

    def _init_weights(self):
        # DiT's adaLN-Zero: every residual branch and the output start at zero, so the
        # network starts as the identity on its tokens and outputs zero velocity.
        zero = [self.final.linear, self.final.adaLN[1]]
        for block in self.blocks:
            zero += [block.adaLN[1], block.cross_attn.out]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.null_token, std=0.02)
        nn.init.normal_(self.null_pooled, std=0.02)

    @property
    def first_decoder_block(self) -> int:
        """Blocks from this one on (and the final layer) take the decoder's condition."""
        return self.cfg.depth - self.cfg.decoder_depth

    def condition(self, r: torch.Tensor, t: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the encoder's condition, the decoder's): one and the same but for the decoupled embedding.
        ``pooled``: the projected pooled text (TextContext.pooled)."""
        if self.cfg.time_embedding == "decoupled":
            return self.t_embedder(t) + pooled, self.t_embedder(r) + pooled
        if self.cfg.time_embedding == "dual":
            c = self.t_end_embedder(t) + self.t_interval_embedder(t - r)
        else:
            c = self.t_embedder(t)
        c = c + pooled
        return c, c

    def forward(self, z, r, t, text_tokens, text_mask, text_pooled, drop_text=None, tangent=None):
        """z: [B, C, H, W]; r, t: [B]; text_tokens: [B, L, text_dim]; text_mask: [B, L] bool;
        text_pooled: [B, text_dim]; drop_text: [B] bool, rows that get the null condition (CFG).

        ``tangent`` = (dz, dt) of the first rows returns (u, du) instead, du the derivative of those
        rows' u along (dz, 0, dt) without gradients: MeanFlow's fused step (emf_dist/model_jvp.py)."""
        if tangent is not None:
            return velocity_and_tangent(self, z, r, t, text_tokens, text_mask, text_pooled, drop_text, *tangent)
        return self.velocity(z, r, t, self.text_context(text_tokens, text_mask, text_pooled, drop_text, z.dtype))

    def text_context(self, text_tokens, text_mask, text_pooled, drop_text=None, dtype=torch.float32) -> TextContext:
        """The text's share of a forward, in ``dtype`` (the input's). Called outside forward, it reads the
        null condition's parameters directly: under ZeRO-3 only where every parameter is gathered."""
        # Text is stored in float16; compute it in the input's precision (float32 in the JVP pass).
        text_tokens, text_pooled = text_tokens.to(dtype), text_pooled.to(dtype)
        if drop_text is not None:
            text_tokens, text_mask, text_pooled = self.drop_text(text_tokens, text_mask, text_pooled, drop_text)
        text = self.text_proj(text_tokens)
        return TextContext(self.pooled_proj(text_pooled), text_mask, [block.cross_attn.kv(text) for block in self.blocks])

    def velocity(self, z, r, t, text: TextContext) -> torch.Tensor:
        """forward's u, given the text's share (text_context)."""
        x = self.patch_embed(z).flatten(2).transpose(1, 2) + self.pos_embed.to(z.dtype)
        c_encoder, c_decoder = self.condition(r, t, text.pooled)
        use_checkpoint = self.cfg.checkpointing and torch.is_grad_enabled()
        for index, block in enumerate(self.blocks):
            c = c_decoder if index >= self.first_decoder_block else c_encoder
            if use_checkpoint:
                x = checkpoint(block, x, c, text.keys_values[index], text.mask, use_reentrant=False)
            else:
                x = block(x, c, text.keys_values[index], text.mask)
        out = self.unpatchify(self.final(x, c_decoder))
        if self.cfg.prediction == "data":
            return (z - out) / t.clamp(min=self.cfg.data_min_t).view(-1, 1, 1, 1).to(z.dtype)
        return out

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, ch, side = self.cfg.patch_size, self.cfg.in_channels, self.cfg.input_size // self.cfg.patch_size
        x = x.view(x.shape[0], side, side, p, p, ch)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], ch, side * p, side * p)

    def drop_text(self, tokens, mask, pooled, drop: torch.Tensor):
        """Replace the text of rows where ``drop`` is True by the learned null condition.

        Done inside forward so that wrappers which gather parameters around forward
        (ZeRO-3) see the null parameters used."""
        null_tokens = torch.zeros_like(tokens)
        null_tokens[:, 0] = self.null_token.to(tokens.dtype)
        null_mask = torch.zeros_like(mask)
        null_mask[:, 0] = True
        keep = ~drop
        tokens = torch.where(keep[:, None, None], tokens, null_tokens)
        mask = torch.where(keep[:, None], mask, null_mask)
        pooled = torch.where(keep[:, None], pooled, self.null_pooled.to(pooled.dtype).expand_as(pooled))
        return tokens, mask, pooled


def sincos_2d(width: int, side: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding [side*side, width] (as in DiT / MAE)."""
    coords = torch.arange(side, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    parts = []
    for grid in (grid_y, grid_x):
        angles = grid.reshape(-1, 1) * omega[None]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":  # python -m emf_dist.model: parameter count of every preset
    for name in PRESETS:
        cfg = preset(name, input_size=32, patch_size=2)
        with torch.device("meta"):
            count = parameter_count(VelocityNet(cfg))
        print(f"{name:>5}: width {cfg.width:5d} depth {cfg.depth:3d} heads {cfg.heads:3d}  {count / 1e6:8.2f} M parameters")
