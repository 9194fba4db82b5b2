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

Two uses. Under no_grad it is the JVP pass of the two-pass step, in whatever dtype its inputs have
(the caller picks float32). With gradients on it is the fused step: the primal is the gradient
pass (its autograd graph, activation checkpointing included) and the tangent rides along it without
gradients, so the step's JVP costs the tangent alone, not a second primal. The tangents (dz, dt) may
then cover only the first rows of the batch (the rows with r != t), and every tangent rule reads
those rows of the primal.

Under ZeRO-3 (two-pass only) the parameters a piece of the pass reads are only present inside
``parameters_of(those parameters)``, a context the trainer supplies (it gathers them); the default
is the plain module. A module whose weights the pass reads itself is never also called (ZeRO-3
partitions them again after a forward).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import TYPE_CHECKING, Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from emf_dist.attention import attention, attention_and_tangent, attention_tangent

if TYPE_CHECKING:  # emf_dist.model calls this pass from its forward
    from emf_dist.model import Attention, Block, FinalLayer, TimestepEmbedder, VelocityNet

Pair = tuple[torch.Tensor, torch.Tensor]
# Given the parameters a piece of the pass is about to read, a context inside which they are present.
ParameterScope = Callable[[list[nn.Parameter]], ContextManager]


def _plain(parameters: list[nn.Parameter]) -> ContextManager:
    return contextlib.nullcontext()


def velocity_and_tangent(net: VelocityNet, z, r, t, text_tokens, text_mask, text_pooled, drop_text, dz, dt,
                         parameters_of: ParameterScope | None = None) -> Pair:
    """(u, du) of ``net`` at (z, r, t) along (dz, 0, dt); same arguments as VelocityNet.forward.
    dz and dt may cover the first rows only; du is then theirs. u carries gradients if they are on."""
    if torch.is_grad_enabled() and parameters_of is not None:
        raise ValueError("the fused pass reads whole weights: with partitioned parameters run it under no_grad")
    cfg, parameters_of = net.cfg, parameters_of or _plain
    top = [*net.parameters(recurse=False), *net.patch_embed.parameters(), *net.text_proj.parameters(),
           *net.pooled_proj.parameters()]
    run_block = _checkpointed_block if cfg.checkpointing and torch.is_grad_enabled() else _block
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
                x, dx = run_block(block, x, dx, c, dc, text, text_mask)
        with parameters_of(list(net.final.parameters())):
            out, d_out = _final(net.final, x, dx, *decoder)
        out, d_out = net.unpatchify(out), net.unpatchify(d_out)
    if cfg.prediction == "data":
        t_c = t.clamp(min=cfg.data_min_t).view(-1, 1, 1, 1).to(z.dtype)
        u = (z - out) / t_c
        return u, _d_data_prediction(d_out, dz, dt, u, t, t_c, cfg.data_min_t)
    return out, d_out


def _tangent_rule(rule):
    """A tangent rule: no gradients (the tangent is a stop-gradient target), and no tangent in, none
    out (the primal-only recomputation of a checkpointed block). Its primal arguments may hold more
    rows than the tangent: the rule reads the tangent's rows of them (``_rows``)."""
    @functools.wraps(rule)
    def apply(tangent, *args):
        if tangent is None:
            return None
        with torch.no_grad():
            return rule(tangent, *args)
    return apply


def _rows(primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    return primal[:tangent.shape[0]]


@_tangent_rule
def _d_data_prediction(d_out, dz, dt, u, t, t_c, floor):
    t_c = _rows(t_c, dz)
    dt_c = (dt * (_rows(t, dt) >= floor)).view(-1, 1, 1, 1).to(dz.dtype)
    return (dz - d_out) / t_c - _rows(u, dz) * dt_c / t_c


def _condition(net: VelocityNet, r, t, dt, pooled, parameters_of: ParameterScope) -> tuple[Pair, Pair]:
    """(c, dc) of the encoder and of the decoder, as VelocityNet.condition."""
    if net.cfg.time_embedding == "decoupled":
        with parameters_of(list(net.t_embedder.parameters())):
            c, dc = _timestep(net.t_embedder, t, dt)
            c_r, _ = _timestep(net.t_embedder, r, None)
        pooled = net.pooled_proj(pooled)
        return (c + pooled, dc), (c_r + pooled, torch.zeros_like(dc))
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
    cos, sin = torch.cos(angles), torch.sin(angles)
    weight_dtype = embedder.mlp[0].weight.dtype
    features = torch.cat([cos, sin], dim=-1).to(weight_dtype)
    h, dh = _linear(embedder.mlp[0], features, _d_features(ds, cos, sin, rate, weight_dtype))
    return _linear(embedder.mlp[2], *_silu(h, dh))


@_tangent_rule
def _d_features(ds, cos, sin, rate, dtype):
    d_angles = ds.to(rate.dtype)[:, None] * rate
    return torch.cat([-_rows(sin, ds) * d_angles, _rows(cos, ds) * d_angles], dim=-1).to(dtype)


def _block(block: Block, x, dx, c, dc, text, text_mask) -> Pair:
    mod, d_mod = _linear(block.adaLN[1], *_silu(c, dc))
    shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None] for m in mod.chunk(6, dim=-1))
    d_shift1, d_scale1, d_gate1, d_shift2, d_scale2, d_gate2 = _chunks(d_mod, 6)

    h, dh = _modulate(*_layer_norm(block.norm1, x, dx), shift1, d_shift1, scale1, d_scale1)
    a, da = _self_attention(block.self_attn, h, dh)
    x, dx = _gated_residual(x, dx, gate1, d_gate1, a, da)

    h, dh = _layer_norm(block.norm2, x, dx)
    a, da = _cross_attention(block.cross_attn, h, dh, text, text_mask)
    x, dx = x + a, _d_sum(dx, da)

    h, dh = _modulate(*_layer_norm(block.norm3, x, dx), shift2, d_shift2, scale2, d_scale2)
    h, dh = _gelu_tanh(*_linear(block.mlp[0], h, dh))
    a, da = _linear(block.mlp[2], h, dh)
    return _gated_residual(x, dx, gate2, d_gate2, a, da)


def _checkpointed_block(block: Block, x, dx, c, dc, text, text_mask) -> Pair:
    """``_block`` under activation checkpointing. The backward pass recomputes the primal only: the
    tangent, made without gradients, is not needed again, and the recomputation saves the same
    tensors either way (the tangent rules save none)."""
    tangents = [(dx, dc)]  # taken by the first run; the recomputation finds none

    def run(x, c, text):
        dx, dc = tangents.pop() if tangents else (None, None)
        return _block(block, x, dx, c, dc, text, text_mask)

    return checkpoint(run, x, c, text, use_reentrant=False)


def _chunks(tangent, count: int) -> tuple:
    if tangent is None:
        return (None,) * count
    return tuple(m[:, None] for m in tangent.chunk(count, dim=-1))


@_tangent_rule
def _d_sum(dx, da):
    return dx + da


def _final(final: FinalLayer, x, dx, c, dc) -> Pair:
    mod, d_mod = _linear(final.adaLN[1], *_silu(c, dc))
    shift, scale = (m[:, None] for m in mod.chunk(2, dim=-1))
    d_shift, d_scale = _chunks(d_mod, 2)
    h, dh = _modulate(*_layer_norm(final.norm, x, dx), shift, d_shift, scale, d_scale)
    return _linear(final.linear, h, dh)


def _self_attention(attn: Attention, x, dx) -> Pair:
    q, dq = _linear(attn.q, x, dx)
    kv, d_kv = _linear(attn.kv, x, dx)
    k, v = _keys_and_values(attn, kv)
    dk, dv = (None, None) if d_kv is None else _keys_and_values(attn, d_kv)
    y, dy = _attention(_heads(attn, q), k, v, _heads(attn, dq), dk, dv, None)
    return _linear(attn.out, _merge(y), _merge(dy))


def _cross_attention(attn: Attention, x, dx, text, text_mask) -> Pair:
    q, dq = _linear(attn.q, x, dx)
    k, v = _keys_and_values(attn, attn.kv(text))
    y, dy = _attention(_heads(attn, q), k, v, _heads(attn, dq), None, None, text_mask)
    return _linear(attn.out, _merge(y), _merge(dy))


def _heads(attn: Attention, a):  # None (no tangent) stays None, as in _merge
    if a is None:
        return None
    return a.view(a.shape[0], a.shape[1], attn.heads, -1).transpose(1, 2)


def _keys_and_values(attn: Attention, kv):
    return kv.view(kv.shape[0], kv.shape[1], 2, attn.heads, -1).permute(2, 0, 3, 1, 4)


def _merge(a):
    if a is None:
        return None
    return a.transpose(1, 2).reshape(a.shape[0], a.shape[2], -1)


def _attention(q, k, v, dq, dk, dv, key_mask) -> Pair:
    """Attention and its tangent. The JVP pass computes both in one blockwise sweep; the fused step
    takes the output from the fused kernel of the gradient pass (its backward holds no scores) and
    sweeps for the tangent alone."""
    if dq is None:
        return attention(q, k, v, key_mask), None
    if not torch.is_grad_enabled() and dq.shape[0] == q.shape[0]:
        return attention_and_tangent(q, k, v, dq, dk, dv, key_mask)
    out = attention(q, k, v, key_mask)
    return out, _d_attention(dq, q, k, v, out, dk, dv, key_mask)


@_tangent_rule
def _d_attention(dq, q, k, v, out, dk, dv, key_mask):
    mask = None if key_mask is None else _rows(key_mask, dq)
    return attention_tangent(_rows(q, dq), _rows(k, dq), _rows(v, dq), _rows(out, dq), dq, dk, dv, mask)


def _linear(layer: nn.Linear, x, dx) -> Pair:
    # Two GEMMs, not one over the stacked rows: on CPU the stacked GEMM is no faster and the
    # stacking copy costs time and a second copy of the input (docs/benchmarks.md).
    return F.linear(x, layer.weight, layer.bias), _d_linear(dx, layer.weight)


@_tangent_rule
def _d_linear(dx, weight):
    return F.linear(dx, weight)


def _patch_embed(conv: nn.Conv2d, z, dz) -> Pair:
    # Not conv(z): under ZeRO-3 a module's forward hook partitions its weights again on return.
    y = F.conv2d(z, conv.weight, conv.bias, stride=conv.stride)
    return y.flatten(2).transpose(1, 2), _d_patch_embed(dz, conv)


@_tangent_rule
def _d_patch_embed(dz, conv):
    return F.conv2d(dz, conv.weight, stride=conv.stride).flatten(2).transpose(1, 2)


def _silu(x, dx) -> Pair:
    return F.silu(x), _d_silu(dx, x)


@_tangent_rule
def _d_silu(dx, x):
    # An elementwise map's Jacobian is diagonal, so its backward kernel applied to dx is the tangent.
    return torch.ops.aten.silu_backward(dx, _rows(x, dx))


def _gelu_tanh(x, dx) -> Pair:
    return F.gelu(x, approximate="tanh"), _d_gelu_tanh(dx, x)


@_tangent_rule
def _d_gelu_tanh(dx, x):
    return torch.ops.aten.gelu_backward(dx, _rows(x, dx), approximate="tanh")


def _layer_norm(norm: nn.LayerNorm, x, dx) -> Pair:
    y, mean, inv_std = torch.native_layer_norm(x, norm.normalized_shape, None, None, norm.eps)
    dy = _d_layer_norm(dx, x, norm, mean, inv_std)
    if norm.weight is not None:
        y = torch.addcmul(norm.bias, y, norm.weight)
    return y, dy


@_tangent_rule
def _d_layer_norm(dx, x, norm, mean, inv_std):
    # Normalisation's Jacobian (I - 11^T/n - y y^T/n) / std is symmetric, so the fused backward kernel
    # (without the affine scale, applied after) gives the tangent from the primal's saved statistics.
    # The kernel wants the tangent in the input's dtype; under autocast they can differ.
    x = _rows(x, dx)
    dy = torch.ops.aten.native_layer_norm_backward(dx.to(x.dtype), x, norm.normalized_shape, _rows(mean, dx),
                                                   _rows(inv_std, dx), None, None, [True, False, False])[0]
    dy = dy.to(dx.dtype)
    return dy if norm.weight is None else dy * norm.weight


def _modulate(x, dx, shift, d_shift, scale, d_scale) -> Pair:
    one_plus = 1 + scale
    return torch.addcmul(shift, x, one_plus), _d_modulate(dx, x, one_plus, d_shift, d_scale)


@_tangent_rule
def _d_modulate(dx, x, one_plus, d_shift, d_scale):
    return torch.addcmul(torch.addcmul(d_shift, _rows(x, dx), d_scale), dx, _rows(one_plus, dx))


def _gated_residual(x, dx, gate, d_gate, a, da) -> Pair:
    return torch.addcmul(x, gate, a), _d_gated_residual(dx, d_gate, a, gate, da)


@_tangent_rule
def _d_gated_residual(dx, d_gate, a, gate, da):
    return torch.addcmul(torch.addcmul(dx, d_gate, _rows(a, dx)), _rows(gate, dx), da)
