"""`emf retrain CONFIG`: scheduled retraining with a promotion gate.

One run, under the registry's lease lock (a second run waits ``lock.wait_s``, then exits 0):

1. The promoted model comes from the registry (the first run registers ``initial.model``).
2. With ``prep`` set, new source items are appended to the dataset (`emf prep`; a second's
   no-op when there is nothing new).
3. If the dataset's manifest version is not newer than the one the promoted model (or a later
   candidate that was kept out) was trained on, stop: exit 0, "no new data".
4. Otherwise run the retrain pipeline (pipelines/specs/retrain.yaml by default): fine-tune
   from the promoted lineage's flow-matching base on the grown dataset and distil it as the emf
   spec does, benchmark the candidate (the model the `benchmark` step evaluates) and the
   promoted model with one evaluation config. Steps are cached, so a retrain that
   failed in evaluation resumes there instead of training again.
5. Gate: promote only if, at every configured step count, the candidate's overall accuracy is
   not below the promoted model's by more than ``gate.margin``. Either way the candidate is
   registered with its scores and the reason; promotion moves the registry's pointer.

Why the base and not the promoted MeanFlow export: `emf train` fine-tunes MeanFlow only from a
flow-matching export (emf_dist/train/driver.py resolve_model refuses a dual-time-embedding parent), so
each retrain repeats EMF's conversion + fine-tune (+ distillation) on all data so far; the
registry records the base of every version for this.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from emf_dist import storage
from emf_dist.config import ConfigError, from_dict
from emf_dist.manifest import read_manifest
from pipelines.lock import LeaseLock, LockHeld
from pipelines.registry import ModelVersion, Registry
from pipelines.run import RunRecord, run_pipeline
from pipelines.spec import load_spec

# The candidate is the model the benchmark step evaluates (its output "model"), whichever training
# step made it.
REQUIRED_OUTPUTS = {"benchmark": "model, metrics", "benchmark_promoted": "metrics"}


@dataclass
class GateConfig:
    steps: tuple[int, ...] = (1,)   # MeanFlow sampler step counts compared; each must hold (EMF sells 1 step)
    margin: float = 0.01            # the candidate may score this much below the promoted model and still win
    guidance: float = 1.0           # which CFG scale's scores to compare (1.0: no CFG)


@dataclass
class LockOptions:
    ttl_s: float = 900.0            # a crashed run's lease is taken over after this long without renewal
    wait_s: float = 0.0             # how long a second run waits for the first; then it exits 0


@dataclass
class InitialModel:
    """Registered as version 1 when the registry is empty (e.g. the result of `emf pipeline run emf`)."""
    model: str = ""                 # a MeanFlow export
    base: str = ""                  # the flow-matching export it was fine-tuned from
    manifest_version: int = 0       # the dataset version it saw; 0: read from the export's emf_model.json


@dataclass
class RetrainConfig:
    registry: str = "emf-registry"  # local folder or s3://bucket/prefix
    dataset: str = ""               # the growing dataset (holds manifest.json)
    storage: str = "emf-retrain"    # the retrain pipeline's storage (steps, cache, run records)
    # PrepConfig fields (data_prep/config.py) to append new source items to `dataset` before checking;
    # null when another job feeds the dataset. `out` is always `dataset`.
    prep: dict[str, Any] | None = None
    pipeline: str = "retrain"       # spec file or packaged spec name
    overrides: list[str] = field(default_factory=list)  # for that spec, e.g. steps.finetune.config.steps=2000
    gate: GateConfig = field(default_factory=GateConfig)
    lock: LockOptions = field(default_factory=LockOptions)
    initial: InitialModel = field(default_factory=InitialModel)

    def validate(self) -> list[str]:
        problems = []
        if not self.dataset:
            problems.append("dataset is required: the folder or URL holding manifest.json")
        if not self.gate.steps or any(s < 1 for s in self.gate.steps):
            problems.append("gate.steps must list step counts >= 1")
        if self.gate.margin < 0:
            problems.append("gate.margin must be >= 0")
        if self.prep is not None:
            if "out" in self.prep and self.prep["out"] != self.dataset:
                problems.append("prep.out must be left out: retraining appends to `dataset`")
            else:
                problems += _prep_config_problems(self.prep, self.dataset)
        return problems


@dataclass
class Decision:
    promote: bool
    reason: str
    scores: dict[int, tuple[float, float]]  # steps -> (candidate, promoted)


@dataclass
class RetrainOutcome:
    status: str                     # no_new_data | promoted | kept | locked
    message: str
    version: ModelVersion | None = None
    run: RunRecord | None = None


def retrain(cfg: RetrainConfig, echo: Callable[[str], None] = print) -> RetrainOutcome:
    # A broken spec or override fails now, before the lock, prep and a training run.
    retrain_spec(cfg, ModelVersion(model="<promoted>", base="<base>", dataset=cfg.dataset, manifest_version=0))
    registry = Registry(cfg.registry)
    lock = LeaseLock(storage.join(registry.url, "lock"), ttl_s=cfg.lock.ttl_s, purpose="emf retrain")
    try:
        lease = lock.acquire(wait_s=cfg.lock.wait_s)
    except LockHeld as held:
        return _say(echo, RetrainOutcome("locked", f"retrain: another retrain is running, nothing done: {held}"))
    with lease:
        promoted = registry.promoted() or register_initial(registry, cfg, echo)
        if cfg.prep is not None:
            append_new_data(cfg, echo)
        dataset_version = read_manifest(cfg.dataset, storage.storage_options(cfg.dataset)).version
        latest = latest_evaluated(registry, promoted)
        if dataset_version <= latest.manifest_version:
            return _say(echo, RetrainOutcome("no_new_data", f"retrain: no new data: {cfg.dataset} is at version "
                                             f"{dataset_version}, already used by v{latest.number} "
                                             f"({'promoted' if latest.promoted else 'kept out: ' + latest.reason}); "
                                             "nothing to do"))
        echo(f"retrain: dataset version {dataset_version} > {promoted.manifest_version} (promoted model "
             f"v{promoted.number}): fine-tuning a candidate")
        run = run_pipeline(retrain_spec(cfg, promoted), echo=echo)
        outputs = run.outputs()
        candidate_metrics = _read_json(outputs["benchmark"]["metrics"])
        decision = decide(candidate_metrics, _read_json(outputs["benchmark_promoted"]["metrics"]), cfg.gate)
        lease.check()  # promote only while the lock is still ours
        candidate = outputs["benchmark"]["model"]
        version = registry.register(ModelVersion(
            model=candidate, base=promoted.base, dataset=cfg.dataset,
            manifest_version=dataset_version, metrics=dict(candidate_metrics.get("gate", {})),
            metrics_url=outputs["benchmark"]["metrics"], checkpoint=checkpoint_of(outputs, candidate),
            reason=decision.reason, run=run.run_id), promote=decision.promote)
    status = "promoted" if decision.promote else "kept"
    message = f"retrain: registered v{version.number} ({version.model}); {decision.reason}"
    return _say(echo, RetrainOutcome(status, message, version, run))


def checkpoint_of(outputs: dict[str, dict], export: str) -> str:
    """The checkpoint of the training step that exported ``export`` ("" if no step of this run did)."""
    return next((str(out.get("checkpoint", "")) for out in outputs.values() if out.get("export") == export), "")


def latest_evaluated(registry: Registry, promoted: ModelVersion) -> ModelVersion:
    """The version trained on the newest data, promoted or not: a candidate that lost on dataset
    version N is not retrained on N again every night (its steps would be cached anyway)."""
    return max([promoted, *registry.versions()], key=lambda v: (v.manifest_version, v.number))


def retrain_spec(cfg: RetrainConfig, promoted: ModelVersion):
    spec = load_spec(cfg.pipeline, [f"storage={cfg.storage}", f"vars.dataset={cfg.dataset}",
                                    f"vars.base_model={promoted.base}", f"vars.promoted_model={promoted.model}",
                                    *cfg.overrides])
    for step, output in REQUIRED_OUTPUTS.items():
        if step not in spec.steps:
            raise ValueError(f"the retrain pipeline {cfg.pipeline} needs a step named {step!r} (output {output!r}); "
                             f"it has {list(spec.steps)}")
    return spec


def register_initial(registry: Registry, cfg: RetrainConfig, echo) -> ModelVersion:
    initial = cfg.initial
    if not (initial.model and initial.base):
        raise ValueError(f"the model registry at {registry.url} has no promoted model yet: set initial.model (a "
                         "MeanFlow export) and initial.base (the flow-matching export it was fine-tuned from)")
    version = initial.manifest_version or _export_manifest_version(initial.model)
    echo(f"retrain: registering the initial model {initial.model} (dataset version {version}) as promoted")
    return registry.register(ModelVersion(model=initial.model, base=initial.base, dataset=cfg.dataset,
                                          manifest_version=version, reason="initial model (retrain config initial.*)"),
                             promote=True)


def append_new_data(cfg: RetrainConfig, echo) -> None:
    from data_prep.job import run_prep
    run_prep(_prep_config(cfg.prep, cfg.dataset), echo=echo)


def _prep_config(prep: dict, dataset: str):
    from data_prep.config import PrepConfig
    return from_dict(PrepConfig, {**prep, "out": dataset}, path="prep", validate=True)


def _prep_config_problems(prep: dict, dataset: str) -> list[str]:
    try:
        _prep_config(prep, dataset)
    except ConfigError as err:
        return err.problems
    return []


def decide(candidate: dict, promoted: dict, gate: GateConfig) -> Decision:
    """Promote unless the candidate falls more than ``gate.margin`` below the promoted model at some step count."""
    scores = {steps: (meanflow_score(candidate, steps, gate.guidance), meanflow_score(promoted, steps, gate.guidance))
              for steps in gate.steps}
    shown = ", ".join(f"{s}-step {c:.3f} vs {p:.3f}" for s, (c, p) in scores.items())
    worse = [s for s, (c, p) in scores.items() if c < p - gate.margin]
    if worse:
        return Decision(False, f"kept the promoted model: the candidate regresses by more than the margin "
                               f"{gate.margin:g} at {', '.join(f'{s} step(s)' for s in worse)} (candidate vs promoted: "
                               f"{shown})", scores)
    return Decision(True, f"promoted: no regression beyond the margin {gate.margin:g} (candidate vs promoted: {shown})",
                    scores)


def meanflow_score(metrics: dict, steps: int, guidance: float) -> float:
    """Overall accuracy of the evaluated model (role "model") at ``steps`` from `emf eval benchmark`'s metrics.json."""
    bench = metrics.get("benchmark") or {}
    names = {name for name, model in bench.get("models", {}).items() if model.get("role") == "model"}
    for sampler in bench.get("samplers", []):
        if sampler["model"] in names and sampler["steps"] == steps and sampler["guidance"] == guidance:
            return float(sampler["overall"])
    labels = [s.get("label") for s in bench.get("samplers", [])]
    raise ValueError(f"the benchmark has no score for the evaluated model at {steps} step(s), guidance {guidance:g} "
                     f"(it scored {labels}); add {steps} to the evaluation's benchmark.meanflow_steps")


def _export_manifest_version(model_url: str) -> int:
    info = _read_json(storage.join(model_url, "emf_model.json"))
    version = (info.get("training") or {}).get("manifest_version")
    if not isinstance(version, int):
        raise ValueError(f"{model_url}/emf_model.json does not record the dataset version it was trained on; "
                         "set initial.manifest_version")
    return version


def _read_json(url: str) -> dict:
    fs, path = storage.filesystem(url)
    with fs.open(path, "r") as f:
        return json.load(f)


def _say(echo, outcome: RetrainOutcome) -> RetrainOutcome:
    echo(outcome.message)
    return outcome
