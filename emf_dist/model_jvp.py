"""The MeanFlow JVP pass of our DiT, written by hand: primal and tangent computed together.

    u, du = velocity_and_tangent(net, z, r, t, tokens, mask, pooled, drop, dz, dt)

is ``net(z, r, t, ...)`` of emf_dist.model.VelocityNet and its directional derivative along the
tangents (dz, 0, dt) of (z, r, t): what forward-mode AD computes (it stays the generic path and
the oracle, tests/test_model_jvp.py). Forward-mode AD pays for every elementwise op's derivative
formula on dual tensors; here each module's tangent rule is written out once, so the pass costs
about one forward for the primal plus one for the tangent, the rest being elementwise work.

The rules, module by module (a tangent is written d.):
  * Linear / patch conv:  y = W x + b,  dy = W dx.
  * Sinusoidal time features of s:  d cos(a s) = -a sin(a s) ds,  d sin(a s) = a cos(a s) ds;
    the end time t carries dt, the interval t - r carries dt too (r has no tangent, so the decoupled
    embedding's decoder condition, phi(r), has none).
  * SiLU, GELU: dy = f'(x) dx, which is what their backward kernels compute from dx (a diagonal
    Jacobian is its own transpose).
  * LayerNorm:  y = (x - mean) / s,  dy = (dx - mean(dx) - y mean(y dx)) / s  (then the affine
    scale): the Jacobian is symmetric, so its backward kernel gives dy from the saved mean and 1/s.
  * adaLN modulation:  y = x (1 + scale) + shift,  dy = dx (1 + scale) + x dscale + dshift.
  * Gated residual:  x + g a,  d = dx + dg a + g da.
  * Attention: emf_dist.attention.attention_and_tangent (blockwise over queries on CPU, the fused
    Triton kernel on CUDA). Text keys and values carry no tangent.
  * Data prediction u = (z - x) / max(t, m):  du = (dz - dx) / max(t, m) - u dt [t >= m] / max(t, m).

Runs under no_grad in whatever dtype its inputs have (the caller picks float32). Under ZeRO-3 the
parameters a piece of the pass reads are only present inside ``parameters_of(those parameters)``,
a context the trainer supplies (it gathers them); the default is the plain module. A module whose
weights the pass reads itself is never also called (ZeRO-3 partitions them again after a forward).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

from emf_dist.attention import attention_and_tangent
from emf_dist.model import Attention, Block, FinalLayer, TimestepEmbedder, VelocityNet

Pair = tuple[torch.Tensor, torch.Tensor]
# Given the parameters a piece of the pass is about to read, a context inside which they are present.
ParameterScope = Callable[[list[nn.Parameter]], ContextManager]


def _plain(parameters: list[nn.Parameter]) -> ContextManager:
    return contextlib.nullcontext()


@torch.no_grad()
def velocity_and_tangent(net: VelocityNet, z, r, t, text_tokens, text_mask, text_pooled, drop_text, dz, dt,
                         parameters_of: ParameterScope | None = None) -> Pair:
    """(u, du) of ``net`` at (z, r, t) along (dz, 0, dt); same arguments as VelocityNet.forward."""
    cfg, parameters_of = net.cfg, parameters_of or _plain
    top = [*net.parameters(recurse=False), *net.patch_embed.parameters(), *net.text_proj.parameters(),
           *net.pooled_proj.parameters()]
    with parameters_of(top):  # the null condition, patch embedding, text projections
        text_tokens, text_pooled = text_tokens.to(z.dtype), text_pooled.to(z.dtype)
        if drop_text is not None:
            text_tokens, text_mask, text_pooled = net.drop_text(text_tokens, text_mask, text_pooled, drop_text)
        x, dx = _patch_embed(net.patch_embed, z, dz)
        x = x + net.pos_embed.to(z.dtype)
        encoder, decoder = _condition(net, r, t, dt, text_pooled, parameters_of)
        text = net.text_proj(text_tokens)
        for index, block in enumerate(net.blocks):
            c, dc = decoder if index >= net.first_decoder_block else encoder
            with parameters_of(list(block.parameters())):
                x, dx = _block(block, x, dx, c, dc, text, text_mask)
        with parameters_of(list(net.final.parameters())):
            out, d_out = _final(net.final, x, dx, *decoder)
        out, d_out = net.unpatchify(out), net.unpatchify(d_out)
    if cfg.prediction == "data":
        floor = cfg.data_min_t
        t_c = t.clamp(min=floor).view(-1, 1, 1, 1).to(z.dtype)
        dt_c = (dt * (t >= floor)).view(-1, 1, 1, 1).to(z.dtype)
        u = (z - out) / t_c
        return u, (dz - d_out) / t_c - u * dt_c / t_c
    return out, d_out


def _condition(net: VelocityNet, r, t, dt, pooled, parameters_of: ParameterScope) -> tuple[Pair, Pair]:
    """(c, dc) of the encoder and of the decoder, as VelocityNet.condition."""
    if net.cfg.time_embedding == "decoupled":
        with parameters_of(list(net.t_embedder.parameters())):
            c, dc = _timestep(net.t_embedder, t, dt)
            c_r, _ = _timestep(net.t_embedder, r, torch.zeros_like(r))
        pooled = net.pooled_proj(pooled)
        return (c + pooled, dc), (c_r + pooled, torch.zeros_like(c_r))
    if net.cfg.time_embedding == "dual":
        with parameters_of(list(net.t_end_embedder.parameters())):
            c, dc = _timestep(net.t_end_embedder, t, dt)
        with parameters_of(list(net.t_interval_embedder.parameters())):
            c_gap, dc_gap = _timestep(net.t_interval_embedder, t - r, dt)
        c, dc = c + c_gap, dc + dc_gap
    else:
        with parameters_of(list(net.t_embedder.parameters())):
            c, dc = _timestep(net.t_embedder, t, dt)
    c = c + net.pooled_proj(pooled)
    return (c, dc), (c, dc)


def _timestep(embedder: TimestepEmbedder, s, ds) -> Pair:
    half = embedder.frequencies // 2
    dtype = torch.promote_types(s.dtype, torch.float32)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=s.device, dtype=dtype) / half)
    rate = embedder.scale * freqs[None]
    angles = s.to(dtype)[:, None] * rate
    d_angles = ds.to(dtype)[:, None] * rate
    cos, sin = torch.cos(angles), torch.sin(angles)
    features = torch.cat([cos, sin], dim=-1)
    d_features = torch.cat([-sin * d_angles, cos * d_angles], dim=-1)
    weight_dtype = embedder.mlp[0].weight.dtype
    h, dh = _linear(embedder.mlp[0], features.to(weight_dtype), d_features.to(weight_dtype))
    return _linear(embedder.mlp[2], *_silu(h, dh))


def _block(block: Block, x, dx, c, dc, text, text_mask) -> Pair:
    mod, d_mod = _linear(block.adaLN[1], *_silu(c, dc))
    shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None] for m in mod.chunk(6, dim=-1))
    d_shift1, d_scale1, d_gate1, d_shift2, d_scale2, d_gate2 = (m[:, None] for m in d_mod.chunk(6, dim=-1))

    h, dh = _modulate(*_layer_norm(block.norm1, x, dx), shift1, d_shift1, scale1, d_scale1)
    a, da = _self_attention(block.self_attn, h, dh)
    x, dx = _gated_residual(x, dx, gate1, d_gate1, a, da)

    h, dh = _layer_norm(block.norm2, x, dx)
    a, da = _cross_attention(block.cross_attn, h, dh, text, text_mask)
    x, dx = x + a, dx + da

    h, dh = _modulate(*_layer_norm(block.norm3, x, dx), shift2, d_shift2, scale2, d_scale2)
    h, dh = _gelu_tanh(*_linear(block.mlp[0], h, dh))
    a, da = _linear(block.mlp[2], h, dh)
    return _gated_residual(x, dx, gate2, d_gate2, a, da)


def _final(final: FinalLayer, x, dx, c, dc) -> Pair:
    mod, d_mod = _linear(final.adaLN[1], *_silu(c, dc))
    (shift, scale), (d_shift, d_scale) = ((m[:, None] for m in pair.chunk(2, dim=-1)) for pair in (mod, d_mod))
    h, dh = _modulate(*_layer_norm(final.norm, x, dx), shift, d_shift, scale, d_scale)
    return _linear(final.linear, h, dh)


def _self_attention(attn: Attention, x, dx) -> Pair:
    batch, n, width = x.shape
    q, dq = _linear(attn.q, x, dx)
    kv, d_kv = _linear(attn.kv, x, dx)
    heads = lambda a: a.view(batch, n, attn.heads, -1).transpose(1, 2)  # noqa: E731
    k, v = kv.view(batch, n, 2, attn.heads, -1).permute(2, 0, 3, 1, 4)
    dk, dv = d_kv.view(batch, n, 2, attn.heads, -1).permute(2, 0, 3, 1, 4)
    y, dy = attention_and_tangent(heads(q), k, v, heads(dq), dk, dv)
    merge = lambda a: a.transpose(1, 2).reshape(batch, n, width)  # noqa: E731
    return _linear(attn.out, merge(y), merge(dy))


def _cross_attention(attn: Attention, x, dx, text, text_mask) -> Pair:
    batch, n, width = x.shape
    q, dq = _linear(attn.q, x, dx)
    heads = lambda a: a.view(batch, n, attn.heads, -1).transpose(1, 2)  # noqa: E731
    k, v = attn.kv(text).view(batch, text.shape[1], 2, attn.heads, -1).permute(2, 0, 3, 1, 4)
    y, dy = attention_and_tangent(heads(q), k, v, heads(dq), None, None, text_mask)
    merge = lambda a: a.transpose(1, 2).reshape(batch, n, width)  # noqa: E731
    return _linear(attn.out, merge(y), merge(dy))


def _linear(layer: nn.Linear, x, dx) -> Pair:
    # Two GEMMs, not one over the stacked rows: on CPU the stacked GEMM is no faster and the
    # stacking copy costs time and a second copy of the input (docs/benchmarks.md).
    return F.linear(x, layer.weight, layer.bias), F.linear(dx, layer.weight)


def _patch_embed(conv: nn.Conv2d, z, dz) -> Pair:
    # Not conv(z): under ZeRO-3 a module's forward hook partitions its weights again on return.
    y, dy = F.conv2d(z, conv.weight, conv.bias, stride=conv.stride), F.conv2d(dz, conv.weight, stride=conv.stride)
    return y.flatten(2).transpose(1, 2), dy.flatten(2).transpose(1, 2)


def _silu(x, dx) -> Pair:
    # An elementwise map's Jacobian is diagonal, so its backward kernel applied to dx is the tangent.
    return F.silu(x), torch.ops.aten.silu_backward(dx, x)


def _gelu_tanh(x, dx) -> Pair:
    return F.gelu(x, approximate="tanh"), torch.ops.aten.gelu_backward(dx, x, approximate="tanh")


def _layer_norm(norm: nn.LayerNorm, x, dx) -> Pair:
    # Normalisation's Jacobian (I - 11^T/n - y y^T/n) / std is symmetric, so the fused backward kernel
    # (without the affine scale, applied after) gives the tangent from the primal's saved statistics.
    y, mean, inv_std = torch.native_layer_norm(x, norm.normalized_shape, None, None, norm.eps)
    dy = torch.ops.aten.native_layer_norm_backward(dx, x, norm.normalized_shape, mean, inv_std, None, None,
                                                   [True, False, False])[0]
    if norm.weight is not None:
        y, dy = torch.addcmul(norm.bias, y, norm.weight), dy * norm.weight
    return y, dy


def _modulate(x, dx, shift, d_shift, scale, d_scale) -> Pair:
    one_plus = 1 + scale
    return torch.addcmul(shift, x, one_plus), torch.addcmul(torch.addcmul(d_shift, x, d_scale), dx, one_plus)


def _gated_residual(x, dx, gate, d_gate, a, da) -> Pair:
    return torch.addcmul(x, gate, a), torch.addcmul(torch.addcmul(dx, d_gate, a), gate, da)
