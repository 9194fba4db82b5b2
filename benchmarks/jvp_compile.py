"""The hand-written JVP pass eager vs under torch.compile: compile time, pass time, agreement.

    python -m benchmarks.jvp_compile [--threads 1] [--rows 12]

Our DiT's "tiny" size (32 x 32 RGB, patch 2: 256 tokens, width 96, depth 4) with a fixed number
of JVP rows; eager and compiled passes alternate, three rounds of five, best round each. A
compiled pass specialises on the row count, and a MeanFlow step's r != t rows vary from step to
step, so the figure says what compiling could win, not what a training run would see as is.
"""

from __future__ import annotations

import argparse
import time

import torch

from emf_dist.model import ModelConfig, VelocityNet
from emf_dist.model_jvp import velocity_and_tangent


def inputs(cfg: ModelConfig, rows: int):
    gen = torch.Generator().manual_seed(0)
    shape = (rows, cfg.in_channels, cfg.input_size, cfg.input_size)
    z, dz = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    r = 0.5 * torch.rand(rows, generator=gen)
    tokens, pooled = torch.randn(rows, 16, cfg.text_dim, generator=gen), torch.randn(rows, cfg.text_dim, generator=gen)
    mask = torch.ones(rows, 16, dtype=torch.bool)
    return z, r, r + 0.3, tokens, mask, pooled, torch.zeros(rows, dtype=torch.bool), dz, torch.ones(rows)


def best_seconds(fn, rounds: int = 3, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(input_size=32, patch_size=2, width=96, depth=4, heads=4, text_dim=384)
    net = VelocityNet(cfg).eval()
    for p in net.parameters():  # adaLN-Zero starts at zero: give every path signal
        torch.nn.init.normal_(p, std=0.05)
    batch = inputs(cfg, args.rows)
    compiled = torch.compile(velocity_and_tangent, dynamic=False)
    start = time.perf_counter()
    _, d_compiled = compiled(net, *batch)
    compile_seconds = time.perf_counter() - start
    _, d_eager = velocity_and_tangent(net, *batch)
    error = float((d_compiled - d_eager).abs().max() / d_eager.abs().max())
    eager_s = best_seconds(lambda: velocity_and_tangent(net, *batch))
    compiled_s = best_seconds(lambda: compiled(net, *batch))
    print("| rows | compile s | eager s | compiled s | eager / compiled | max |d compiled - d eager| / max |d| |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.rows} | {compile_seconds:.0f} | {eager_s:.3f} | {compiled_s:.3f} | {eager_s / compiled_s:.2f} | {error:.1e} |")


if __name__ == "__main__":
    main()
