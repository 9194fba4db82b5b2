"""The JVP attention kernel alone, for benchmarks.gpu_step: its error against forward-AD math
attention, its time and memory against the other implementations, and its launch settings."""

from __future__ import annotations

import functools
import json

import torch
import torch.autograd.forward_ad as fwAD

from benchmarks.gpu_timing import cuda_seconds, failure, header, run_one, time_and_peak
from emf_dist.attention import attention_with_tangent, math_attention


def attention_inputs(batch, heads, n_q, n_k, head_dim, tangents="qkv", masked=False, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda n: torch.randn(batch, heads, n, head_dim, device="cuda", generator=gen)  # noqa: E731
    q, k, v, dq, dk, dv = make(n_q), make(n_k), make(n_k), make(n_q), make(n_k), make(n_k)
    if tangents == "q":  # text cross-attention: keys and values carry no tangent
        dk = dv = None
    mask = None
    if masked:  # each row keeps a different number of text tokens, at least one
        real = 1 + torch.arange(batch, device="cuda") * 37 % n_k
        mask = torch.arange(n_k, device="cuda")[None] < real[:, None]
    return (q, k, v, dq, dk, dv), mask


def forward_ad_math(q, k, v, dq, dk, dv, mask):
    zero = lambda x, like: torch.zeros_like(like) if x is None else x  # noqa: E731
    with torch.no_grad(), fwAD.dual_level():
        out = math_attention(fwAD.make_dual(q, dq), fwAD.make_dual(k, zero(dk, k)), fwAD.make_dual(v, zero(dv, v)), mask)
        primal, tangent = fwAD.unpack_dual(out)
    return primal, tangent


def implementations() -> dict:
    """name -> (input dtype, fn(q, k, v, dq, dk, dv, mask) -> (out, d_out))."""
    from emf_dist.triton_attention import jvp_attention

    def blockwise(*args):
        with torch.no_grad():
            return attention_with_tangent(*args)

    return {
        "math forward-AD fp32": (torch.float32, forward_ad_math),
        "blockwise fp32": (torch.float32, blockwise),
        "fused fp32 (3xTF32)": (torch.float32, functools.partial(jvp_attention, allow_tf32=False)),
        "fused fp32 (TF32)": (torch.float32, functools.partial(jvp_attention, allow_tf32=True)),
        "fused bf16": (torch.bfloat16, jvp_attention),
    }


def cast(tensors, dtype):
    return tuple(None if x is None else x.to(dtype) for x in tensors)


def run_accuracy(args) -> None:
    """Error of each implementation against forward-AD math attention in float64, relative to
    the largest reference entry (one number per output: the bound a test may assert)."""
    cases = {"self-attention, 1024 tokens, d 64": dict(n_q=1024, n_k=1024, head_dim=64),
             "self-attention, 1024 tokens, d 72": dict(n_q=1024, n_k=1024, head_dim=72),
             "cross-attention, 1024 x 77 masked, d 72": dict(n_q=1024, n_k=77, head_dim=72, tangents="q", masked=True)}
    print(header())
    print("\n| case | implementation | max error O / max abs O | max error dO / max abs dO |\n|---|---|---|---|")
    for label, case in cases.items():
        tensors, mask = attention_inputs(batch=4, heads=16, **case)
        for name, (dtype, fn) in implementations().items():
            low = cast(tensors, dtype)
            ref_out, ref_tangent = forward_ad_math(*cast(low, torch.float64), mask)  # same rounded inputs
            out, d_out = fn(*low, mask)
            errors = _relative_error(out, ref_out), _relative_error(d_out, ref_tangent)
            print(f"| {label} | {name} | {errors[0]:.2e} | {errors[1]:.2e} |", flush=True)


def run_attention(args) -> None:
    """Output + tangent of self-attention (all of q, k, v carry tangents), batch 1, 16 heads."""
    print(header())
    names = list(implementations())
    print(f"\nSelf-attention, batch 1, 16 heads of {args.head_dim}; seconds (peak MiB); OOM = out of memory.\n")
    print("| tokens | " + " | ".join(names) + " | speed-up vs math: fused 3xTF32 | fused bf16 |")
    print("|---" * (len(names) + 3) + "|")
    for tokens in args.tokens:
        tensors, _ = attention_inputs(1, 16, tokens, tokens, args.head_dim)
        cells, seconds = [], {}
        for name, (dtype, fn) in implementations().items():
            result = time_and_peak(functools.partial(fn, *cast(tensors, dtype), None), args.repeats)
            seconds[name] = None if result is None else result[0]
            cells.append("OOM" if result is None else f"{result[0]:.2e} ({result[1]:.0f})")
            torch.cuda.empty_cache()
        math = seconds["math forward-AD fp32"]
        speedups = [f"{math / seconds[name]:.1f}" if math and seconds[name] else "n/a"
                    for name in ("fused fp32 (3xTF32)", "fused bf16")]
        print(f"| {tokens} | " + " | ".join(cells + speedups) + " |", flush=True)


LAUNCHES = [(128, 32, 8, 2), (64, 16, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 4, 2),
            (64, 16, 8, 2), (64, 32, 4, 3), (32, 32, 4, 2)]  # (BLOCK_M, BLOCK_N, warps, stages)


def run_tune(args) -> None:
    """Kernel launch settings at 4k tokens, each timed and checked against float64 forward-AD
    math attention: what _block_sizes in triton_attention should pick. Each launch runs in its
    own process, since a launch that faults (an illegal address) poisons its CUDA context."""
    print(header())
    print("\n| dtype | head dim | BLOCK_M x BLOCK_N | warps | stages | seconds | max error O | max error dO |"
          "\n|---|---|---|---|---|---|---|---|")
    for head_dim in (64, 72):
        for dtype in ("bfloat16", "float32"):
            for block_m, block_n, warps, stages in LAUNCHES:
                spec = dict(head_dim=head_dim, dtype=dtype, launch=[block_m, block_n, warps, stages],
                            repeats=args.repeats)
                proc = run_one("tune", spec)
                lines = proc.stdout.strip().splitlines()
                if proc.returncode == 0 and lines:
                    cells = " | ".join(f"{x:.2e}" for x in json.loads(lines[-1]))
                else:  # shared memory or registers that do not fit, or a fault
                    cells = "fails: " + failure(proc, 100) + " | |"
                print(f"| {dtype} | {head_dim} | {block_m} x {block_n} | {warps} | {stages} | {cells} |", flush=True)


def tune_one(spec: dict) -> None:
    """The child of run_tune: one launch; prints [seconds, error of O, error of dO]."""
    from emf_dist.triton_attention import jvp_attention

    tensors, _ = attention_inputs(1, 16, 4096, 4096, spec["head_dim"])
    low = cast(tensors, getattr(torch, spec["dtype"]))
    block_m, block_n, warps, stages = spec["launch"]
    work = functools.partial(jvp_attention, *low, None, allow_tf32=False, block_m=block_m, block_n=block_n,
                             num_warps=warps, num_stages=stages)
    out, d_out = work()
    ref_out, ref_tangent = forward_ad_math(*cast(low, torch.float64), None)
    print(json.dumps([cuda_seconds(work, repeats=spec["repeats"]), _relative_error(out, ref_out),
                      _relative_error(d_out, ref_tangent)]))


def _relative_error(got, ref) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()
