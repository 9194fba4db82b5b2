"""GPU measurements for the fused JVP attention and the MeanFlow step. CUDA only.

    python -m benchmarks.gpu_step accuracy     # fused kernel vs forward-AD math attention: error bounds
    python -m benchmarks.gpu_step attention    # time and peak memory, 256 .. 16k tokens
    python -m benchmarks.gpu_step tune         # block sizes / warps of the fused kernel at 4k tokens
    python -m benchmarks.gpu_step step         # MeanFlow vs flow-matching step, DiT-B/256 and DiT-XL/1024
    python -m benchmarks.gpu_step step --compile   # the same, gradient pass under torch.compile
    python -m benchmarks.gpu_step compile      # no GPU needed: ptxas's registers / spills for sm_90a

Each prints a markdown table for docs/benchmarks.md, headed by the device, versions, the date
and the commit it measured. On an H200 ``accuracy`` and ``attention`` take about a minute each,
``tune`` a few (a process per launch), ``step --case B`` about two and ``step --case XL`` over
five (docs/benchmarks.md); --compile lengthens the step most.

Conventions. Times are CUDA-event medians after warm-up; peak memory is the allocator's peak
minus what was allocated before the call. The step is optimizer step included, bf16 autocast
for the gradient pass, activation checkpointing on, the JVP pass as MeanFlowConfig says (float32
by default). Model FLOPs are counted with torch's FLOP formulas (``ModelFlops``) on one real
step with checkpointing off (recomputation is not model work) and the blockwise JVP attention
(whose six matmuls per block are the fused kernel's six), so the JVP pass's tangent matmuls
count in full; MFU divides them by the step time and the device's dense bf16 peak.

The parts live beside this file: gpu_timing.py (header, timing, peak memory), gpu_attention.py
(the kernel alone), gpu_step_cases.py (the steps, their FLOPs and du/dt error), ptxas_report.py
(the sm_90a compile).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import torch

from benchmarks.gpu_attention import run_accuracy, run_attention, run_tune, tune_one
from benchmarks.gpu_step_cases import CASES, VARIANTS, build, jvp_error, make_step, step_flops
from benchmarks.gpu_timing import header, require_cuda, time_and_peak
from benchmarks.ptxas_report import compile_one, run_compile
from emf_dist.model import parameter_count

# Dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
             "A100": 312e12, "L40S": 362e12}


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
    parser.add_argument("--one", help=argparse.SUPPRESS)  # compile, tune: the child process's single configuration
    args = parser.parse_args(argv)
    if args.part == "compile":
        return compile_one(json.loads(args.one)) if args.one else run_compile(args)
    require_cuda()
    if args.part == "tune" and args.one:
        return tune_one(json.loads(args.one))
    {"accuracy": run_accuracy, "attention": run_attention, "tune": run_tune, "step": run_step}[args.part](args)


if __name__ == "__main__":
    main(sys.argv[1:])
