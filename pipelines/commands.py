"""`emf pipeline run` and `emf retrain`: argument parsing only (the work is in run.py, retrain.py)."""
from __future__ import annotations

import sys

from emf_dist.config import add_config_argument


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("pipeline", help="run a chain of steps with cached, resumable results",
                              description="Run a pipeline spec (pipelines/spec.py): steps run in order; a step whose "
                                          "config and inputs are unchanged is skipped (content-addressed cache in the "
                                          "storage); after a failure, rerunning resumes at the failed step. Every run "
                                          "writes a record under <storage>/runs/.")
    sub = p.add_subparsers(dest="pipeline_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="run a spec")
    run.add_argument("spec", help="spec file, or a packaged spec: emf (the EMF chain), retrain")
    run.add_argument("overrides", nargs="*", metavar="key=value",
                     help="dotted overrides, e.g. storage=s3://bucket/emf steps.pretrain.config.steps=2000")
    run.add_argument("--force", action="append", default=[], metavar="STEP", help="run this step even if cached")
    run.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                     help="wait this long for another run on the same storage to finish (default: fail at once)")
    p.set_defaults(run=_run_pipeline)

    r = subparsers.add_parser("retrain",
                              help="scheduled retraining: new data -> fine-tune -> evaluate -> promote if not worse",
                              description="If the dataset has a newer manifest version than the promoted model's, "
                                          "fine-tune a candidate, benchmark it beside the promoted model and promote "
                                          "it unless it regresses beyond gate.margin; the decision and its reason go "
                                          "to the model registry. Exits 0 at once when there is no new data or another "
                                          "retrain holds the lock.")
    add_config_argument(r, "pipelines/retrain.py: RetrainConfig",
                        "registry=s3://bucket/registry dataset=s3://bucket/data gate.margin=0.02")
    r.set_defaults(run=_run_retrain)


def _run_pipeline(args) -> int:
    from pipelines.lock import LockHeld, LockLost
    from pipelines.run import PipelineFailed, run_pipeline
    from pipelines.spec import load_spec

    spec = load_spec(args.spec, list(args.overrides))
    try:
        run_pipeline(spec, force=tuple(args.force), lock_wait_s=args.wait)
    except (PipelineFailed, LockHeld, LockLost) as err:
        print(f"emf pipeline: {err}", file=sys.stderr)
        return 1
    return 0


def _run_retrain(args) -> int:
    from emf_dist.config import parse_cli
    from pipelines.lock import LockHeld, LockLost
    from pipelines.retrain import RetrainConfig, retrain
    from pipelines.run import PipelineFailed

    try:
        retrain(parse_cli(RetrainConfig, args.config))
    except (PipelineFailed, LockHeld, LockLost) as err:  # LockHeld: the pipeline storage is busy with another run
        print(f"emf retrain: {err}", file=sys.stderr)
        return 1
    return 0
