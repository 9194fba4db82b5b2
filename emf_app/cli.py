"""The `emf` command line. Each subcommand lives in its own module; this file only routes."""

from __future__ import annotations

import argparse
import sys

from emf_app.errors import debug_requested, run_guarded
from emf_dist.config import add_config_argument


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
    p = subparsers.add_parser("demo", help="the main job on the embedded default: the full EMF pipeline",
                              description="Run the `emf` pipeline (pipelines/specs/emf.yaml) on a local Ray head: "
                                          "text-encoder selection, data prep of generated scenes with the packaged "
                                          "MiniLM, flow-matching pretraining, MeanFlow fine-tuning (EMF), and the "
                                          "steps-vs-quality benchmark, every artifact under --out. Rerun to resume.")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the pipeline spec, e.g. steps.pretrain.config.steps=3000")
    p.add_argument("--out", default="emf-demo", help="output folder")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from emf_app.demo import run_demo
    from pipelines.run import PipelineFailed

    try:
        run_demo(args.out, list(args.overrides))
    except PipelineFailed as err:
        print(f"emf demo: {err}; rerun the same command to resume", file=sys.stderr)
        return 1
    return 0


def _add_prep(subparsers) -> None:
    p = subparsers.add_parser("prep", help="shard image-text data into WebDataset tars with precomputed text embeddings",
                              description="Read a source (generated scenes by default, or a folder of images with "
                                          "captions, parquet/JSONL tables, WebDataset tars), encode captions (and "
                                          "optionally images to VAE latents) on Ray Data, and write shards plus a "
                                          "manifest to a local folder or any fsspec URL (s3://...). Rerunning "
                                          "finishes an interrupted run; new source items become the next version. "
                                          "Object-store credentials and endpoint come from the environment "
                                          "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL).")
    add_config_argument(p, "data_prep/config.py: PrepConfig", "out=s3://bucket/scenes source.count=100000")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad input item with an error naming it, instead of skipping and counting")
    p.set_defaults(run=_run_prep)


def _run_prep(args) -> int:
    from data_prep.config import PrepConfig
    from data_prep.job import run_prep
    from emf_dist.config import parse_cli

    # Bad input under --strict, an interrupted pipeline (PrepError): one line from the error boundary.
    run_prep(parse_cli(PrepConfig, list(args.config) + (["strict=true"] if args.strict else [])))
    return 0


def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="distributed MeanFlow / flow-matching training on Ray Train + DeepSpeed",
                              description="Check the config, the dataset manifest and the text encoder on this machine, "
                                          "then train on Ray (the cluster in RAY_ADDRESS, else a local instance) with "
                                          "one DeepSpeed ZeRO engine per worker. Rerunning with the same name resumes "
                                          "from the latest checkpoint. The EMA weights are exported to "
                                          "<storage_path>/<name>/export at the end.")
    add_config_argument(p, "emf_dist/train/config.py: TrainConfig",
                        "data.url=s3://bucket/scenes zero.stage=3 scaling.num_workers=8")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from emf_dist.config import parse_cli
    from emf_dist.train.config import TrainConfig
    from emf_dist.train.driver import train

    print(train(parse_cli(TrainConfig, args.config)).summary())
    return 0


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate text encoders and models; write a report folder",
                              description="Text-encoder selection (discriminability, disentanglement), the GenEval-style "
                                          "compositional benchmark across step counts, exports in the official GenEval "
                                          "and DPG-Bench layouts. Configs: emf_dist/eval/run.py (EvalConfig) and "
                                          "emf_dist/eval/encoder_config.py (EncoderEvalConfig).")
    sub = p.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND", required=True)
    enc = sub.add_parser("encoders", help="rank text encoders against reference baselines")
    add_config_argument(enc, "emf_dist/eval/encoder_config.py: EncoderEvalConfig", "discriminability.scenes=300")
    enc.add_argument("--out", default="emf-eval-encoders", help="report folder")
    enc.add_argument("--device", default="cpu")
    bench = sub.add_parser("benchmark", help="compositional benchmark: MeanFlow 1-8 steps vs flow matching 1-32 steps")
    add_config_argument(bench, "emf_dist/eval/run.py: EvalConfig", "benchmark.prompts_per_task=4")
    bench.add_argument("--model", required=True, help="exported model folder (MeanFlow or flow matching)")
    bench.add_argument("--baseline", default=None, help="a second exported model, e.g. the flow-matching parent")
    bench.add_argument("--out", default="emf-eval", help="report folder")
    for name, what in (("export-geneval", "GenEval"), ("export-dpg", "DPG-Bench")):
        e = sub.add_parser(name, help=f"write generated images in the official {what} layout")
        e.add_argument("--model", required=True, help="exported model folder")
        e.add_argument("--out", required=True, help="output folder")
        if name == "export-geneval":
            e.add_argument("--metadata", default=None,
                           help="your copy of GenEval's prompts/evaluation_metadata.jsonl (default: our scene prompts "
                                "in its format, scorable with `emf eval score-geneval`)")
            e.add_argument("--images-per-prompt", type=int, default=4)
        else:
            e.add_argument("--prompts", required=True, help="your copy of DPG-Bench's dpg_bench/prompts folder")
        e.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's own)")
        e.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's own)")
        e.add_argument("--seed", type=int, default=0)
        e.add_argument("--upscale", type=int, default=1, help="enlarge images by this factor (nearest neighbour)")
    score = sub.add_parser("score-geneval", help="score a GenEval-layout folder of scene prompts with the scene detector")
    score.add_argument("folder")
    p.set_defaults(run=_run_eval)


def _run_eval(args) -> int:
    from emf_dist.config import parse_cli
    from emf_dist.eval import export_layouts as layouts
    from emf_dist.eval.encoder_config import EncoderEvalConfig
    from emf_dist.eval.run import EvalConfig, run_benchmark_job, run_encoder_job

    if args.eval_command == "encoders":
        run_encoder_job(parse_cli(EncoderEvalConfig, args.config), args.out, args.device)
    elif args.eval_command == "benchmark":
        dirs = {"model": args.model, **({"baseline": args.baseline} if args.baseline else {})}
        run_benchmark_job(dirs, parse_cli(EvalConfig, args.config), args.out)
    elif args.eval_command == "export-geneval":
        metadata = layouts.read_geneval_metadata(args.metadata) if args.metadata else None
        layouts.export_geneval(args.model, metadata, args.out, images_per_prompt=args.images_per_prompt,
                               steps=args.steps, guidance=args.guidance, seed=args.seed, upscale=args.upscale)
        print(f"wrote {args.out}; score with GenEval's evaluation/evaluate_images.py {args.out}"
              + ("" if args.metadata else f", or here with `emf eval score-geneval {args.out}`"))
    elif args.eval_command == "export-dpg":
        size = layouts.export_dpg(args.model, layouts.read_dpg_prompts(args.prompts), args.out, steps=args.steps,
                                  guidance=args.guidance, seed=args.seed, upscale=args.upscale)
        print(f"wrote {args.out}; score with DPG-Bench's dpg_bench/dist_eval.sh {args.out} {size}")
    else:  # score-geneval
        result = layouts.score_geneval_folder(args.folder)
        for tag, acc in result["tasks"].items():
            print(f"{tag:<16} {acc:.3f}")
        print(f"overall (mean over tasks) {result['overall']:.3f}")
    return 0


def _add_operations(subparsers) -> None:
    # `emf cluster|submit` and `emf pipeline|retrain` are defined beside their code, in cluster/ and pipelines/.
    from cluster.commands import add_parsers as add_cluster_parsers
    from pipelines.commands import add_parsers as add_pipeline_parsers

    add_cluster_parsers(subparsers)
    add_pipeline_parsers(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emf", description="emf-dist: one-step text-to-image with MeanFlow. "
                                     "Exit codes: 2 usage/config, 3 input/data, 4 environment (storage, "
                                     "permissions, locks), 130 interrupted.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an expected failure too (also EMF_DEBUG=1); accepted anywhere")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(subparsers)
    _add_demo(subparsers)
    _add_prep(subparsers)
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_operations(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return run_guarded(args.command, lambda: args.run(args), debug)


if __name__ == "__main__":
    sys.exit(main())
