"""`emf pipeline run SPEC`: run the steps in order, skip the ones that already ran, record everything.

Content-addressed skipping. Before a step runs, its references are resolved and its config is
parsed; the step's fingerprint is the hash of its kind, its typed config (the values that differ
from the defaults, so a new config field does not change it) and the content identity of every
input URL (steps.artifact_identity). A finished step leaves
``<storage>/cache/<fingerprint>.json`` with its outputs; the next run that computes the same
fingerprint, and still finds those outputs, reuses them instead of running. So an unchanged
step never runs twice, a changed one (or one whose input changed) runs again along with every
step that reads its outputs, and a run that failed at step k resumes at step k: steps before k
are in the cache, step k is not. Code changes do not invalidate the cache (the git revision is
recorded, not hashed); `--force STEP` reruns a step by hand.

Storage layout::

    steps/<name>/<fingerprint[:16]>/   a step's outputs (one folder per distinct config and inputs;
                                       prep keeps one stable folder, since it appends)
    cache/<fingerprint>.json           what a finished step produced
    runs/<run id>.json                 the run record: spec, steps, timings, artifacts, git revision
    runs/latest.json                   the last run's id and status
    lock/                              the lease lock: one run per storage at a time
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from emf_dist import storage
from emf_dist.config import non_defaults, to_dict
from emf_dist.storage import Store
from pipelines.lock import LeaseLock
from pipelines.spec import PipelineSpec, StepSpec, resolve
from pipelines.steps import KINDS, StepContext, artifact_identity

LOCK_TTL_S = 300.0


@dataclass
class StepRecord:
    name: str
    kind: str
    status: str = "pending"         # ran | cached | failed | pending (never reached)
    fingerprint: str = ""
    dir: str = ""
    seconds: float = 0.0
    config: dict = field(default_factory=dict)   # the resolved, typed config it ran with
    inputs: dict = field(default_factory=dict)   # input URL -> content identity
    outputs: dict = field(default_factory=dict)
    cached_from: str = ""           # the run that produced a reused result
    error: str = ""
    traceback: str = ""


@dataclass
class RunRecord:
    pipeline: str
    run_id: str
    storage: str
    status: str = "running"         # running | succeeded | failed
    started: str = ""
    finished: str = ""
    seconds: float = 0.0
    code: dict = field(default_factory=dict)     # git revision and whether the tree had local changes
    spec: dict = field(default_factory=dict)
    resumes: str = ""               # the failed run this one picks up after
    steps: list[StepRecord] = field(default_factory=list)

    def outputs(self) -> dict[str, dict]:
        return {s.name: s.outputs for s in self.steps if s.status in ("ran", "cached")}


class PipelineFailed(RuntimeError):
    def __init__(self, record: RunRecord, step: StepRecord):
        self.record, self.step = record, step
        super().__init__(f"step {step.name} ({step.kind}) failed: {step.error}\n"
                         f"run record: {Store(record.storage).url_of('runs', record.run_id + '.json')}; "
                         f"rerun the same command to resume at step {step.name} (finished steps are skipped)")


def run_pipeline(spec: PipelineSpec, force: tuple[str, ...] = (), lock_wait_s: float = 0.0,
                 echo: Callable[[str], None] = print) -> RunRecord:
    unknown = [name for name in force if name not in spec.steps]
    if unknown:
        raise ValueError(f"--force names unknown steps {unknown}; steps: {list(spec.steps)}")
    store = Store(spec.storage)
    record = RunRecord(pipeline=spec.name, run_id=_new_run_id(), storage=store.url, started=_now(),
                       code=code_revision(), spec=to_dict(spec), resumes=_failed_run_to_resume(store),
                       steps=[StepRecord(name, step.kind) for name, step in spec.steps.items()])
    lock = LeaseLock(store.url_of("lock"), ttl_s=LOCK_TTL_S, purpose=f"pipeline {spec.name} run {record.run_id}")
    with lock.acquire(wait_s=lock_wait_s) as lease:
        echo(f"pipeline {spec.name}: run {record.run_id} in {store.url}"
             + (f" (resuming after failed run {record.resumes})" if record.resumes else ""))
        started = time.perf_counter()
        try:
            for index, (name, step) in enumerate(spec.steps.items()):
                echo(f"[{index + 1}/{len(spec.steps)}] {name} ({step.kind})")
                lease.check()  # a run that stalled past its lease stops here instead of racing its successor
                _run_step(spec, store, step, record.steps[index], record.outputs(), name in force, record, echo)
                _save(store, record)
            record.status = "succeeded"
        except BaseException:
            record.status = "failed"
            raise
        finally:
            record.finished, record.seconds = _now(), round(time.perf_counter() - started, 3)
            _save(store, record)
    failed = [s for s in record.steps if s.status == "failed"]
    echo(f"pipeline {spec.name}: {record.status} in {record.seconds:.1f} s; record "
         f"{store.url_of('runs', record.run_id + '.json')}" + (f"; failed step {failed[0].name}" if failed else ""))
    return record


def _run_step(spec: PipelineSpec, store: Store, step: StepSpec, rec: StepRecord, outputs: dict[str, dict],
              forced: bool, record: RunRecord, echo) -> None:
    kind = KINDS[step.kind]
    started = time.perf_counter()
    try:
        cfg = _resolve(spec, store, step, rec, outputs)
        cached = None if forced or kind.incremental else _cached(store, kind, rec.fingerprint)
        if cached is not None:
            rec.status, rec.outputs, rec.cached_from = "cached", cached["outputs"], cached["run"]
            echo(f"  unchanged since run {cached['run']}: skipped")
            return
        rec.outputs = kind.run(cfg, StepContext(rec.name, rec.dir, echo))
        rec.status = "ran"
        if not kind.incremental:
            store.write_json({"fingerprint": rec.fingerprint, "step": rec.name, "kind": step.kind, "run": record.run_id,
                              "outputs": rec.outputs, "finished": _now()}, "cache", rec.fingerprint + ".json")
    except Exception as err:
        rec.status, rec.error = "failed", f"{type(err).__name__}: {err}"
        rec.traceback = traceback.format_exc()[-8000:]
        echo(rec.traceback)
        raise PipelineFailed(record, rec) from err
    except BaseException:  # Ctrl-C, a killed job: recorded, and not dressed up as a step error
        rec.status, rec.error = "failed", "interrupted"
        raise
    finally:
        rec.seconds = round(time.perf_counter() - started, 3)


def _resolve(spec: PipelineSpec, store: Store, step: StepSpec, rec: StepRecord, outputs: dict[str, dict]):
    """References -> values, then the fingerprint (kind, typed config, inputs' content), then the step's
    folder (named by the fingerprint, which is why ${step.dir} is resolved last) -> the config it runs with,
    as the kind resolves it (a training step's architecture from init_from): that is what the record shows.
    The fingerprint stays on the spec's config, which with the inputs' content determines the resolved one."""
    kind = KINDS[step.kind]
    lookup = {"storage": store.url, **{f"vars.{k}": v for k, v in spec.vars.items()},
              **{f"steps.{s}.{o}": v for s, outs in outputs.items() for o, v in outs.items()}}
    raw = resolve(step.config, lookup, keep=("step.dir",))
    parsed = kind.parse(raw)
    rec.inputs = {url: artifact_identity(url) for url in kind.inputs(parsed)}
    rec.fingerprint = fingerprint(step.kind, non_defaults(parsed), rec.inputs)
    rec.dir = store.url_of("steps", rec.name, *(() if kind.incremental else (rec.fingerprint[:16],)))
    cfg = kind.resolved(kind.parse({**kind.defaults(rec.dir, rec.name), **resolve(raw, {"step.dir": rec.dir})}))
    rec.config = to_dict(cfg)
    return cfg


def fingerprint(kind: str, config: dict, inputs: dict[str, str]) -> str:
    payload = json.dumps({"kind": kind, "config": config, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _cached(store: Store, kind, fp: str) -> dict | None:
    entry = store.read_json("cache", fp + ".json")
    if entry is None:
        return None
    for name in kind.url_outputs:  # outputs deleted since: run again rather than hand on a dangling URL
        url = entry["outputs"].get(name)
        if not url or not _exists(url):
            return None
    return entry


def _exists(url: str) -> bool:
    fs, path = storage.filesystem(url)
    return fs.exists(path)


def _save(store: Store, record: RunRecord) -> None:
    store.write_json(to_dict(record), "runs", record.run_id + ".json")
    store.write_json({"run_id": record.run_id, "status": record.status}, "runs", "latest.json")


def _failed_run_to_resume(store: Store) -> str:
    latest = store.read_json("runs", "latest.json")
    return latest["run_id"] if latest and latest.get("status") != "succeeded" else ""


def code_revision() -> dict[str, Any]:
    """The git revision of the emf-dist code running this, and whether it had uncommitted changes.
    A Ray job's working copy has no .git: `emf submit` passes the submitter's revision along."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                               check=True, timeout=10).stdout.strip() != ""
        return {"revision": rev, "dirty": dirty, "source": "git"}
    except (OSError, subprocess.SubprocessError):
        submitted = os.environ.get("EMF_GIT_REVISION")
        if submitted:
            return {**json.loads(submitted), "source": "submitter"}
        return {"revision": "unknown", "source": "no git checkout"}


def _new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
