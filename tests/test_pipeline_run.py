"""`emf pipeline run`: content-addressed skipping, resume at the failed step, run records, spec
errors before anything runs; on a local folder and on a real S3 API server on 127.0.0.1.

Steps here are `command` steps (small programs), so what is tested is the pipeline machinery
itself; the other kinds are thin adapters over `emf prep/train/eval` with their own tests.
"""
from __future__ import annotations

import json
import shutil
import sys
import uuid

import pytest

from emf_app.cli import main
from emf_dist.config import ConfigError
from emf_dist.storage import Store
from pipelines.lock import LeaseLock
from pipelines.run import PipelineFailed, run_pipeline
from pipelines.spec import load_spec
from tests.s3_server import s3_server


@pytest.fixture(scope="module")
def s3():
    with s3_server("emf-pipelines", "pipeline-secret"):
        yield "s3://emf-pipelines"


@pytest.fixture(params=["local", "s3"])
def storage_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs")
    return f"{request.getfixturevalue('s3')}/{uuid.uuid4().hex[:8]}"


def write_spec(path, steps: dict, **top) -> str:
    path.write_text(json.dumps({"name": "test", "storage": str(path.parent / "runs"), "steps": steps, **top}))
    return str(path)


def counting_step(log, name: str, fail_unless: str = "", extra: dict | None = None) -> dict:
    """A step that appends its name to `log` (so runs can be counted) and fails while `fail_unless` is missing."""
    code = (f"import os, sys; open({str(log)!r}, 'a').write({name!r} + '\\n'); "
            f"sys.exit(0 if not {fail_unless!r} or os.path.exists({fail_unless!r}) else 3)")
    return {"kind": "command", "config": {"argv": [sys.executable, "-c", code], **(extra or {})}}


def ran(log) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_failed_step_resumes_there_and_finished_steps_are_skipped(tmp_path, storage_url):
    log, flag = tmp_path / "log.txt", tmp_path / "flag"
    steps = {"a": counting_step(log, "a", extra={"outputs": {"note": "from a"}}),
             "b": counting_step(log, "b", fail_unless=str(flag), extra={"outputs": {"seen": "${steps.a.note}"}}),
             "c": counting_step(log, "c")}
    spec = load_spec(write_spec(tmp_path / "spec.json", steps), [f"storage={storage_url}"])

    failure = r"(?s)step b \(command\) failed: StepFailed: .* exited with code 3.*resume at step b"
    with pytest.raises(PipelineFailed, match=failure) as failed:
        run_pipeline(spec)
    first = failed.value.record
    assert [(s.name, s.status) for s in first.steps] == [("a", "ran"), ("b", "failed"), ("c", "pending")]
    assert "exited with code 3" in first.steps[1].error and ran(log) == ["a", "b"]

    flag.touch()
    second = run_pipeline(spec)
    assert [s.status for s in second.steps] == ["cached", "ran", "ran"]
    assert second.resumes == first.run_id and second.steps[0].cached_from == first.run_id
    assert second.steps[1].outputs == {"dir": second.steps[1].dir, "seen": "from a"}
    assert ran(log) == ["a", "b", "b", "c"]  # a did not run again

    third = run_pipeline(spec)
    assert [s.status for s in third.steps] == ["cached"] * 3 and not third.resumes
    assert ran(log) == ["a", "b", "b", "c"]

    forced = run_pipeline(spec, force=("c",))
    assert [s.status for s in forced.steps] == ["cached", "cached", "ran"]

    record = Store(storage_url).read_json("runs", f"{second.run_id}.json")
    assert record["status"] == "succeeded" and record["spec"]["name"] == "test"
    assert len(record["code"]["revision"]) == 40  # this checkout's git revision
    assert [s["name"] for s in record["steps"]] == ["a", "b", "c"]
    assert all(len(s["fingerprint"]) == 64 for s in record["steps"])
    assert all(s["seconds"] > 0 for s in record["steps"] if s["status"] == "ran")  # b and c ran in this run
    assert record["steps"][1]["config"]["argv"][0] == sys.executable


def test_changed_config_or_input_reruns_the_step_and_what_reads_it(tmp_path):
    log, data = tmp_path / "log.txt", tmp_path / "input.txt"
    data.write_text("v1")
    steps = {"a": counting_step(log, "a", extra={"inputs": [str(data)], "outputs": {"out": "${step.dir}"}}),
             "b": counting_step(log, "b", extra={"inputs": ["${steps.a.out}"]}),
             "c": counting_step(log, "c")}
    path = write_spec(tmp_path / "spec.json", steps, vars={"x": "1"})
    run_pipeline(load_spec(path))

    data.write_text("v2, longer")  # an input's content changed: a reruns; b reads a's (new) folder
    again = run_pipeline(load_spec(path))
    assert [s.status for s in again.steps] == ["ran", "ran", "cached"]

    steps["c"]["config"]["argv"] += ["--changed"]  # a config change reruns only that step
    changed = run_pipeline(load_spec(write_spec(tmp_path / "spec.json", steps, vars={"x": "1"})))
    assert [s.status for s in changed.steps] == ["cached", "cached", "ran"]
    assert ran(log) == ["a", "b", "c", "a", "b", "c"]


def test_spec_mistakes_are_reported_together_before_any_step_runs(tmp_path):
    steps = {"a": {"kind": "command", "config": {"argv": ["true"]}},
             "b": {"kind": "command", "config": {"argv": ["${steps.c.dir}", "${steps.a.nope}", "${vars.missing}"]}},
             "c": {"kind": "train", "config": {"data": {"url": "${steps.a.dir}"}, "stepz": 3}}}
    with pytest.raises(ConfigError) as err:
        load_spec(write_spec(tmp_path / "spec.json", steps, job={"env_vars": ["AWS_SECRET_ACCESS_KEY=abc"]}))
    text = str(err.value)
    assert "${steps.c.dir}: not an output of an earlier step" in text
    assert "step a has no output 'nope'" in text and "${vars.missing}: no such var" in text
    assert "job.env_vars holds names of environment variables, not values" in text
    assert "steps.c.config.stepz: unknown key; did you mean 'steps'" in text
    assert not (tmp_path / "runs").exists()


def test_cli_exit_codes_and_a_run_already_holding_the_storage(tmp_path, capsys):
    log = tmp_path / "log.txt"
    spec = write_spec(tmp_path / "spec.json", {"a": counting_step(log, "a", fail_unless=str(tmp_path / "flag"))})
    assert main(["pipeline", "run", spec]) == 1
    assert "rerun the same command to resume at step a" in capsys.readouterr().err
    (tmp_path / "flag").touch()
    with LeaseLock(str(tmp_path / "runs" / "lock"), ttl_s=30).acquire():
        assert main(["pipeline", "run", spec]) == 1
        assert "held by" in capsys.readouterr().err
    assert main(["pipeline", "run", spec, "--wait", "5"]) == 0
    assert ran(log) == ["a", "a"]


def test_packaged_specs_load_and_copy_no_secret_into_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-in-a-record-91x")
    emf = load_spec("emf", [f"storage={tmp_path}"])
    assert list(emf.steps) == ["encoders", "prep", "pretrain", "finetune", "distill", "benchmark"]
    assert emf.steps["finetune"].config["init_from"] == "${steps.pretrain.export}"
    assert emf.steps["distill"].config["init_from"] == "${steps.finetune.export}"
    assert emf.steps["distill"].config["distill"]["rounds"] == 2  # the rounds run in one worker group
    assert emf.steps["benchmark"].config["model"] == "${steps.distill.export}"
    assert list(load_spec("retrain").steps) == ["finetune", "distill", "benchmark", "benchmark_promoted"]
    spec = load_spec(write_spec(tmp_path / "spec.json", {"a": {"kind": "command", "config": {"argv": ["true"]}}}))
    record = run_pipeline(spec)
    text = json.dumps(Store(spec.storage).read_json("runs", f"{record.run_id}.json"))
    assert "AWS_SECRET_ACCESS_KEY" in text and "never-in-a-record-91x" not in text  # the name, never the value
    shutil.rmtree(spec.storage)
