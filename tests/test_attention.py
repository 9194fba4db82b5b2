"""The blockwise JVP attention against forward-mode AD through plain math attention."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from emf_dist.attention import attention, attention_tangent, attention_with_tangent, math_attention


def _inputs(batch, heads, n_q, n_k, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda n: torch.randn(batch, heads, n, head_dim, generator=gen, dtype=torch.float64)  # noqa: E731
    return make(n_q), make(n_k), make(n_k), make(n_q), make(n_k), make(n_k)


def _mask(batch, n_k):
    real = 1 + (torch.arange(batch) * 3) % n_k
    return torch.arange(n_k)[None] < real[:, None]


def _reference(q, k, v, dq, dk, dv, mask):
    with fwAD.dual_level():
        out = math_attention(fwAD.make_dual(q, dq), fwAD.make_dual(k, dk), fwAD.make_dual(v, dv), mask)
        primal, tangent = fwAD.unpack_dual(out)
    return primal, tangent


@pytest.mark.parametrize("head_dim", [4, 16, 64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("block_size", [1, 5, None])
def test_blockwise_tangent_equals_forward_ad_of_math_attention(head_dim, masked, block_size):
    q, k, v, dq, dk, dv = _inputs(2, 3, 13, 11, head_dim)
    mask = _mask(2, 11) if masked else None
    out, d_out = attention_with_tangent(q, k, v, dq, dk, dv, mask, block_size=block_size)
    ref_out, ref_tangent = _reference(q, k, v, dq, dk, dv, mask)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_out, ref_tangent, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("block_size", [1, 5, None])
@pytest.mark.parametrize("key_tangents", [True, False])
def test_tangent_given_the_output_equals_forward_ad(masked, block_size, key_tangents):
    """The fused step's sweep: the output comes from the gradient pass, the tangent alone from here."""
    q, k, v, dq, dk, dv = _inputs(2, 3, 13, 11, 16)
    mask = _mask(2, 11) if masked else None
    if not key_tangents:
        dk, dv = None, None
    ref_out, ref_tangent = _reference(q, k, v, dq, torch.zeros_like(k) if dk is None else dk,
                                      torch.zeros_like(v) if dv is None else dv, mask)
    d_out = attention_tangent(q, k, v, ref_out.clone(), dq, dk, dv, mask, block_size=block_size)
    torch.testing.assert_close(d_out, ref_tangent, rtol=1e-10, atol=1e-10)


def test_missing_tangents_count_as_zero():
    """Cross-attention: keys and values come from text and carry no tangent."""
    q, k, v, dq, _, _ = _inputs(2, 2, 9, 7, 8)
    mask = _mask(2, 7)
    _, d_out = attention_with_tangent(q, k, v, dq, None, None, mask)
    _, ref = _reference(q, k, v, dq, torch.zeros_like(k), torch.zeros_like(v), mask)
    torch.testing.assert_close(d_out, ref, rtol=1e-10, atol=1e-10)


def test_dispatch_uses_fused_kernel_without_tangents_and_jvp_path_with_them():
    q, k, v, dq, dk, dv = _inputs(2, 2, 6, 5, 8)
    mask = _mask(2, 5)
    plain = attention(q, k, v, mask)
    torch.testing.assert_close(plain, F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None]))
    # F.scaled_dot_product_attention itself refuses forward-mode AD on CPU (docs/findings.md §1) in
    # some versions; ours must always work, and agree with the math reference.
    with fwAD.dual_level():
        out = attention(fwAD.make_dual(q, dq), fwAD.make_dual(k, dk), fwAD.make_dual(v, dv), mask)
        primal, tangent = fwAD.unpack_dual(out)
    ref_out, ref_tangent = _reference(q, k, v, dq, dk, dv, mask)
    torch.testing.assert_close(primal, ref_out)
    torch.testing.assert_close(tangent, ref_tangent)


def test_tangent_matches_central_finite_difference():
    """An oracle independent of autograd altogether."""
    q, k, v, dq, dk, dv = _inputs(1, 2, 5, 4, 8, seed=3)
    mask = _mask(1, 4)
    _, d_out = attention_with_tangent(q, k, v, dq, dk, dv, mask)
    eps = 1e-6
    ahead = math_attention(q + eps * dq, k + eps * dk, v + eps * dv, mask)
    behind = math_attention(q - eps * dq, k - eps * dk, v - eps * dv, mask)
    torch.testing.assert_close(d_out, (ahead - behind) / (2 * eps), rtol=1e-6, atol=1e-8)
