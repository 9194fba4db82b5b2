"""`emf demo`: the main job, the full EMF chain on the embedded default.

It runs the `emf` pipeline spec (pipelines/specs/emf.yaml: encoder selection -> data prep ->
flow-matching pretraining -> MeanFlow fine-tuning -> one-step distillation rounds -> benchmark)
with every artifact under one folder, on a local Ray head with token authentication. The head is
started for the run and stopped after, unless one (`emf cluster up`) was already running, which
is then used and kept.
Rerunning with the same folder skips the steps that already ran, so an interrupted demo resumes.
The terminal shows the project's lines (step headers, summaries, rank 0's training progress);
what Ray, Ray Data, Ray Train and the workers' libraries print goes to ``<out>/logs/demo.log``
(emf_app/console.py).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from cluster import local
from emf_app.console import Console, routed
from emf_dist.ray_env import start_autoscaling_coordinator
from pipelines.run import PipelineFailed, RunRecord, run_pipeline
from pipelines.spec import PipelineSpec, load_spec


@contextlib.contextmanager
def local_ray(cfg: local.LocalClusterConfig, console: Console) -> Iterator[None]:
    """A driver of the local head for the block; starts (and then stops) one when none runs."""
    started = local.running_state(cfg) is None
    state = local.up(cfg, echo=lambda line: console.say(line.splitlines()[0]))
    try:
        with local.driver(state):
            console.take_worker_output()  # after ray.init, which installs Ray's own forwarding
            start_autoscaling_coordinator()  # starts during the encoders and prep, not in the first fit
            yield
    finally:
        if started:
            local.down(cfg, echo=console.say)


def run_demo(out_dir: str, overrides: list[str], cluster: local.LocalClusterConfig | None = None) -> RunRecord:
    out_dir = os.path.abspath(out_dir)
    spec = load_spec("emf", [f"storage={out_dir}", *overrides])  # validated before Ray starts
    record = run_on_local_head(spec, cluster or local.LocalClusterConfig())
    print(where_things_are(record), flush=True)
    return record


def log_file(storage: str) -> str:
    return os.path.join(storage, "logs", "demo.log")


def run_on_local_head(spec: PipelineSpec, cluster: local.LocalClusterConfig) -> RunRecord:
    """``spec`` (local storage) on the local head, the project's lines on the terminal and everything
    else in log_file(spec.storage)."""
    with routed(log_file(spec.storage)) as console:
        console.say(f"emf demo: the output of Ray, Ray Data, Ray Train and the workers (wandb's included) "
                    f"goes to {console.log_path}")
        try:
            with local_ray(cluster, console):
                return run_pipeline(spec, echo=console.say)
        except PipelineFailed:
            console.say(f"emf demo: the workers' own output, their tracebacks included, is in {console.log_path}")
            raise


def where_things_are(record: RunRecord) -> str:
    out = record.outputs()
    report, model = out["benchmark"]["report"], out["benchmark"]["model"]
    lines = ["", "emf demo: done. Everything is under " + record.storage,
             f"  report:      {os.path.join(report, 'report.md')} (metrics.json, steps-vs-quality plot, grids)",
             f"  encoders:    {os.path.join(out['encoders']['report'], 'report.md')}",
             f"  shards:      {out['prep']['out']} (manifest.json)"]
    for step in record.steps:  # the training runs in pipeline order: pretrain, finetune, distill
        if step.kind == "train" and "run" in step.outputs:
            lines.append(f"  {step.name + ':':<12} {step.outputs['run']} "
                         f"({step.config['mode']}: DeepSpeed checkpoints, samples/, loss.png)")
    lines += [f"  model:       {model}",
              f"  logs:        {log_file(record.storage)} (Ray, Ray Data, Ray Train, the workers, wandb)",
              f"  try:         emf generate --model {model} --steps 1 --upscale 8 --out red.png \"a red circle\""]
    return "\n".join(lines)
