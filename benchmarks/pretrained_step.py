"""MeanFlow step vs flow-matching step on the adapted SANA, beside our DiT of a similar size.

    python -m benchmarks.pretrained_step            # the table in docs/benchmarks.md
    python -m benchmarks.pretrained_step --quick    # one round, fewer repeats

Both models take the same batch: DC-AE-shaped latents (32 channels, 16 x 16, patch 1: 256 image
tokens, as SANA at 512 px) and 16 text tokens; SANA is a SanaTransformer2DModel with SANA-1.6B's
proportions (head size 32, MLP ratio 2.5, cross-attention width = model width) behind the backbone
adapter, converted with EMF's dual time embedding; the DiT (emf_dist/model.py) is sized to a
similar parameter count. One AdamW step per measurement, each configuration in its own process
(benchmarks/measure.py), rounds interleaved so that drift hits every configuration alike; the
minimum over rounds of the per-round medians.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks.measure import best_over_rounds, print_ratio_table, random_batch_step, time_and_peak
from emf_dist.meanflow import MeanFlowConfig, MeanFlowLoss
from emf_dist.model import ModelConfig, VelocityNet, parameter_count
from emf_dist.time_sampling import TimeSamplerConfig

CHANNELS, SIDE, WIDTH, BATCH = 32, 16, 384, 4
SANA = dict(in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=WIDTH // 32, attention_head_dim=32,
            num_layers=6, num_cross_attention_heads=WIDTH // 32, cross_attention_head_dim=32,
            cross_attention_dim=WIDTH, caption_channels=WIDTH, mlp_ratio=2.5, sample_size=SIDE, patch_size=1)
DIT = dict(input_size=SIDE, in_channels=CHANNELS, patch_size=1, width=WIDTH, depth=4, heads=WIDTH // 32,
           text_dim=WIDTH, time_embedding="dual")
VARIANTS = [("flow matching", 0.0), ("MeanFlow, 25% r!=t", 0.25), ("MeanFlow, 75% r!=t", 0.75)]


def build_model(name: str, checkpointing: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "dit":
        return VelocityNet(ModelConfig(**DIT, checkpointing=checkpointing))
    from diffusers import SanaTransformer2DModel

    from emf_dist.backbones import DiffusersBackbone, convert_to_meanflow
    from emf_dist.backbones.families import family_for
    from emf_dist.backbones.time_convention import FlowTimeConvention

    transformer = SanaTransformer2DModel(**SANA)
    backbone = convert_to_meanflow(DiffusersBackbone(transformer, family_for(type(transformer).__name__),
                                                     FlowTimeConvention()))
    backbone.cfg.checkpointing = checkpointing
    return backbone


def measure(spec: dict) -> dict:
    torch.set_num_threads(spec.get("threads", 2))
    holder = {}

    def setup():
        model = build_model(spec["model"], spec["checkpointing"])
        holder["params"] = parameter_count(model)
        mode = "flow_matching" if spec["r_neq_t"] == 0 else "meanflow"
        objective = MeanFlowLoss(MeanFlowConfig(mode=mode, time=TimeSamplerConfig(r_neq_t=spec["r_neq_t"])))
        return random_batch_step(model, objective, BATCH, generator=torch.Generator().manual_seed(0))

    return {**time_and_peak(setup, repeats=spec["repeats"], warmup=2), "params": holder["params"]}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    rounds, repeats = (1, 2) if args.quick else (args.rounds, 3)
    configs = [(model, checkpointing, name, r_neq_t) for model in ("sana", "dit") for checkpointing in (False, True)
               for name, r_neq_t in VARIANTS]
    specs = [dict(model=model, checkpointing=checkpointing, r_neq_t=r_neq_t, repeats=repeats)
             for model, checkpointing, _, r_neq_t in configs]
    results = dict(zip([c[:3] for c in configs], best_over_rounds("benchmarks.pretrained_step", specs, rounds)))
    print_ratio_table(results, lambda model, r: f"{'SANA (adapted)' if model == 'sana' else 'DiT'} "
                               f"({r['params'] / 1e6:.1f} M, batch {BATCH})")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        print(json.dumps(measure(json.loads(sys.argv[1]))))
    else:
        main(sys.argv[1:])
