"""The k-step sampler with the DiT's text share computed once per batch (samplers.conditioned) against
whole forwards at every step, side by side.

    python -m benchmarks.sampler_text_share [--steps 1 4 8] [--batch 32] [--repeats 20]

The `emf` spec's model (benchmarks/demo_step_vs_batch.MODEL, MeanFlow's dual time embedding), 20 text
tokens as the spec's encoder gives, no gradients, one thread: what the distillation teacher
(emf_dist/split_distill.py) and the benchmark's samplers run. Prints the median milliseconds of each and
their ratio; the two agree to the bit (tests/test_convert_sample_export.py).
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from benchmarks.demo_step_vs_batch import MODEL
from emf_dist.model import VelocityNet
from emf_dist.samplers import conditioned
from emf_dist.split_distill import split_average_velocity

TEXT_TOKENS = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    net = VelocityNet(replace(MODEL, time_embedding="dual")).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(args.batch, MODEL.in_channels, MODEL.input_size, MODEL.input_size, generator=g)
    tokens = torch.randn(args.batch, TEXT_TOKENS, MODEL.text_dim, generator=g).half()
    mask = torch.ones(args.batch, TEXT_TOKENS, dtype=torch.bool)
    pooled, drop = torch.randn(args.batch, MODEL.text_dim, generator=g).half(), torch.rand(args.batch, generator=g) < 0.1
    text = (tokens, mask, pooled)
    ways = {"whole forwards": lambda: (lambda z, r, t: net(z, r, t, *text, drop)),
            "text once": lambda: conditioned(net, *text, 1.0, drop, noise.dtype)}
    print(f"median ms of a k-step sample, batch {args.batch}, one thread, {args.repeats} repeats interleaved:")
    for steps in args.steps:
        times = torch.linspace(1.0, 0.0, steps + 1)[:, None].expand(-1, args.batch)
        seconds = {name: [] for name in ways}
        for _ in range(args.repeats + 3):
            for name, bind in ways.items():
                start = time.perf_counter()
                split_average_velocity(bind(), noise, times)
                seconds[name].append(time.perf_counter() - start)
        whole, once = (statistics.median(seconds[name][3:]) * 1e3 for name in ways)
        print(f"  k = {steps}: whole forwards {whole:6.1f} ms   text once {once:6.1f} ms   ratio {once / whole:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
