"""The fused Triton JVP attention, run on CPU tensors under Triton's interpreter, against
forward-mode AD through math attention, and inside the model against the blockwise path.

Triton decides when it is imported whether @triton.jit functions (its own library's included)
are compiled or interpreted, and other packages in a pytest process (DeepSpeed, torch) may
import it first. So the kernel checks below run only where TRITON_INTERPRET=1 was set before
the process started; in an ordinary run, ``test_kernel_checks_pass_under_the_interpreter``
starts that process (pytest on this file) and reports its output. The interpreter is slow
(numpy, one program at a time): tiny shapes, with tiles of 16 so that every case still has
several query and key blocks, partial blocks and padded head dims.
"""

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (Linux: pip install -e '.[test]'), so the fused JVP attention "
                "kernel cannot run here", allow_module_level=True)

from emf_dist.attention import attention, attention_with_tangent, jvp_backend, math_attention  # noqa: E402
from emf_dist.meanflow import MeanFlowConfig, time_derivative  # noqa: E402
from emf_dist.model import VelocityNet  # noqa: E402
from tests.helpers import random_text, randomised, tiny_config  # noqa: E402

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
REPO = Path(__file__).resolve().parents[1]
in_interpreter = pytest.mark.skipif(not INTERPRETER, reason="kernel check: runs in the TRITON_INTERPRET=1 "
                                    "process that test_kernel_checks_pass_under_the_interpreter starts")


def test_kernel_checks_pass_under_the_interpreter():
    if INTERPRETER:
        pytest.skip("this process is the interpreter run: the checks run here directly")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = f"{proc.stdout[-8000:]}\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0, f"kernel checks under TRITON_INTERPRET=1 failed:\n{output}"
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    # Only this launcher may skip there: a child that skipped its checks would pass vacuously.
    assert re.search(r"\d+ passed, 1 skipped", summary), f"unexpected summary of the interpreter run: {summary!r}"


@pytest.fixture
def kernels():
    import emf_dist.triton_attention as module  # imports triton: only in the interpreter process

    assert module.INTERPRETED
    return module


@pytest.fixture
def calls(kernels, monkeypatch):
    """Counts launches of the fused kernel, so a test can tell which path ran."""
    count = [0]
    real = kernels.jvp_attention

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "jvp_attention", counting)
    return count


def _padding_mask(batch: int, n_k: int) -> torch.Tensor:
    """Row 0 keeps its first 3 keys (right padding); row 1 only keys from 17 on (left padding,
    so its whole first key tile is masked: the running max starts at -inf)."""
    keys = torch.arange(n_k)
    return torch.stack([keys < 3, keys >= min(17, n_k - 1)])[:batch]


def _inputs(shape_q, n_k, dtype, tangents, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, heads, n_q, head_dim = shape_q

    def make(n):
        return torch.randn(batch, heads, n, head_dim, generator=gen).to(dtype)

    q, k, v, dq, dk, dv = make(n_q), make(n_k), make(n_k), make(n_q), make(n_k), make(n_k)
    if tangents == "q":  # cross-attention: text keys and values carry no tangent
        dk = dv = None
    if tangents == "kv":
        dq = None
    return q, k, v, dq, dk, dv


def _forward_ad_of_math_attention(q, k, v, dq, dk, dv, mask):
    """The oracle, in float64 on the same (already rounded) inputs the kernel sees."""
    wide = lambda x, like: torch.zeros_like(like, dtype=torch.float64) if x is None else x.double()  # noqa: E731
    with fwAD.dual_level():
        out = math_attention(*(fwAD.make_dual(x.double(), wide(dx, x)) for x, dx in ((q, dq), (k, dk), (v, dv))), mask)
        return fwAD.unpack_dual(out)


# Error bound per dtype, relative to the largest reference entry. float32: sums are float32;
# bf16 / fp16: the inputs are exact, but P and P * dS are rounded to the input dtype before
# they multiply v (as in flash attention) and the outputs are stored in it.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}

CASES = {  # name: (q shape [B, H, Nq, d], Nk, tangents, masked)
    "self d16": ((2, 2, 37, 16), 37, "qkv", False),
    "self d8 masked": ((2, 2, 9, 8), 20, "qkv", True),  # d = 8 pads to a 16-wide tile
    "cross d72 masked": ((2, 2, 33, 72), 21, "q", True),  # DiT-XL's head size pads to 128
    "cross d64 masked long keys": ((2, 1, 20, 64), 45, "qkv", True),
    "tangents on keys and values only": ((1, 2, 12, 32), 20, "kv", False),
}


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_forward_ad_of_math_attention(kernels, case, dtype):
    shape_q, n_k, tangents, masked = CASES[case]
    q, k, v, dq, dk, dv = _inputs(shape_q, n_k, dtype, tangents)
    mask = _padding_mask(shape_q[0], n_k) if masked else None
    out, d_out = kernels.jvp_attention(q, k, v, dq, dk, dv, mask)
    assert out.dtype == d_out.dtype == dtype
    ref_out, ref_tangent = _forward_ad_of_math_attention(q, k, v, dq, dk, dv, mask)
    for got, ref in ((out, ref_out), (d_out, ref_tangent)):
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@in_interpreter
def test_fully_masked_row_gives_nan_like_the_blockwise_path(kernels):
    """The contract (attention.attention's docstring) is at least one key per row; a row without
    one comes out NaN in the kernel, the blockwise path and math attention alike."""
    q, k, v, dq, dk, dv = _inputs((2, 1, 5, 16), 20, torch.float32, "qkv")
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's 0/0 inside the interpreter
        out, d_out = kernels.jvp_attention(q, k, v, dq, dk, dv, mask)
    assert out[0].isnan().all() and d_out[0].isnan().all()
    ref_out, ref_tangent = _forward_ad_of_math_attention(q, k, v, dq, dk, dv, mask)
    blockwise_out, blockwise_tangent = attention_with_tangent(q, k, v, dq, dk, dv, mask)
    assert ref_out[0].isnan().all() and blockwise_out[0].isnan().all() and blockwise_tangent[0].isnan().all()
    torch.testing.assert_close(out[1].double(), ref_out[1], rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(d_out[1].double(), ref_tangent[1], rtol=2e-6, atol=2e-6)


@in_interpreter
def test_model_jvp_through_fused_kernel_equals_blockwise_path(kernels, calls):
    """du/dt of a tiny VelocityNet (self-attention with q, k, v tangents, text cross-attention
    with a padding mask and a dropped row), with attention's tangent from each path."""
    cfg = tiny_config()
    torch.manual_seed(0)
    net = randomised(VelocityNet(cfg))
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    velocity = torch.randn(z.shape, generator=gen)
    r, t = torch.tensor([0.1, 0.0, 0.3]), torch.tensor([0.6, 0.9, 0.4])
    text = random_text(3, 5, cfg.text_dim, seed=2)
    drop = torch.tensor([False, True, False])
    jvp = lambda: time_derivative(net, z, r, t, velocity, text, drop, MeanFlowConfig())  # noqa: E731

    with jvp_backend("blockwise"):
        blockwise = jvp()
    assert calls[0] == 0
    with jvp_backend("triton"):
        fused = jvp()
    assert calls[0] == 2 * cfg.depth  # self- and cross-attention in every block
    assert blockwise.abs().max() > 1e-2  # the randomised net has a real time dependence
    torch.testing.assert_close(fused, blockwise, rtol=1e-5, atol=1e-5 * blockwise.abs().max().item())


@in_interpreter
def test_auto_keeps_cpu_tensors_on_the_blockwise_path(kernels, calls):
    q, k, v, dq, dk, dv = _inputs((1, 2, 6, 8), 6, torch.float32, "qkv")
    with fwAD.dual_level():
        attention(fwAD.make_dual(q, dq), fwAD.make_dual(k, dk), fwAD.make_dual(v, dv))
    assert calls[0] == 0


def test_forced_kernel_refuses_where_gradients_flow_through_it():
    """The kernel has no backward; silently using it would drop attention from the gradient."""
    q, k, v, dq, dk, dv = _inputs((1, 2, 6, 8), 6, torch.float32, "qkv")
    q.requires_grad_(True)
    with jvp_backend("triton"), fwAD.dual_level(), pytest.raises(RuntimeError, match="no backward"):
        attention(fwAD.make_dual(q, dq), fwAD.make_dual(k, dk), fwAD.make_dual(v, dv))
