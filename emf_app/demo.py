"""`emf demo`: the main job, the full EMF chain on the embedded default.

It runs the `emf` pipeline spec (pipelines/specs/emf.yaml: encoder selection -> data prep ->
flow-matching pretraining -> MeanFlow fine-tuning -> one-step distillation rounds -> benchmark)
with every artifact under one folder, on a local Ray head with token authentication. The head is
started for the run and stopped after, unless one (`emf cluster up`) was already running, which
is then used and kept.
Rerunning with the same folder skips the steps that already ran, so an interrupted demo resumes.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from cluster import local
from pipelines.run import RunRecord, run_pipeline
from pipelines.spec import load_spec


@contextlib.contextmanager
def local_ray(cfg: local.LocalClusterConfig) -> Iterator[None]:
    """A driver of the local head for the block; starts (and then stops) one when none runs."""
    started = local.running_state(cfg) is None
    state = local.up(cfg, echo=lambda line: print(line.splitlines()[0], flush=True))
    try:
        with local.driver(state):
            yield
    finally:
        if started:
            local.down(cfg)


def run_demo(out_dir: str, overrides: list[str], cluster: local.LocalClusterConfig | None = None) -> RunRecord:
    out_dir = os.path.abspath(out_dir)
    spec = load_spec("emf", [f"storage={out_dir}", *overrides])  # validated before Ray starts
    with local_ray(cluster or local.LocalClusterConfig()):
        record = run_pipeline(spec)
    print(where_things_are(record), flush=True)
    return record


def where_things_are(record: RunRecord) -> str:
    out = record.outputs()
    report, model = out["benchmark"]["report"], out["benchmark"]["model"]
    lines = ["", "emf demo: done. Everything is under " + record.storage,
             f"  report:      {os.path.join(report, 'report.md')} (metrics.json, steps-vs-quality plot, grids)",
             f"  encoders:    {os.path.join(out['encoders']['report'], 'report.md')}",
             f"  shards:      {out['prep']['out']} (manifest.json)"]
    for step in record.steps:  # the training runs in pipeline order: pretrain, finetune, distill_1, ...
        if step.kind == "train" and "run" in step.outputs:
            lines.append(f"  {step.name + ':':<12} {step.outputs['run']} "
                         f"({step.config['mode']}: DeepSpeed checkpoints, samples/)")
    lines += [f"  model:       {model}",
              f"  try:         emf generate --model {model} --steps 1 --upscale 8 --out red.png \"a red circle\""]
    return "\n".join(lines)
