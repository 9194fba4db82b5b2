"""`emf demo`, the README's first command: the whole EMF pipeline on a local Ray head with token
auth, at a tiny budget. Every artifact it promises exists where it says and is usable, and
`emf retrain` takes its model through a real retrain (prep append, fine-tune, benchmark, gate)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from emf_app.cli import main as emf
from emf_dist.manifest import read_manifest
from pipelines.registry import Registry
from tests.demo_run import EMF_SPEC, REPO, TRAIN_STEPS, tiny_steps
from tests.helpers import ray_chatter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tiny_demo) -> dict:
    return tiny_demo


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


def test_no_fit_waits_for_ray_datas_autoscaling_coordinator_to_start(demo):
    # The demo starts the coordinator when its driver joins the head; left to the first fit, its start
    # outlasts Ray Train's 5-s requests on a busy machine, and the fit waits them out.
    assert demo["resource_request_timeouts"] == 0


def test_demo_rejects_a_bad_override_before_starting_anything(tmp_path, capsys):
    assert emf(["demo", "--out", str(tmp_path / "d"), "steps.pretrain.config.stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_the_demo_shows_each_training_progress_line_once_without_ray_trains_report_dumps(demo):
    progress = [line for line in demo["log"].splitlines() if re.search(r"step \d+/\d+  loss", line)]
    # rank 0's line every second step of each training step, printed as the project's, without Ray's prefix
    expected = sum(tiny_steps(EMF_SPEC["steps"][step]) // 2 for step in TRAIN_STEPS)
    assert len(progress) == expected and all(line.startswith("step ") for line in progress), \
        demo["log"][-3000:]
    assert len(progress) == len(set(progress)), "a progress line printed twice"
    assert "Reporting training result" not in demo["log"]
    assert ray_chatter(demo["log"]) == [], "\n".join(ray_chatter(demo["log"]))
    assert "(TrainController pid=" in Path(demo["out"], "logs", "demo.log").read_text()  # where Ray's lines went


def test_the_terminal_names_each_step_and_what_prep_wrote(demo):
    steps = list(yaml.safe_load((REPO / "pipelines/specs/emf.yaml").read_text())["steps"].items())
    assert f"goes to {Path(demo['out'], 'logs', 'demo.log')}" in demo["stdout"].splitlines()[0]
    for index, (name, step) in enumerate(steps):
        assert f"[{index + 1}/{len(steps)}] {name} ({step['kind']})" in demo["stdout"]
    assert "prep: 64 samples in 2 new shards" in demo["stdout"]


def test_the_log_file_holds_rays_the_workers_and_wandbs_output(demo):
    log = Path(demo["out"], "logs", "demo.log").read_text()
    assert "(RayTrainWorker pid=" in log and "wandb: " in log  # the pretrain step logs to wandb offline
    assert list(Path(demo["pretrain"], "wandb").glob("offline-run-*")), "the offline run is not beside the run"
    assert re.search(r"\[\d+/\d+\] pretrain \(train\)", log)  # the project's lines too, for context


def test_each_training_run_writes_its_loss_curve(demo):
    for step in TRAIN_STEPS:
        rows = [json.loads(line) for line in Path(demo[step], "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == list(range(2, tiny_steps(EMF_SPEC["steps"][step]) + 1, 2)), step
        assert Image.open(Path(demo[step], "loss.png")).format == "PNG"


def test_the_fine_tunes_record_checkpoint_and_export_show_the_architecture_it_inherited(demo):
    record = json.loads(next(Path(demo["out"], "runs").glob("2*.json")).read_text())
    steps = {step["name"]: step for step in record["steps"]}
    parent = steps["pretrain"]["config"]["model"]
    assert (parent["input_size"], parent["prediction"], parent["width"]) == (16, "data", 32)
    inherited = {**parent, "time_embedding": "dual"}
    assert steps["finetune"]["config"]["model"] == inherited
    run_dir = Path(steps["finetune"]["outputs"]["run"])
    saved = [json.loads(p.read_text())["model"] for p in run_dir.glob("step_*/train_config.json")]
    assert saved and all(model == inherited for model in saved)
    assert json.loads(Path(steps["finetune"]["outputs"]["export"], "emf_model.json").read_text())["model"] == inherited


def test_the_demo_model_retrains_on_new_data_and_then_has_nothing_to_do(demo, tmp_path):
    """`emf retrain` with real training and evaluation: 32 new scenes are appended to the demo's
    shards, a candidate is fine-tuned from the demo's flow-matching parent, both models are
    benchmarked, the gate decides; a second run finds no new data."""
    prep = yaml.safe_load((REPO / "pipelines/specs/emf.yaml").read_text())["steps"]["prep"]["config"]
    prep["source"]["count"] = 96  # the demo wrote 64
    prep["samples_per_shard"] = 32
    retrain_spec = yaml.safe_load((REPO / "pipelines/specs/retrain.yaml").read_text())["steps"]
    tiny = [f"steps.{step}.config.{key}" for step in ("finetune", "distill") for key in (
        f"steps={tiny_steps(retrain_spec[step])}", "micro_batch=4", "checkpoint_every=2", "logging.wandb=disabled",
        "scaling.num_workers=1")]
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
