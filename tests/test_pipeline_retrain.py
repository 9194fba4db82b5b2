"""Retraining's building blocks on real storage: the lease lock, the model registry, and the
retrain decision (no new data / promote / keep with the reason / locked), each on a local folder
and on a real S3 API server (moto's server mode) on 127.0.0.1.

The retrain runs use a pipeline spec whose steps are small programs (kind `command`) standing in
for training and evaluation; everything else is real: manifests written by emf_dist.manifest,
metrics.json written by the evaluation's own emf_dist.eval.report.metrics, the registry, the lock,
the pipeline cache. The full chain with real training is the command in README.md.
"""
from __future__ import annotations

import json
import shutil
import sys
import threading
import time
import uuid

import fsspec
import numpy as np
import pytest

from emf_app.cli import main
from emf_dist import storage
from emf_dist.manifest import ImageSpec, Manifest, ShardEntry
from emf_dist.storage import Store
from pipelines.lock import LeaseLock, LockHeld, LockLost
from pipelines.registry import ModelVersion, Registry
from pipelines.retrain import GateConfig, InitialModel, LockOptions, RetrainConfig, decide, retrain
from pipelines.spec import load_spec
from tests.s3_server import s3_server

SECRET = "retrain-test-secret-Kq2"


@pytest.fixture(scope="module")
def s3():
    """A real S3 API server on 127.0.0.1; started before Ray so that workers inherit its endpoint."""
    with s3_server("emf-retrain", SECRET):
        yield "s3://emf-retrain"


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    """A fresh storage prefix: a local folder, or a prefix in the S3 server's bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"{request.getfixturevalue('s3')}/{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- the lease lock


def test_a_held_lock_makes_a_second_run_wait_then_give_up(base):
    lock = LeaseLock(f"{base}/lock", ttl_s=30, poll_s=0.2, purpose="first run")
    with lock.acquire() as first:
        started = time.monotonic()
        with pytest.raises(LockHeld, match="first run") as held:
            lock.acquire(wait_s=1.0)
        assert 1.0 <= time.monotonic() - started < 6
        assert held.value.holder["holder"] == first.holder
    with lock.acquire(wait_s=0) as second:  # released: the next run gets it at once
        assert second.holder != first.holder


def test_an_expired_lease_is_taken_over_and_its_holder_learns_it_lost(base):
    lock = LeaseLock(f"{base}/lock", ttl_s=1.5, poll_s=0.2)
    crashed = lock.acquire(heartbeat=False)  # never renewed, never released: a killed process
    with pytest.raises(LockHeld):
        lock.acquire(wait_s=0)  # still live
    started = time.monotonic()
    with lock.acquire(wait_s=15) as successor:
        assert time.monotonic() - started < 8
        assert [h["holder"] for h in lock.holders()] == [successor.holder]
        with pytest.raises(LockLost):
            crashed.check()
        assert successor.renew()


def test_a_stalled_holder_that_recreates_its_lease_steps_aside(base):
    lock = LeaseLock(f"{base}/lock", ttl_s=1.5, poll_s=0.2)
    stalled = lock.acquire(heartbeat=False)
    with lock.acquire(wait_s=15) as successor:
        # The stalled holder wakes up and its renewal rewrites the lease the successor deleted.
        lock.store.write_json(stalled.doc, stalled.name)
        assert not stalled.renew() and stalled.lost
        assert successor.renew()
        assert [h["holder"] for h in lock.holders()] == [successor.holder]


def test_only_one_holder_at_a_time_under_contention(base):
    lock = LeaseLock(f"{base}/lock", ttl_s=30, poll_s=0.05)
    inside, entries, violations = [0], [], []
    guard = threading.Lock()

    def contender(name: str) -> None:
        for _ in range(2):
            with lock.acquire(wait_s=60):
                with guard:
                    inside[0] += 1
                    if inside[0] != 1:
                        violations.append(name)
                    entries.append(name)
                time.sleep(0.05)
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=contender, args=(f"t{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert violations == [] and len(entries) == 6


# ---------------------------------------------------------------- the registry


def _version(n: int, **kw) -> ModelVersion:
    return ModelVersion(model=f"models/mf{n}", base="models/fm", dataset="data", manifest_version=n,
                        metrics={"meanflow-1step": 0.1 * n}, **kw)


def test_registry_promotes_atomically_and_keeps_every_version(base):
    registry = Registry(f"{base}/registry")
    assert registry.promoted() is None and registry.versions() == []
    first = registry.register(_version(1), promote=True)
    kept = registry.register(_version(2, reason="regressed"), promote=False)
    assert registry.promoted().id == first.id  # a kept-out candidate does not move the pointer
    third = registry.register(_version(3), promote=True)
    assert registry.promoted() == third
    assert [v.number for v in registry.versions()] == [1, 2, 3]
    assert registry.get(first.id) == first and registry.get(kept.id).reason == "regressed"
    assert [v.promoted for v in registry.versions()] == [True, False, True]


def test_readers_never_see_a_half_written_promotion(base):
    registry = Registry(f"{base}/registry")
    registry.register(_version(1), promote=True)
    seen, errors, done = [], [], threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                seen.append(registry.promoted().number)
            except Exception as err:  # a torn or missing pointer would land here
                errors.append(err)

    thread = threading.Thread(target=reader)
    thread.start()
    for n in range(2, 12):
        registry.register(_version(n), promote=True)
    done.set()
    thread.join()
    assert errors == [] and seen and seen == sorted(seen)
    assert registry.promoted().number == 11


# ---------------------------------------------------------------- retrain

# Stands in for `emf train`: writes an export folder that records what the step was given.
HELPER = '''
import json, os, sys

url = os.environ["EMF_STEP_DIR"] + "/export/emf_model.json"
text = json.dumps({"base": sys.argv[1], "dataset": sys.argv[2]})
if "://" in url:  # s3: import fsspec only then; a local write stays a fast start on a busy machine
    import fsspec
    from emf_dist import storage
    with fsspec.open(url, "w", **storage.storage_options(url)) as f:
        f.write(text)
else:
    os.makedirs(os.path.dirname(url), exist_ok=True)
    with open(url, "w") as f:
        f.write(text)
'''

# The benchmark steps stand in for `emf eval benchmark`: their output is a metrics.json the test
# wrote with the evaluation's own writer (the step runs `true`, so no Python start per step).
SPEC = '''
name: retrain-test
storage: unused
vars: {{dataset: "", base_model: "", promoted_model: "", candidate_metrics: "", promoted_metrics: ""}}
steps:
  finetune:
    kind: command
    config:
      argv: [{py}, {helper}, "${{vars.base_model}}", "${{vars.dataset}}"]
      inputs: ["${{vars.dataset}}"]
      outputs: {{export: "${{step.dir}}/export", checkpoint: "${{step.dir}}/checkpoint"}}
  benchmark:
    kind: command
    config:
      argv: [{true}]
      inputs: ["${{steps.finetune.export}}", "${{vars.candidate_metrics}}"]
      outputs: {{metrics: "${{vars.candidate_metrics}}", model: "${{steps.finetune.export}}"}}
  benchmark_promoted:
    kind: command
    config:
      argv: [{true}]
      inputs: ["${{vars.promoted_model}}", "${{vars.promoted_metrics}}"]
      outputs: {{metrics: "${{vars.promoted_metrics}}"}}
'''


def benchmark_metrics(scores: dict[int, float]) -> dict:
    """metrics.json as `emf eval benchmark` writes it, for one MeanFlow model at these step counts."""
    from emf_dist.eval.benchmark import BenchmarkConfig, BenchmarkResult, SamplerResult
    from emf_dist.eval.report import metrics
    from emf_dist.eval.sampling import SamplerSpec

    samplers = [SamplerResult(SamplerSpec("meanflow", True, steps), {}, score, {}, None, 4)
                for steps, score in scores.items()]
    result = BenchmarkResult(BenchmarkConfig(), 8, [], samplers, [], {}, np.zeros((0, 8, 8, 3)), None,
                             models={"meanflow": {"dir": "m", "role": "model", "mean_flow": True}})
    return json.loads(json.dumps(metrics(result, None, None, "not computed")))


def write_manifest(dataset: str, version: int) -> None:
    manifest = Manifest(version=version, shards=[ShardEntry(f"{i:06d}.tar", 10, 100, f"{i:064x}", i + 1)
                                                 for i in range(version)],
                        encoder={"name": "minilm"}, image=ImageSpec(shape=[3, 8, 8]),
                        text_shapes={"tokens": [8, 384], "mask": [8], "pooled": [384]}, source={"kind": "scenes"})
    with fsspec.open(f"{dataset}/manifest.json", "w", **storage.storage_options(dataset)) as f:
        f.write(manifest.to_json())


@pytest.fixture
def setup(base, tmp_path):
    helper = tmp_path / "fake_step.py"
    helper.write_text(HELPER)
    spec = tmp_path / "retrain-test.yaml"
    spec.write_text(SPEC.format(py=json.dumps(sys.executable), helper=json.dumps(str(helper)),
                                true=json.dumps(shutil.which("true"))))
    for model in ("mf-initial", "fm-base"):  # the initial export must exist: it is a step input
        with fsspec.open(f"{base}/models/{model}/emf_model.json", "w", **storage.storage_options(base)) as f:
            f.write(json.dumps({"training": {"manifest_version": 1}}))

    def metrics_file(name: str, scores: dict[int, float]) -> str:
        path = tmp_path / f"{name}-{uuid.uuid4().hex[:6]}.json"
        path.write_text(json.dumps(benchmark_metrics(scores)))
        return str(path)

    def config(candidate: dict, promoted: dict, **kw) -> RetrainConfig:
        return RetrainConfig(
            registry=f"{base}/registry", dataset=f"{base}/data", storage=f"{base}/retrain", pipeline=str(spec),
            overrides=[f"vars.candidate_metrics={metrics_file('candidate', candidate)}",
                       f"vars.promoted_metrics={metrics_file('promoted', promoted)}"],
            initial=InitialModel(model=f"{base}/models/mf-initial", base=f"{base}/models/fm-base"),
            lock=LockOptions(ttl_s=30, wait_s=0), **kw)
    return base, config


def test_retrain_no_new_data_then_promote_then_keep_with_the_reason(setup):
    base, config = setup
    registry = Registry(f"{base}/registry")
    write_manifest(f"{base}/data", 1)

    outcome = retrain(config({1: 0.9}, {1: 0.5}))
    assert outcome.status == "no_new_data" and "version 1" in outcome.message
    assert registry.promoted().model == f"{base}/models/mf-initial"  # registered, read from its emf_model.json
    assert not Store(f"{base}/retrain").exists("runs", "latest.json")  # nothing ran

    write_manifest(f"{base}/data", 2)
    outcome = retrain(config({1: 0.69, 2: 0.8}, {1: 0.70}, gate=GateConfig(margin=0.02)))
    assert outcome.status == "promoted", outcome.message
    promoted = registry.promoted()
    assert (promoted.number, promoted.manifest_version, promoted.base) == (2, 2, f"{base}/models/fm-base")
    assert promoted.metrics["meanflow-1step"] == 0.69 and "candidate" in promoted.metrics_url
    # the benchmarked model is the candidate; its checkpoint is that of the step that exported it
    assert promoted.checkpoint == promoted.model.removesuffix("/export") + "/checkpoint"
    with fsspec.open(f"{promoted.model}/emf_model.json", "r", **storage.storage_options(base)) as f:
        trained = json.load(f)  # the fine-tune started from the promoted lineage's base, on the dataset
    assert trained == {"base": f"{base}/models/fm-base", "dataset": f"{base}/data"}

    write_manifest(f"{base}/data", 3)
    outcome = retrain(config({1: 0.60}, {1: 0.70}, gate=GateConfig(margin=0.02)))
    assert outcome.status == "kept"
    assert registry.promoted().number == 2
    kept = registry.versions()[-1]
    assert (kept.number, kept.promoted, kept.manifest_version) == (3, False, 3)
    assert "regresses" in kept.reason and "0.600 vs 0.700" in kept.reason

    again = retrain(config({1: 0.60}, {1: 0.70}))  # nothing newer than the candidate that lost
    assert again.status == "no_new_data" and "v3" in again.message
    assert len(registry.versions()) == 3


def test_a_second_retrain_exits_cleanly_while_one_holds_the_lock(setup, capsys):
    base, config = setup
    write_manifest(f"{base}/data", 1)
    cfg = config({1: 0.9}, {1: 0.5})
    with LeaseLock(f"{base}/registry/lock", ttl_s=30).acquire():
        started = time.monotonic()
        outcome = retrain(RetrainConfig(**{**cfg.__dict__, "lock": LockOptions(ttl_s=30, wait_s=1.0)}))
        assert outcome.status == "locked" and time.monotonic() - started >= 1.0
        code = main(["retrain", f"registry={cfg.registry}", f"dataset={cfg.dataset}", f"storage={cfg.storage}",
                     f"pipeline={cfg.pipeline}", f"initial.model={cfg.initial.model}",
                     f"initial.base={cfg.initial.base}"])
        assert code == 0 and "another retrain is running" in capsys.readouterr().out
    assert Registry(cfg.registry).promoted() is None  # the locked-out runs changed nothing


def test_retrain_takes_over_the_lock_of_a_crashed_run(setup):
    base, config = setup
    write_manifest(f"{base}/data", 1)
    LeaseLock(f"{base}/registry/lock", ttl_s=1.5).acquire(heartbeat=False)  # the crashed run's lease
    cfg = config({1: 0.9}, {1: 0.5})
    outcome = retrain(RetrainConfig(**{**cfg.__dict__, "lock": LockOptions(ttl_s=30, wait_s=15)}))
    assert outcome.status == "no_new_data"


def test_gate_compares_every_configured_step_count():
    candidate, promoted = benchmark_metrics({1: 0.70, 2: 0.75}), benchmark_metrics({1: 0.71, 2: 0.80})
    assert decide(candidate, promoted, GateConfig(steps=(1,), margin=0.02)).promote
    keep = decide(candidate, promoted, GateConfig(steps=(1, 2), margin=0.02))
    assert not keep.promote and "2 step(s)" in keep.reason and keep.scores[2] == (0.75, 0.80)
    with pytest.raises(ValueError, match="no score for the evaluated model at 4 step"):
        decide(candidate, promoted, GateConfig(steps=(4,)))


def test_retrain_config_is_checked_before_anything_runs(tmp_path):
    from emf_dist.config import ConfigError, parse_cli
    with pytest.raises(ConfigError) as err:
        parse_cli(RetrainConfig, ["gate.margin=-1", "prep.out=elsewhere", f"dataset={tmp_path}"])
    assert "gate.margin must be >= 0" in str(err.value) and "prep.out must be left out" in str(err.value)
    with pytest.raises(ConfigError, match="source.kindd"):
        parse_cli(RetrainConfig, [f"dataset={tmp_path}", "prep.source.kindd=folder"])


def test_retrain_trains_its_candidate_with_the_emf_recipe():
    """A candidate is compared with the promoted model: both must be made the same way."""
    def train_configs(name: str) -> dict:
        spec = load_spec(name)
        # what a run is, minus where its inputs come from (the two specs read different datasets)
        return {name: {k: v for k, v in step.config.items() if k not in ("init_from", "data", "logging")}
                for name, step in spec.steps.items() if step.kind == "train" and name != "pretrain"}

    emf, retrain = train_configs("emf"), train_configs("retrain")
    assert set(retrain) == {"finetune", "distill"}
    for name, config in retrain.items():
        assert config == emf[name], name
