"""Attention that works in both passes of the MeanFlow step.

The gradient pass uses the fused ``F.scaled_dot_product_attention``. The JVP pass runs under
forward-mode AD, where the fused kernels have no derivative (docs/findings.md §1). When any input
carries a forward-mode tangent we therefore compute the output *and* its tangent ourselves,
exactly, one block of queries at a time, so the N x N score matrix is never held for all
queries at once.

Tangent of softmax attention, with s the 1/sqrt(d) scale:

    S  = s q k^T + bias              P  = softmax(S)             O = P v
    dS = s (dq k^T + q dk^T)         dP = P * (dS - rowsum(P * dS))
    dO = dP v + P dv = (P * dS) v - rowsum(P * dS) * O + P dv

Masked keys have P = 0, so they contribute nothing to either term.

On CUDA the JVP pass uses the same tangent fused into one Triton kernel
(``emf_dist.triton_attention``) when triton is installed; ``jvp_backend`` forces either path.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

# Score-matrix elements per query block in the JVP pass (float32: 4 bytes each). Four such
# temporaries live at once, so 2M elements keep them under ~32 MiB whatever N is: small enough
# that the pass stays under the checkpointed gradient pass (whose fused attention holds no
# scores), large enough that the matmuls stay efficient (docs/benchmarks.md).
JVP_BLOCK_ELEMENTS = 2 * 1024 * 1024

JvpBackend = Literal["auto", "triton", "blockwise"]
# "auto": the fused Triton kernel for CUDA tensors when triton is installed and no gradient is
# needed through the result (the kernel has no backward), the blockwise tangent otherwise.
_jvp_backend: JvpBackend = "auto"


@contextlib.contextmanager
def jvp_backend(name: JvpBackend):
    """Force how ``attention`` computes tangents inside the block: "triton" (CPU tensors need
    Triton's interpreter, see emf_dist.triton_attention), "blockwise", or "auto"."""
    global _jvp_backend
    if name not in ("auto", "triton", "blockwise"):
        raise ValueError(f"unknown JVP attention backend {name!r}")
    previous, _jvp_backend = _jvp_backend, name
    try:
        yield
    finally:
        _jvp_backend = previous


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention. q: [B, H, Nq, d]; k, v: [B, H, Nk, d]; key_mask: [B, Nk] bool, True = attend.

    Every row of ``key_mask`` must keep at least one key (the model's null text token does).
    """
    q_p, dq = fwAD.unpack_dual(q)
    k_p, dk = fwAD.unpack_dual(k)
    v_p, dv = fwAD.unpack_dual(v)
    if dq is None and dk is None and dv is None:
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out, tangent = attention_and_tangent(q_p, k_p, v_p, dq, dk, dv, key_mask)
    return fwAD.make_dual(out, tangent)


def attention_and_tangent(q, k, v, dq, dk, dv, key_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and tangent of ``attention``: the fused Triton kernel where it applies, else blockwise.
    Any of dq, dk, dv may be None (no tangent)."""
    inputs = (q, k, v, dq, dk, dv)
    tangent_fn = _fused_jvp_attention() if _use_fused(inputs) else attention_with_tangent
    return tangent_fn(*inputs, key_mask)


def _use_fused(inputs) -> bool:
    q = inputs[0]
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    if _jvp_backend == "triton":
        if needs_grad:
            raise RuntimeError("the fused JVP attention has no backward: run the JVP pass under torch.no_grad()")
        return True
    if _jvp_backend == "blockwise" or needs_grad:
        return False
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and _triton_installed()


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _fused_jvp_attention():
    # Imported where first used, so that CPU runs never import triton.
    from emf_dist.triton_attention import jvp_attention

    return jvp_attention


def attention_with_tangent(q, k, v, dq, dk, dv, key_mask=None, block_size: int | None = None):
    """Output and exact tangent of softmax attention, blockwise over queries.

    Any of dq, dk, dv may be None (a zero tangent: text keys and values have none).
    Returns (out, d_out), both [B, H, Nq, d].
    """
    return _blockwise(q, k, v, None, dq, dk, dv, key_mask, block_size)


def attention_tangent(q, k, v, out, dq, dk, dv, key_mask=None, block_size: int | None = None) -> torch.Tensor:
    """The tangent alone, given the output ``out`` (from the gradient pass's fused attention): one
    matmul unit fewer than ``attention_with_tangent``, which computes P v as well."""
    return _blockwise(q, k, v, out, dq, dk, dv, key_mask, block_size)[1]


def _blockwise(q, k, v, out, dq, dk, dv, key_mask, block_size):
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    if block_size is None:
        block_size = max(1, JVP_BLOCK_ELEMENTS // max(1, batch * heads * n_k))
    bias = None
    if key_mask is not None:
        bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~key_mask, float("-inf"))[:, None, None, :]

    # The scale folded into the queries once (not into two N x N score matrices); fewer, taller
    # matmuls: s (dq k^T + q dk^T) = [s dq | s q] [k | dk]^T, and P v, P dv = P [v | dv].
    q = q * scale
    dq = None if dq is None else dq * scale
    k_t = k.transpose(-2, -1)
    score_keys = None if dk is None else torch.cat([k_t, dk.transpose(-2, -1)], dim=-2)
    if out is None:
        values = v if dv is None else torch.cat([v, dv], dim=-1)
    else:  # P v is known: only P dv is left to compute
        values = dv
    if block_size >= n_q:  # one block: no copies into the outputs
        return _block(q, dq, k_t, score_keys, v, values, bias, out)
    known = out is not None
    out = torch.empty_like(q) if out is None else out
    d_out = torch.empty_like(q)
    for start in range(0, n_q, block_size):
        rows = slice(start, min(start + block_size, n_q))
        block_out, d_out[:, :, rows] = _block(q[:, :, rows], None if dq is None else dq[:, :, rows], k_t, score_keys,
                                              v, values, bias, out[:, :, rows] if known else None)
        if not known:
            out[:, :, rows] = block_out
    return out, d_out


def _block(q, dq, k_t, score_keys, v, values, bias, out=None):
    """One block of queries, q and dq already scaled. ``score_keys`` is [k | dk]^T (None: dk = 0).
    Without ``out``, ``values`` is [v | dv] (or v: dv = 0); given ``out`` = P v, it is dv (or None)."""
    d = q.shape[-1]
    scores = torch.matmul(q, k_t)
    if bias is not None:
        scores.add_(bias)
    probs = torch.softmax(scores, dim=-1)
    del scores
    if out is None:
        both = torch.matmul(probs, values)
        out, d_out = both[..., :d], (None if both.shape[-1] == d else both[..., d:])
    else:
        d_out = None if values is None else torch.matmul(probs, values)
    d_out = torch.zeros_like(out) if d_out is None else d_out

    d_scores = None
    if score_keys is not None:
        queries = q if dq is None else torch.cat([dq, q], dim=-1)
        keys = score_keys[..., d:, :] if dq is None else score_keys
        d_scores = torch.matmul(queries, keys)
    elif dq is not None:
        d_scores = torch.matmul(dq, k_t)
    if d_scores is not None:
        weighted = d_scores.mul_(probs)  # P * dS, in place: d_scores is not needed again
        d_out = d_out + torch.matmul(weighted, v) - weighted.sum(-1, keepdim=True) * out
    return out, d_out


def math_attention(q, k, v, key_mask=None):
    """Plain ``softmax(q k^T / sqrt(d)) v``: slow, but differentiable in every mode (the test oracle)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)
