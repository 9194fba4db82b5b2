"""GPU measurements for the fused JVP attention and the MeanFlow step (issue 7). CUDA only.

    python -m benchmarks.gpu_step accuracy     # fused kernel vs forward-AD math attention: error bounds
    python -m benchmarks.gpu_step attention    # time and peak memory, 256 .. 16k tokens
    python -m benchmarks.gpu_step tune         # block sizes / warps of the fused kernel at 4k tokens
    python -m benchmarks.gpu_step step         # MeanFlow vs flow-matching step, DiT-B/256 and DiT-XL/1024
    python -m benchmarks.gpu_step step --compile   # the same, gradient pass under torch.compile
    python -m benchmarks.gpu_step compile      # no GPU needed: ptxas's registers / spills for sm_90a

Each prints a markdown table for docs/benchmarks.md, headed by the device and versions. Each
part is sized to fit one 10-minute command on a lent H100 (estimated, not yet run on one);
``step --case B`` / ``--case XL`` split the step part, which --compile lengthens most.

Conventions. Times are CUDA-event medians after warm-up; peak memory is the allocator's peak
minus what was allocated before the call. The step is optimizer step included, bf16 autocast
for the gradient pass, activation checkpointing on, the JVP pass as MeanFlowConfig says (float32
by default). Model FLOPs are counted with torch's FLOP formulas (``ModelFlops``) on one real
step with checkpointing off (recomputation is not model work) and the blockwise JVP attention
(whose six matmuls per block are the fused kernel's six), so the JVP pass's tangent matmuls
count in full; MFU divides them by the step time and the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from emf_dist.attention import attention_with_tangent, jvp_backend, math_attention
from emf_dist.meanflow import MeanFlowConfig, MeanFlowLoss, time_derivative
from emf_dist.model import VelocityNet, parameter_count, preset
from emf_dist.time_sampling import TimeSamplerConfig

# Dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
             "A100": 312e12, "L40S": 362e12}


def require_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks.gpu_step measures the CUDA path and needs a CUDA device; this machine has none. "
                 "CPU figures: python -m benchmarks.jvp_attention / python -m benchmarks.meanflow_step")
    try:
        import emf_dist.triton_attention  # noqa: F401
    except ImportError as error:
        sys.exit(f"benchmarks.gpu_step needs triton (it comes with CUDA builds of torch): {error}")


def header() -> str:
    import triton

    return (f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"triton {triton.__version__}. Command: python -m benchmarks.gpu_step {' '.join(sys.argv[1:])}")


# ---------------------------------------------------------------------------------------------
# Timing and memory


def cuda_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def peak_mib(fn) -> float:
    """The allocator's peak during one call, minus what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def time_and_peak(work, repeats: int, warmup: int = 2) -> tuple[float, float] | None:
    """(median seconds, peak MiB) of ``work()``; None where the GPU ran out of memory (math
    attention at 16k tokens)."""
    try:
        return cuda_seconds(work, repeats, warmup), peak_mib(work)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


# ---------------------------------------------------------------------------------------------
# The attention kernel alone


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
            rel = lambda got, ref: ((got.double() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
            print(f"| {label} | {name} | {rel(out, ref_out):.2e} | {rel(d_out, ref_tangent):.2e} |", flush=True)


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


LAUNCHES = [(128, 32, 8, 2), (64, 32, 8, 2), (64, 16, 4, 2), (64, 16, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2),
            (64, 32, 4, 3), (32, 32, 4, 2)]  # (BLOCK_M, BLOCK_N, warps, stages); the defaults come first


def run_tune(args) -> None:
    """Kernel launch settings at 4k tokens: what _block_sizes in triton_attention should pick."""
    from emf_dist.triton_attention import jvp_attention

    print(header())
    print("\n| dtype | head dim | BLOCK_M x BLOCK_N | warps | stages | seconds |\n|---|---|---|---|---|---|")
    for head_dim in (64, 72):
        tensors, _ = attention_inputs(1, 16, 4096, 4096, head_dim)
        for dtype in (torch.bfloat16, torch.float32):
            low = cast(tensors, dtype)
            for block_m, block_n, warps, stages in LAUNCHES:
                work = functools.partial(jvp_attention, *low, None, block_m=block_m, block_n=block_n,
                                         num_warps=warps, num_stages=stages)
                try:
                    cell = f"{cuda_seconds(work, repeats=args.repeats):.2e}"
                except Exception as error:  # a launch that does not fit (shared memory, registers)
                    cell = f"fails: {type(error).__name__}"
                print(f"| {dtype} | {head_dim} | {block_m} x {block_n} | {warps} | {stages} | {cell} |", flush=True)


# ---------------------------------------------------------------------------------------------
# The training step


@dataclass
class StepCase:
    label: str
    model: str  # a preset of emf_dist.model
    input_size: int  # latent side: tokens = (input_size / 2)^2
    batch: int


CASES = [StepCase("DiT-B/2, 256 tokens", "B", 32, 256), StepCase("DiT-XL/2, 1024 tokens", "XL", 64, 64)]
TEXT_LEN, TEXT_DIM = 77, 1024  # a padded caption of up to 77 tokens from a 1024-wide text encoder


@dataclass
class Variant:
    label: str
    r_neq_t: float  # 0: flow matching (no JVP pass)
    jvp: str = "fp32"  # "fp32", "tf32" (float32 pass, TF32 matmuls) or "bf16" (the pass under bf16 autocast)
    backend: str = "auto"  # JVP attention: "auto" (fused on CUDA) or "blockwise"


VARIANTS = [Variant("flow matching", 0.0), Variant("MeanFlow 25% r!=t, JVP fp32", 0.25),
            Variant("MeanFlow 25% r!=t, JVP tf32", 0.25, jvp="tf32"),
            Variant("MeanFlow 25% r!=t, JVP bf16", 0.25, jvp="bf16"),
            Variant("MeanFlow 25% r!=t, JVP fp32, blockwise attention", 0.25, backend="blockwise"),
            Variant("MeanFlow 75% r!=t, JVP fp32", 0.75)]


def build(case: StepCase, checkpointing: bool):
    torch.manual_seed(0)
    cfg = preset(case.model, input_size=case.input_size, patch_size=2, in_channels=4, text_dim=TEXT_DIM,
                 checkpointing=checkpointing)
    net = VelocityNet(cfg).cuda()
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(case.batch, 4, case.input_size, case.input_size, device="cuda", generator=gen)
    tokens = torch.randn(case.batch, TEXT_LEN, TEXT_DIM, device="cuda", generator=gen).half()
    real = 1 + torch.arange(case.batch, device="cuda") * 13 % TEXT_LEN
    mask = torch.arange(TEXT_LEN, device="cuda")[None] < real[:, None]
    pooled = torch.randn(case.batch, TEXT_DIM, device="cuda", generator=gen).half()
    return net, (x, tokens, mask, pooled)


@contextlib.contextmanager
def jvp_precision(variant: Variant):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = variant.jvp == "tf32"
    try:
        with jvp_backend(variant.backend):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def objective(variant: Variant) -> MeanFlowLoss:
    mode = "flow_matching" if variant.r_neq_t == 0 else "meanflow"
    return MeanFlowLoss(MeanFlowConfig(mode=mode, time=TimeSamplerConfig(r_neq_t=variant.r_neq_t),
                                       jvp_float32=variant.jvp != "bf16"))


def make_step(net, model, data, variant: Variant, optimizer):
    loss_fn = objective(variant)

    def step():
        # The same (r, t) and noise every step, so the JVP rows and so the FLOPs are fixed.
        gen = torch.Generator(device="cuda").manual_seed(2)
        with jvp_precision(variant), torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = loss_fn(model, *data, net=net, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


class ModelFlops(TorchDispatchMode):
    """Matmul, convolution and attention FLOPs by torch's own formulas (FlopCounterMode's), less
    products with a zero tangent. Forward-mode AD gives a Linear's weight an efficient zero
    tangent that the plain JVP pass never multiplies; under any dispatch mode it is materialised
    (an expanded scalar zero) and multiplied, so FlopCounterMode counts a Linear's JVP as 3x its
    forward instead of 2x, which would overstate the JVP pass's work by half."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None and not any(_materialised_zero(x) for x in tree_leaves((args, kwargs))):
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def _materialised_zero(x) -> bool:
    return isinstance(x, torch.Tensor) and x.numel() > 1 and not any(x.stride())


def step_flops(case: StepCase, variant: Variant) -> float:
    """Model FLOPs of one step: checkpointing off, blockwise JVP attention (see the docstring).

    Counted at batch 4 and scaled: without checkpointing the full batch's activations would not
    fit, and every matmul is linear in the batch, the JVP rows included (exactly a quarter or
    three quarters of the rows have r != t when the batch is a multiple of 4)."""
    if case.batch % 4:
        raise ValueError(f"batch {case.batch}: FLOPs are counted at batch 4 and scaled, so use a multiple of 4")
    net, data = build(replace(case, batch=4), checkpointing=False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    step = make_step(net, net, data, Variant(variant.label, variant.r_neq_t, variant.jvp, "blockwise"), optimizer)
    counter = ModelFlops()
    with counter:
        step()
    del net, optimizer
    torch.cuda.empty_cache()
    return float(counter.total) * case.batch / 4


def jvp_error(case: StepCase, variant: Variant) -> str:
    """Relative error of du/dt in this variant's JVP precision and attention against the float32
    pass with IEEE matmuls and the blockwise attention (the reference; its own row reads "-")."""
    if variant.r_neq_t == 0 or (variant.jvp == "fp32" and variant.backend == "blockwise"):
        return "-"
    net, (x, tokens, mask, pooled) = build(case, checkpointing=False)
    gen = torch.Generator(device="cuda").manual_seed(3)
    rows = slice(0, min(16, case.batch))
    z, v = x[rows], torch.randn(x[rows].shape, device="cuda", generator=gen)
    t = torch.rand(z.shape[0], device="cuda", generator=gen)
    r = t * torch.rand(z.shape[0], device="cuda", generator=gen)
    text = (tokens[rows], mask[rows], pooled[rows])
    drop = torch.zeros(z.shape[0], dtype=torch.bool, device="cuda")

    def du_dt(v_: Variant):
        cfg = MeanFlowConfig(jvp_float32=v_.jvp != "bf16")
        with jvp_precision(v_), torch.autocast("cuda", dtype=torch.bfloat16):
            return time_derivative(net, z, r, t, v, text, drop, cfg).float()

    reference = du_dt(Variant("reference", 1.0, backend="blockwise"))
    return f"{((du_dt(variant) - reference).norm() / reference.norm()).item():.1e}"


def run_step(args) -> None:
    print(header())
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (value for key, value in PEAK_BF16.items() if key in torch.cuda.get_device_name()), None)
    print(f"\nbf16 autocast, checkpointing on, AdamW; dense bf16 peak for MFU: "
          f"{'unknown (pass --peak-tflops)' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}; "
          f"torch.compile on the gradient pass: {'yes' if args.compile else 'no'}.\n")
    print("| model | step | seconds | ratio to FM | samples/s | TFLOP per step | MFU | peak GiB | du/dt error vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    cases = [c for c in CASES if args.case in (None, c.model)]
    for case in cases:
        if args.batch:
            case = replace(case, batch=args.batch)
        fm_seconds = None
        for variant in VARIANTS:
            flops = step_flops(case, variant)
            net, data = build(case, checkpointing=True)
            model = torch.compile(net) if args.compile else net  # the JVP pass stays eager (forward AD)
            optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
            step = make_step(net, model, data, variant, optimizer)
            result = time_and_peak(step, args.repeats, warmup=3)
            label = f"{case.label} ({parameter_count(net) / 1e6:.0f} M, batch {case.batch})"
            del net, model, optimizer, step
            torch.cuda.empty_cache()
            if result is None:
                print(f"| {label} | {variant.label} | OOM | | | | | | |", flush=True)
                continue
            seconds, mib = result
            fm_seconds = seconds if variant.r_neq_t == 0 else fm_seconds
            ratio = f"{seconds / fm_seconds:.2f}" if fm_seconds else "n/a"
            mfu = "n/a" if peak is None else f"{flops / seconds / peak:.1%}"
            print(f"| {label} | {variant.label} | {seconds:.3f} | {ratio} | {case.batch / seconds:.0f} | "
                  f"{flops / 1e12:.2f} | {mfu} | {mib / 1024:.1f} | {jvp_error(case, variant)} |", flush=True)


# ---------------------------------------------------------------------------------------------
# Compiling for sm_90a without a GPU


def run_compile(args) -> None:
    """Compile the kernel for sm_90a with each dtype's default launch settings (or --launch) and
    print ptxas's registers, spills and shared memory. Needs no GPU: triton carries ptxas. Each
    compile runs in its own process: an LLVM assertion aborts the process instead of raising."""
    print(f"Compiled for sm_90a without a GPU; command: python -m benchmarks.gpu_step {' '.join(sys.argv[1:])}")
    print("\n| inputs | head dim | BLOCK_M x BLOCK_N, warps, stages | registers | spill stores (bytes) | "
          "shared KiB |\n|---|---|---|---|---|---|")
    for precision in ("bf16", "fp16", "fp32 (3xTF32)", "fp32 (TF32)"):
        for head_dim in args.head_dims:
            spec = dict(precision=precision, head_dim=head_dim, launch=args.launch)
            with tempfile.TemporaryDirectory() as cache:  # a cached kernel would skip ptxas and its report
                env = dict(os.environ, TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1")
                proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_step", "compile", "--one", json.dumps(spec)],
                                      capture_output=True, text=True, env=env)
            result = _ptxas_report(proc.stdout) if proc.returncode == 0 else None
            if result is None:
                reason = (proc.stderr.strip().splitlines() or ["no output"])[-1][:150]
                print(f"| {precision} | {head_dim} | {args.launch or 'default'} | compile failed: {reason} | | |")
                continue
            print(f"| {precision} | {head_dim} | {result['launch']} | {result['registers']} | {result['spill']} | "
                  f"{result['shared'] / 1024:.0f} |", flush=True)


def compile_one(spec: dict) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from emf_dist import triton_attention as kernels

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["precision"], torch.float32)
    block_m, block_n, warps = kernels._block_sizes(spec["head_dim"], dtype)
    stages = 2
    if spec["launch"]:
        block_m, block_n, warps, stages = (int(x) for x in spec["launch"].split("x"))
    fn = kernels._jvp_attention_kernel
    pointer = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    signature = {name: ("*u8" if name == "mask_ptr" else pointer) if name.endswith("_ptr")
                 else "fp32" if name == "scale" else "constexpr" if name.isupper() else "i32" for name in fn.arg_names}
    constants = dict(HEAD_DIM=spec["head_dim"], HAS_DQ=True, HAS_DK=True, HAS_DV=True, HAS_MASK=True, UPCAST=False,
                     PRECISION="tf32" if "(TF32)" in spec["precision"] else "tf32x3", BLOCK_M=block_m, BLOCK_N=block_n,
                     BLOCK_D=kernels._padded_head_dim(spec["head_dim"]))
    compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    print(json.dumps(dict(launch=f"{block_m} x {block_n}, {warps}, {stages}", shared=compiled.metadata.shared)))


def _ptxas_report(stdout: str) -> dict | None:
    """The compile child prints ptxas's log (TRITON_DUMP_PTXAS_LOG) and then one JSON line."""
    registers = re.search(r"Used (\d+) registers", stdout)
    spill = re.search(r"(\d+) bytes spill stores", stdout)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not (registers and spill and lines):
        return None
    return dict(json.loads(lines[-1]), registers=int(registers.group(1)), spill=int(spill.group(1)))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["accuracy", "attention", "tune", "step", "compile"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--case", choices=["B", "XL"], help="step: only this model (default both)")
    parser.add_argument("--batch", type=int, help="step: batch size for every case (default 256 for B, 64 for XL)")
    parser.add_argument("--compile", action="store_true", help="step: torch.compile the gradient pass")
    parser.add_argument("--peak-tflops", type=float, help="step: dense bf16 peak of this device, for MFU")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 72], help="compile: head sizes")
    parser.add_argument("--launch", help="compile: BLOCK_MxBLOCK_NxWARPSxSTAGES instead of the defaults, e.g. 64x32x8x2")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # compile: the child process's single configuration
    args = parser.parse_args(argv)
    if args.part == "compile":
        return compile_one(json.loads(args.one)) if args.one else run_compile(args)
    require_cuda()
    {"accuracy": run_accuracy, "attention": run_attention, "tune": run_tune, "step": run_step}[args.part](args)


if __name__ == "__main__":
    main(sys.argv[1:])
