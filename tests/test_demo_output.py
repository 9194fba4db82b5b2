"""A step that fails inside its worker, run as `emf demo` runs a pipeline: the terminal says which
step failed and why, and where the workers' own output is; their tracebacks go to <out>/logs/demo.log.

The pipeline is one training step of the demo's recipe on the tiny demo's shards whose first loss
is NaN, with one allowed (emf_app.demo.run_on_local_head, on its own token-auth head, in a process of
its own as `emf demo` runs). What a successful demo shows is in tests/test_demo.py.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.demo_run import EMF_SPEC, SPEC_SCRIPT, on_own_head
from tests.helpers import ray_chatter

pytestmark = pytest.mark.slow


def broken_spec(storage: Path, shards: str) -> dict:
    step = json.loads(json.dumps(EMF_SPEC["steps"]["pretrain"]))
    step["config"].update(data={**step["config"]["data"], "url": shards}, steps=4, micro_batch=4,
                          scaling={"num_workers": 1}, logging={"wandb": "disabled"},
                          faults={"nan_at_micro_batches": [0], "max_bad_steps_in_a_row": 1})
    step["config"]["model"].update(width=32, heads=2, depth=1)
    return {"name": "broken", "storage": str(storage), "steps": {"broken": step}}


@pytest.fixture(scope="module")
def run(tiny_demo, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("demo-output") / "out"
    spec = out.parent / "spec.yaml"
    spec.write_text(yaml.safe_dump(broken_spec(out, tiny_demo["shards"]), sort_keys=False))
    done = on_own_head(SPEC_SCRIPT, str(spec))
    (out.parent / "terminal.txt").write_text(done.terminal)  # to read when a test fails
    return {"out": out, "done": done}


def test_a_step_failing_in_its_worker_says_so_on_the_terminal(run):
    done, log = run["done"], Path(run["out"], "logs", "demo.log")
    assert done.returncode == 1, done.terminal[-3000:]
    assert f"goes to {log}" in done.stdout.splitlines()[0]
    assert "[1/1] broken (train)" in done.stdout
    assert "non-finite losses in a row" in done.stdout  # the pipeline's traceback of the step
    assert re.search(r"(?s)emf demo: step broken \(train\) failed: .*non-finite losses", done.stderr)
    assert f"tracebacks included, is in {log}" in done.stdout
    assert ray_chatter(done.terminal) == [], "\n".join(ray_chatter(done.terminal))


def test_the_log_file_holds_the_failing_workers_traceback(run):
    log = Path(run["out"], "logs", "demo.log").read_text()
    assert "[1/1] broken (train)" in log and "(RayTrainWorker pid=" in log
    assert "TooManyBadSteps" in log
