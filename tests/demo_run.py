"""The tiny `emf demo` both demo test modules read, and a way to run a spec as the demo does.

Each run is a process of its own, as `emf demo` is (Ray's drivers keep logging handlers and
settings), on its own token-auth head with free ports; the head it starts is stopped after.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from cluster import auth, local
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[1]
EMF_SPEC = yaml.safe_load((REPO / "pipelines/specs/emf.yaml").read_text())
TRAIN_STEPS = [name for name, step in EMF_SPEC["steps"].items() if step["kind"] == "train"]

TINY = ["steps.encoders.config.require_selection=false",
        "steps.encoders.config.eval.discriminability.scenes=20", "steps.encoders.config.eval.disentanglement.prompts=8",
        "steps.prep.config.source.count=64", "steps.prep.config.samples_per_shard=32",
        "steps.benchmark.config.eval.benchmark.prompts_per_task=1",
        "steps.benchmark.config.eval.benchmark.images_per_prompt=2",
        "steps.benchmark.config.eval.benchmark.calibration_scenes=12"]


def tiny_steps(step: dict) -> int:
    """Two steps per distillation round (a round's steps must divide evenly), four otherwise."""
    rounds = step["config"].get("distill", {}).get("rounds", 1)
    return 4 if rounds == 1 else 2 * rounds


for _step in TRAIN_STEPS:
    TINY += [f"steps.{_step}.config.steps={tiny_steps(EMF_SPEC['steps'][_step])}",
             f"steps.{_step}.config.micro_batch=4",
             f"steps.{_step}.config.checkpoint_every=2", f"steps.{_step}.config.logging.sample_every=2",
             f"steps.{_step}.config.logging.every=2",
             f"steps.{_step}.config.logging.wandb={'offline' if _step == 'pretrain' else 'disabled'}"]
    if _step != "pretrain":  # two DeepSpeed workers in the first training step; one (a process less) after
        TINY.append(f"steps.{_step}.config.scaling.num_workers=1")
TINY += ["steps.pretrain.config.model.width=32", "steps.pretrain.config.model.heads=2",
         "steps.pretrain.config.model.depth=1"]

DEMO_SCRIPT = ("import json, sys; from cluster.local import LocalClusterConfig; from emf_app.demo import run_demo; "
               "run_demo(sys.argv[1], json.loads(sys.argv[2]), LocalClusterConfig(**json.loads(sys.argv[3])))")

SPEC_SCRIPT = """
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


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    resource_request_timeouts: int  # Ray Train's requests to Ray Data's autoscaling coordinator that timed out

    @property
    def terminal(self) -> str:
        return self.stdout + self.stderr


def on_own_head(script: str, *args: str) -> Finished:
    """``python -c script *args <cluster json>`` with a fresh head's settings as its last argument."""
    root = Path(tempfile.mkdtemp(prefix="emfdemo-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    cluster = dict(port=free_port(), dashboard_port=free_port(), client_server_port=free_port(),
                   dashboard_agent_listen_port=free_port(), num_cpus=2, temp_dir=str(root / "ray"),
                   state_file=str(root / "cluster.json"))
    env = {**os.environ, auth.TOKEN_PATH_VAR: str(root / "auth_token")}
    done = subprocess.run([sys.executable, "-c", script, *args, json.dumps(cluster)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert local.running_state(local.LocalClusterConfig(**cluster)) is None  # the head it started is stopped
    timeouts = resource_request_timeouts(root / "ray")
    shutil.rmtree(root, ignore_errors=True)
    return Finished(done.returncode, done.stdout, done.stderr, timeouts)


def resource_request_timeouts(ray_temp: Path) -> int:
    """The warnings Ray Train's controllers logged, in the head's session logs, for resource requests
    the autoscaling coordinator did not answer in time (one per request: each cost the fit 5 s)."""
    logs = ray_temp.glob("session_*/logs/train/ray-train-sys-controller-*.log")
    return sum(path.read_text(errors="replace").count("Failed to send resource request") for path in logs)


def run_tiny_demo(out: Path) -> dict:
    """`emf demo` at a tiny budget; returns the paths it printed ({"report": ..., "shards": ...}),
    its output folder, what it printed, and its fits' timed-out resource requests."""
    done = on_own_head(DEMO_SCRIPT, str(out), json.dumps(TINY))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "pipeline emf: succeeded" in done.stdout
    return {**dict(re.findall(r"^  (\w+): +(\S+)", done.stdout, re.MULTILINE)), "out": str(out),
            "stdout": done.stdout, "log": done.terminal, "resource_request_timeouts": done.resource_request_timeouts}
