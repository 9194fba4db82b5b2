"""`emf demo`'s terminal shows the project's lines; Ray's, Ray Data's, Ray Train's and the workers'
output (wandb's banner included) goes to <out>/logs/demo.log, and errors still reach the terminal.

A small pipeline from the demo's own recipe (prep -> flow-matching pretraining -> MeanFlow
fine-tune -> a training step whose worker fails) runs through the demo's path
(emf_app.demo.run_on_local_head) on its own token-auth head, in a process of its own as `emf demo`
runs. The fine-tune's run record, checkpoint and export also show the architecture it inherited."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from cluster import auth, local
from tests.helpers import free_port, ray_chatter

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
from cluster.local import LocalClusterConfig
from emf_app.demo import run_on_local_head
from pipelines.run import PipelineFailed
from pipelines.spec import load_spec
try:
    run_on_local_head(load_spec(sys.argv[1]), LocalClusterConfig(**json.loads(sys.argv[2])))
except PipelineFailed as err:  # as `emf demo` reports it, once the block has given stderr back
    print(f"emf demo: {err}", file=sys.stderr)
    sys.exit(1)
"""


def small_spec(storage: Path) -> dict:
    """The emf spec's prep, pretrain and finetune at a tiny size, wandb offline, then a step that fails."""
    steps = yaml.safe_load((REPO / "pipelines/specs/emf.yaml").read_text())["steps"]
    steps = {name: steps[name] for name in ("prep", "pretrain", "finetune")}
    steps["prep"]["config"].update(samples_per_shard=32, source={**steps["prep"]["config"]["source"], "count": 32})
    for name in ("pretrain", "finetune"):
        steps[name]["config"].update(steps=4, micro_batch=4, checkpoint_every=2,
                                     logging={"every": 2, "sample_every": 0, "wandb": "offline"})
    steps["pretrain"]["config"]["model"].update(width=32, heads=2, depth=1)
    broken = json.loads(json.dumps(steps["pretrain"]))  # its first loss is NaN, and one is too many
    broken["config"].update(scaling={"num_workers": 1}, logging={"wandb": "disabled"},
                            faults={"nan_at_micro_batches": [0], "max_bad_steps_in_a_row": 1})
    return {"name": "small", "storage": str(storage), "steps": {**steps, "broken": broken}}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("demo-output") / "out"
    spec = out.parent / "spec.yaml"
    spec.write_text(yaml.safe_dump(small_spec(out), sort_keys=False))
    root = Path(tempfile.mkdtemp(prefix="emfout-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    cluster = dict(port=free_port(), dashboard_port=free_port(), client_server_port=free_port(),
                   dashboard_agent_listen_port=free_port(), num_cpus=2, temp_dir=str(root / "ray"),
                   state_file=str(root / "cluster.json"))
    env = {**os.environ, auth.TOKEN_PATH_VAR: str(root / "auth_token")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(spec), json.dumps(cluster)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert local.running_state(local.LocalClusterConfig(**cluster)) is None  # the head it started is stopped
    shutil.rmtree(root, ignore_errors=True)
    (out.parent / "terminal.txt").write_text(done.stdout + done.stderr)  # to read when a test fails
    return {"out": out, "returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr,
            "terminal": done.stdout + done.stderr}


@pytest.mark.slow
def test_the_terminal_shows_the_projects_lines_and_none_of_rays(run):
    terminal, log = run["terminal"], Path(run["out"], "logs", "demo.log")
    assert run["returncode"] == 1, terminal[-3000:]
    assert f"goes to {log}" in run["stdout"].splitlines()[0]
    for line in ("[1/4] prep (prep)", "prep: 32 samples in 1 new shards", "[2/4] pretrain (train)",
                 "[3/4] finetune (train)", "[4/4] broken (train)"):
        assert line in run["stdout"], terminal[-3000:]
    progress = re.findall(r"^step \d/4  loss", run["stdout"], re.MULTILINE)  # rank 0's, without Ray's prefix
    assert len(progress) == 4, terminal[-3000:]
    assert ray_chatter(terminal) == [], "\n".join(ray_chatter(terminal))


@pytest.mark.slow
def test_a_step_failing_in_its_worker_says_so_on_the_terminal(run):
    assert "non-finite losses in a row" in run["stdout"]  # the pipeline's traceback of the step
    assert re.search(r"(?s)emf demo: step broken \(train\) failed: .*non-finite losses", run["stderr"])
    assert f"tracebacks included, is in {Path(run['out'], 'logs', 'demo.log')}" in run["stdout"]


@pytest.mark.slow
def test_the_log_file_holds_rays_and_the_workers_output(run):
    log = Path(run["out"], "logs", "demo.log").read_text()
    assert "[2/4] pretrain (train)" in log  # the project's lines too, for context
    assert "wandb: " in log and "(RayTrainWorker pid=" in log
    assert "TooManyBadSteps" in log  # the failing worker's own traceback


@pytest.mark.slow
def test_the_fine_tunes_record_checkpoint_and_export_show_the_architecture_it_inherited(run):
    record = json.loads(next(Path(run["out"], "runs").glob("2*.json")).read_text())
    steps = {step["name"]: step for step in record["steps"]}
    parent = steps["pretrain"]["config"]["model"]
    assert (parent["input_size"], parent["prediction"]) == (16, "data")
    inherited = {**parent, "time_embedding": "dual"}
    assert steps["finetune"]["config"]["model"] == inherited
    run_dir = Path(steps["finetune"]["outputs"]["run"])
    saved = [json.loads(p.read_text())["model"] for p in run_dir.glob("step_*/train_config.json")]
    assert saved and all(model == inherited for model in saved)
    assert json.loads(Path(steps["finetune"]["outputs"]["export"], "emf_model.json").read_text())["model"] == inherited
