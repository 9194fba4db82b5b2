"""The `emf` command line. Each subcommand lives in its own module; this file only routes."""

from __future__ import annotations

import argparse
import sys


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="text to image with an exported model",
                              description="Encode the prompts with the model's own text encoder, sample, write a PNG "
                                          "(a grid when several prompts are given).")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--model", required=True, help="exported model folder (holds emf_model.json and model.safetensors)")
    p.add_argument("--out", required=True, help="output PNG file")
    p.add_argument("--steps", type=int, default=None, help="network evaluations (default: the model's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale at sampling (default: the model's own)")
    p.add_argument("--upscale", type=int, default=1, help="enlarge the PNG by this factor (nearest neighbour)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    from emf_dist.generate import generate_to_file

    out = generate_to_file(args.model, args.prompts, args.out, steps=args.steps, seed=args.seed,
                           guidance_scale=args.guidance, upscale=args.upscale, device=args.device)
    print(f"wrote {out}")
    return 0


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the main job on the embedded default: scenes -> FM -> MeanFlow -> samples",
                              description="Generate scenes, encode their captions with the packaged MiniLM, pretrain "
                                          "a flow-matching model, convert it to MeanFlow and fine-tune, export, and "
                                          "write sample grids at 1, 2 and 4 steps next to flow matching.")
    p.add_argument("config", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="optional YAML config, then dotted overrides, e.g. fm_train.steps=200")
    p.add_argument("--out", default="emf-demo", help="output folder")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from emf_dist.config import parse_cli
    from emf_dist.demo import DemoConfig, run_demo

    cfg = parse_cli(DemoConfig, args.config)
    run_demo(cfg, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emf", description="emf-dist: one-step text-to-image with MeanFlow")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(subparsers)
    _add_demo(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:  # user mistakes: a clear message, no traceback
        print(f"emf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
