"""``benchmarks.gpu_step compile``: the fused kernel compiled for sm_90a without a GPU (triton
carries ptxas), and what ptxas reports of it: registers, spills, shared memory."""

from __future__ import annotations

import json
import os
import re
import tempfile

import torch

from benchmarks.gpu_timing import command, failure, provenance, run_one


def run_compile(args) -> None:
    """Compile the kernel for sm_90a with each dtype's default launch settings (or --launch) and
    print ptxas's registers, spills and shared memory. Needs no GPU: triton carries ptxas. Each
    compile runs in its own process: an LLVM assertion aborts the process instead of raising."""
    print(f"Compiled for sm_90a without a GPU, {provenance()}; command: {command()}")
    print("\n| inputs | head dim | BLOCK_M x BLOCK_N, warps, stages | registers | spill stores (bytes) | "
          "shared KiB |\n|---|---|---|---|---|---|")
    for precision in ("bf16", "fp16", "fp32 (3xTF32)", "fp32 (TF32)"):
        for head_dim in args.head_dims:
            spec = dict(precision=precision, head_dim=head_dim, launch=args.launch)
            with tempfile.TemporaryDirectory() as cache:  # a cached kernel would skip ptxas and its report
                env = dict(os.environ, TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1")
                proc = run_one("compile", spec, env)
            result = _ptxas_report(proc.stdout) if proc.returncode == 0 else None
            if result is None:
                reason = failure(proc, 150)
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
