"""The blockwise JVP attention against forward-mode AD through math attention.

    python -m benchmarks.jvp_attention             # 256 .. 4096 tokens
    python -m benchmarks.jvp_attention --quick     # 256 and 1024

Both compute the attention output and its tangent for self-attention over N tokens
(batch 1, 6 heads of 64, float32, all of q, k, v carrying tangents: the image tokens' case).
Each measurement runs in its own process; see benchmarks/measure.py for how peak memory is read.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.autograd.forward_ad as fwAD

from benchmarks.measure import run_isolated, time_and_peak
from emf_dist.attention import attention_with_tangent, math_attention

HEADS, HEAD_DIM = 6, 64


def build(spec: dict):
    gen = torch.Generator().manual_seed(0)
    q, k, v, dq, dk, dv = (torch.randn(1, HEADS, spec["tokens"], HEAD_DIM, generator=gen) for _ in range(6))

    def blockwise():
        with torch.no_grad():
            attention_with_tangent(q, k, v, dq, dk, dv)

    def forward_ad_math():
        with torch.no_grad(), fwAD.dual_level():
            out = math_attention(fwAD.make_dual(q, dq), fwAD.make_dual(k, dk), fwAD.make_dual(v, dv))
            fwAD.unpack_dual(out)

    return blockwise if spec["impl"] == "blockwise" else forward_ad_math


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    sizes = [256, 1024] if args.quick else [256, 512, 1024, 2048, 4096]
    print("| tokens | forward-AD math s | blockwise s | speed-up | forward-AD math peak MiB | blockwise peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for tokens in sizes:
        repeats = 5 if tokens <= 1024 else 3
        math = run_isolated("benchmarks.jvp_attention", dict(impl="math", tokens=tokens, repeats=repeats))
        ours = run_isolated("benchmarks.jvp_attention", dict(impl="blockwise", tokens=tokens, repeats=repeats))
        print(f"| {tokens} | {math['seconds']:.4f} | {ours['seconds']:.4f} | {math['seconds'] / ours['seconds']:.2f} | "
              f"{math['peak_mib']:.0f} | {ours['peak_mib']:.0f} | {ours['peak_mib'] / max(math['peak_mib'], 1e-9):.2f} |",
              flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        spec = json.loads(sys.argv[1])
        torch.set_num_threads(2)
        print(json.dumps(time_and_peak(lambda: build(spec), repeats=spec["repeats"], warmup=1)))
    else:
        main(sys.argv[1:])
