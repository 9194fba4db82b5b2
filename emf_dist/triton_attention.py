"""Attention output and its forward-mode tangent in one fused Triton kernel (the CUDA JVP path).

Fused attention kernels have no forward-mode AD (docs/findings.md §1). On CPU the JVP pass uses the
blockwise PyTorch tangent in ``emf_dist.attention``; on CUDA this kernel computes the same two
outputs in a single sweep over the keys with an online softmax, as flash attention computes O,
so neither the N x N scores nor their tangent are ever stored. With s = 1/sqrt(d):

    S  = s q k^T  (masked keys: -inf)      P = softmax(S)      O  = P v
    dS = s (dq k^T + q dk^T)                                   dO = P dv + (P * dS) v - O rowsum(P * dS)

Per block of query rows the kernel keeps the running row maximum m and four sums, each
rescaled by exp(m_old - m_new) whenever m grows:

    l = sum_j e_j                    e_j = exp(S_j - m)
    A = sum_j e_j v_j                               -> O = A / l
    T = sum_j e_j (dv_j + dS_j v_j)                 -> P dv + (P * dS) v = T / l
    r = sum_j e_j dS_j                              -> rowsum(P * dS) = r / l

and finishes with O = A / l, dO = (T - O r) / l. Products run in the input dtype on tensor
cores and every sum is float32. bf16 / fp16 products are exact in float32. float32 inputs use
3xTF32 (each operand split into two TF32 parts, three products: about float32 accuracy), or
plain TF32 where allowed; IEEE float32 dots are no option on sm_90 (compiled here without a GPU,
triton 3.9: kilobytes of register spills at head dim 64, and LLVM's SLP vectorizer aborts the
process at head dim 72). As in flash attention, P (and P * dS) is rounded to the input dtype
before it multiplies v.

A row whose keys are all masked has l = 0 and comes out NaN, as in the blockwise path and in
math attention (softmax over -inf only); the model never makes one (its null text token).

Tests run the kernel on CPU tensors under Triton's interpreter: TRITON_INTERPRET=1 must be set
before triton itself is imported, since @triton.jit decides at decoration time whether a function
(triton's own tl.zeros, tl.sum, ... included) is compiled or interpreted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _load_rows(base, rows, cols, row_stride, row_ok, col_ok):
    """A [rows, cols] tile of a row-major matrix (unit column stride); zeros outside it."""
    return tl.load(base + rows[:, None] * row_stride + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # The interpreter (triton 3.9) keeps bf16 as raw uint16 and multiplies those bits. Products
    # of bf16 or fp16 values are exact in float32, so upcasting first gives what tensor cores give.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _jvp_attention_kernel(
    q_ptr, k_ptr, v_ptr, dq_ptr, dk_ptr, dv_ptr, mask_ptr, o_ptr, do_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    sdq_b, sdq_h, sdq_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
    smask_b, so_b, so_h, so_n,
    heads, n_q, n_k, scale,
    HEAD_DIM: tl.constexpr, HAS_DQ: tl.constexpr, HAS_DK: tl.constexpr, HAS_DV: tl.constexpr, HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program: BLOCK_M query rows of one (batch, head).
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)  # int64: batch * stride can pass 2^31 elements
    h = (bh % heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)  # head_dim padded up to a power of two
    row_ok = rows < n_q
    col_ok = cols < HEAD_DIM
    # Scores are kept in log2 units so the exponentials are exp2 (one instruction on GPUs):
    # exp(S - m) = exp2((S - m) log2 e). The tangent dS stays in natural units.
    score_scale = scale * 1.4426950408889634

    q = _load_rows(q_ptr + b * sq_b + h * sq_h, rows, cols, sq_n, row_ok, col_ok)
    if HAS_DQ:
        dq = _load_rows(dq_ptr + b * sdq_b + h * sdq_h, rows, cols, sdq_n, row_ok, col_ok)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    r_i = tl.zeros([BLOCK_M], tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for start in range(0, n_k, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < n_k
        if HAS_MASK:
            key_ok = key_ok & (tl.load(mask_ptr + b * smask_b + keys, mask=key_ok, other=0) != 0)
        k = _load_rows(k_ptr + b * sk_b + h * sk_h, keys, cols, sk_n, key_ok, col_ok)
        v = _load_rows(v_ptr + b * sv_b + h * sv_h, keys, cols, sv_n, key_ok, col_ok)

        s = _dot(q, tl.trans(k), UPCAST, PRECISION) * score_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        ds = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_DQ:
            ds += _dot(dq, tl.trans(k), UPCAST, PRECISION)
        if HAS_DK:
            dk = _load_rows(dk_ptr + b * sdk_b + h * sdk_h, keys, cols, sdk_n, key_ok, col_ok)
            ds += _dot(q, tl.trans(dk), UPCAST, PRECISION)
        ds = ds * scale

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have met only masked keys so far still have m = -inf: shift them by 0, so
        # exp2(-inf - 0) = 0 rather than exp2(-inf + inf) = NaN poisons the sums.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - shift)
        p = tl.exp2(s - shift[:, None])
        p_ds = p * ds
        l_i = l_i * alpha + tl.sum(p, 1)
        r_i = r_i * alpha + tl.sum(p_ds, 1)
        p_lo = p.to(v.dtype)
        acc_o = acc_o * alpha[:, None] + _dot(p_lo, v, UPCAST, PRECISION)
        acc_t = acc_t * alpha[:, None] + _dot(p_ds.to(v.dtype), v, UPCAST, PRECISION)
        if HAS_DV:
            dv = _load_rows(dv_ptr + b * sdv_b + h * sdv_h, keys, cols, sdv_n, key_ok, col_ok)
            acc_t += _dot(p_lo, dv, UPCAST, PRECISION)
        m_i = m_new

    o = acc_o / l_i[:, None]
    d_o = (acc_t - o * r_i[:, None]) / l_i[:, None]
    out_offsets = b * so_b + h * so_h + rows[:, None] * so_n + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    tl.store(o_ptr + out_offsets, o.to(o_ptr.dtype.element_ty), mask=out_ok)
    tl.store(do_ptr + out_offsets, d_o.to(do_ptr.dtype.element_ty), mask=out_ok)


INTERPRETED = type(_jvp_attention_kernel).__name__ == "InterpretedFunction"


def jvp_attention(q, k, v, dq=None, dk=None, dv=None, key_mask=None, *, allow_tf32: bool | None = None,
                  block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                  num_stages: int = 2):
    """Attention output and its tangent, fused; the contract of ``attention.attention_with_tangent``.

    q, dq: [B, H, Nq, d]; k, v, dk, dv: [B, H, Nk, d]; key_mask: [B, Nk] bool, True = attend.
    Any tangent may be None (zero: text keys and values carry none). All tensors share one dtype
    (float16, bfloat16 or float32) and one device. Returns (out, d_out), both [B, H, Nq, d].
    ``allow_tf32`` lets float32 products use one TF32 product (10 mantissa bits) instead of
    3xTF32; None follows ``torch.backends.cuda.matmul.allow_tf32``, as PyTorch's own float32
    matmuls in the pass do. Launch settings default to ``_block_sizes``; pass them to tune.
    No backward: use it under torch.no_grad() (the JVP pass of the MeanFlow step).
    """
    _check(q, k, v, dq, dk, dv, key_mask)
    q, k, v, dq, dk, dv = (None if x is None else _unit_column_stride(x) for x in (q, k, v, dq, dk, dv))
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    default_m, default_n, default_warps = _block_sizes(head_dim, q.dtype)
    block_m, block_n, num_warps = block_m or default_m, block_n or default_n, num_warps or default_warps
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    d_out = torch.empty_like(out)
    mask = None if key_mask is None else key_mask.contiguous().view(torch.uint8)
    stand_in = q  # the kernel never reads a pointer whose HAS_* flag is off

    grid = (triton.cdiv(n_q, block_m), batch * heads)
    _jvp_attention_kernel[grid](
        q, k, v, _or(dq, stand_in), _or(dk, stand_in), _or(dv, stand_in), _or(mask, stand_in), out, d_out,
        *_strides(q), *_strides(k), *_strides(v), *_strides(_or(dq, q)), *_strides(_or(dk, k)), *_strides(_or(dv, v)),
        0 if mask is None else mask.stride(0), *_strides(out),
        heads, n_q, n_k, head_dim ** -0.5,
        HEAD_DIM=head_dim, HAS_DQ=dq is not None, HAS_DK=dk is not None, HAS_DV=dv is not None,
        HAS_MASK=mask is not None,
        UPCAST=INTERPRETED, PRECISION="tf32" if allow_tf32 else "tf32x3",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_padded_head_dim(head_dim),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, d_out


def _check(q, k, v, dq, dk, dv, key_mask):
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the fused JVP attention takes {SUPPORTED_DTYPES}, got {q.dtype}")
    if q.dim() != 4 or k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"expected q [B, H, Nq, d] and k, v [B, H, Nk, d]; got {tuple(q.shape)}, {tuple(k.shape)}")
    for name, x, like in (("k", k, q), ("v", v, k), ("dq", dq, q), ("dk", dk, k), ("dv", dv, k)):
        if x is None:
            continue
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name} is {x.dtype} on {x.device}; q is {q.dtype} on {q.device}: all must match")
        if name != "k" and x.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(like.shape)}")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (k.shape[0], k.shape[2])):
        raise ValueError(f"key_mask must be bool [B, Nk] = {(k.shape[0], k.shape[2])}, "
                         f"got {key_mask.dtype} {tuple(key_mask.shape)}")
    if q.shape[0] * q.shape[1] > 65535:  # CUDA's limit on the grid's second axis, which runs over (B, H)
        raise ValueError(f"batch * heads = {q.shape[0] * q.shape[1]} exceeds 65535: split the batch")
    if not INTERPRETED and not q.is_cuda:
        raise RuntimeError("the fused JVP attention runs on CUDA tensors; on CPU only under Triton's interpreter "
                           "(TRITON_INTERPRET=1 set before triton is first imported)")


def _block_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). Two float32 [BLOCK_M, d] accumulators, q and dq and four
    [BLOCK_M, BLOCK_N] tiles live in registers, about twice flash attention's forward. Chosen by
    timing each launch on an H200 (``python -m benchmarks.gpu_step tune``, docs/benchmarks.md):
    the fastest that compiles at each head size. float32 (3xTF32) never takes BLOCK_M 64 with 8
    warps: on triton 3.6 for sm_90 that launch faults with an illegal memory access, which ends
    the process's CUDA context; at head dim 72 a 128 x 32 tile exceeds the shared memory."""
    if INTERPRETED:
        return 16, 16, 4  # small tiles: the interpreter's cost is per element, and tests see several blocks
    wide = _padded_head_dim(head_dim) > 64
    if dtype == torch.float32:
        return (64, 16, 4) if wide else (128, 32, 8)
    return (64, 32, 4) if wide else (64, 64, 4)


def _padded_head_dim(head_dim: int) -> int:
    # tl.arange needs a power of two and tl.dot at least 16. DiT-XL's 72 pads to 128: the padded
    # columns are loaded as zeros and cost products, not accuracy.
    return max(16, triton.next_power_of_2(head_dim))


def _unit_column_stride(x: torch.Tensor) -> torch.Tensor:
    # The kernel addresses head_dim with stride 1; the model's q, k, v (views of a Linear's
    # output) already have it, so this copies only unusual layouts.
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _or(x, fallback):
    return fallback if x is None else x
