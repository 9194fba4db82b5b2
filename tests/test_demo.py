"""`emf demo`, the README's first command: the whole EMF pipeline on a local Ray head with token
auth, at a tiny budget. Every artifact it promises exists where it says and is usable, and
`emf retrain` takes its model through a real retrain (prep append, fine-tune, benchmark, gate)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cluster import auth, local
from emf_app.cli import main as emf
from emf_dist.manifest import read_manifest
from pipelines.registry import Registry
from tests.helpers import free_port, ray_chatter

REPO = Path(__file__).resolve().parents[1]

TINY = ["steps.encoders.config.require_selection=false",
        "steps.encoders.config.eval.discriminability.scenes=20", "steps.encoders.config.eval.disentanglement.prompts=8",
        "steps.prep.config.source.count=64", "steps.prep.config.samples_per_shard=32",
        "steps.benchmark.config.eval.benchmark.prompts_per_task=1",
        "steps.benchmark.config.eval.benchmark.images_per_prompt=2",
        "steps.benchmark.config.eval.benchmark.calibration_scenes=12"]
TRAIN_STEPS = [name for name, step in yaml.safe_load((REPO / "pipelines/specs/emf.yaml").read_text())["steps"].items()
               if step["kind"] == "train"]
for step in TRAIN_STEPS:
    TINY += [f"steps.{step}.config.steps=4", f"steps.{step}.config.micro_batch=4",
             f"steps.{step}.config.checkpoint_every=2", f"steps.{step}.config.logging.sample_every=2",
             f"steps.{step}.config.logging.wandb=disabled"]
TINY += ["steps.pretrain.config.model.width=32", "steps.pretrain.config.model.heads=2",
         "steps.pretrain.config.model.depth=1"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, str]:
    """Runs the tiny demo once; returns what it printed: {"report": ..., "shards": ..., ...}."""
    tmp_path = tmp_path_factory.mktemp("demo")
    root = Path(tempfile.mkdtemp(prefix="emfdemo-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    cluster = dict(port=free_port(), dashboard_port=free_port(), client_server_port=free_port(),
                   dashboard_agent_listen_port=free_port(), num_cpus=2, temp_dir=str(root / "ray"),
                   state_file=str(root / "cluster.json"))
    # A process of its own, as `emf demo` runs: Ray's drivers keep logging handlers and settings.
    script = ("import json, sys; from cluster.local import LocalClusterConfig; from emf_app.demo import run_demo; "
              "run_demo(sys.argv[1], json.loads(sys.argv[2]), LocalClusterConfig(**json.loads(sys.argv[3])))")
    env = {**os.environ, auth.TOKEN_PATH_VAR: str(root / "auth_token")}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "demo"), json.dumps(TINY), json.dumps(cluster)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert local.running_state(local.LocalClusterConfig(**cluster)) is None  # the head it started is stopped
    shutil.rmtree(root, ignore_errors=True)

    assert "pipeline emf: succeeded" in done.stdout
    return {**dict(re.findall(r"^  (\w+): +(\S+)", done.stdout, re.MULTILINE)), "out": str(tmp_path / "demo"),
            "log": done.stdout + done.stderr}


def test_demo_runs_the_pipeline_on_its_own_head_and_says_where_everything_is(demo, tmp_path):
    paths = demo
    report = Path(paths["report"])
    assert report.is_file() and str(report).startswith(paths["out"])
    metrics = json.loads((report.parent / "metrics.json").read_text())
    assert {"meanflow-1step", "flow_matching-32step"} <= set(metrics["gate"])
    assert list(report.parent.glob("*.png")), "no sample grids or plot next to the report"
    assert (Path(paths["shards"]) / "manifest.json").is_file()
    assert TRAIN_STEPS[:2] == ["pretrain", "finetune"] and len(TRAIN_STEPS) > 2  # then the distillation rounds
    for run in (paths[step] for step in TRAIN_STEPS):
        assert list(Path(run).rglob("ds")), f"no DeepSpeed checkpoint in {run}"
        assert list(Path(run).rglob("samples/*.png")), f"no sample grid in {run}"
    image = tmp_path / "red.png"
    assert emf(["generate", "--model", paths["model"], "--steps", "1", "--out", str(image), "a red circle"]) == 0
    assert np.asarray(Image.open(image)).shape == (16, 16, 3)


def test_demo_rejects_a_bad_override_before_starting_anything(tmp_path, capsys):
    assert emf(["demo", "--out", str(tmp_path / "d"), "steps.pretrain.config.stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_the_demo_shows_each_training_progress_line_once_without_ray_trains_report_dumps(demo):
    progress = [line for line in demo["log"].splitlines() if re.search(r"step \d+/\d+  loss", line)]
    assert progress, demo["log"][-3000:]
    assert len(progress) == len(set(progress)), "a progress line printed twice"
    assert "Reporting training result" not in demo["log"]
    assert ray_chatter(demo["log"]) == [], "\n".join(ray_chatter(demo["log"]))
    assert "(TrainController pid=" in Path(demo["out"], "logs", "demo.log").read_text()  # where Ray's lines went


def test_the_demo_model_retrains_on_new_data_and_then_has_nothing_to_do(demo, tmp_path):
    """`emf retrain` with real training and evaluation: 32 new scenes are appended to the demo's
    shards, a candidate is fine-tuned from the demo's flow-matching parent, both models are
    benchmarked, the gate decides; a second run finds no new data."""
    prep = yaml.safe_load((REPO / "pipelines/specs/emf.yaml").read_text())["steps"]["prep"]["config"]
    prep["source"]["count"] = 96  # the demo wrote 64
    prep["samples_per_shard"] = 32
    tiny = [f"steps.{step}.config.{key}" for step in ("finetune", "distill_1", "distill_2") for key in (
        "steps=4", "micro_batch=4", "checkpoint_every=2", "logging.wandb=disabled", "scaling.num_workers=1")]
    for step in ("benchmark", "benchmark_promoted"):
        tiny += [f"steps.{step}.config.eval.benchmark.{key}" for key in (
            "prompts_per_task=1", "images_per_prompt=2", "calibration_scenes=12")]
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump({
        "registry": str(tmp_path / "registry"), "dataset": demo["shards"], "storage": str(tmp_path / "retrain"),
        "prep": prep, "overrides": tiny, "gate": {"steps": [1, 2]},
        "initial": {"model": demo["model"], "base": str(Path(demo["pretrain"]) / "export")}}))

    def retrain() -> str:
        done = subprocess.run([sys.executable, "-m", "emf_app.cli", "retrain", str(config)], cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    out = retrain()
    registry = Registry(str(tmp_path / "registry"))
    initial, candidate = registry.versions()
    assert (initial.manifest_version, candidate.manifest_version) == (1, 2)
    assert read_manifest(demo["shards"]).total_samples == 96
    assert Path(candidate.model, "model.safetensors").is_file() and candidate.model.startswith(str(tmp_path))
    assert set(candidate.metrics) >= {"meanflow-1step", "meanflow-2step"}
    promoted = registry.promoted()
    if promoted.number == candidate.number:
        assert "retrain: registered v2" in out and candidate.reason.startswith("promoted")
    else:
        assert promoted.number == initial.number and candidate.reason.startswith("kept the promoted model")
    assert "no new data" in retrain()
    assert len(registry.versions()) == 2
