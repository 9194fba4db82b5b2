"""The embedded local cluster and `emf submit`, on a real Ray head with token authentication.

One head serves the module: started by `emf cluster up` on 127.0.0.1 with free ports, a private
Ray temp folder (so no other `ray.init()` on this shared machine can find it) and its own token
file (RAY_AUTH_TOKEN_PATH, so the user's ~/.ray/auth_token is left alone), and stopped by
`emf cluster down` at the end. Jobs are submitted by the real command line in a subprocess.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster import auth, local
from emf_app.cli import main
from emf_dist.config import parse_cli
from tests.helpers import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SECRET = "cluster-test-secret-P4v9"


@pytest.fixture(scope="module")
def head():
    root = Path(tempfile.mkdtemp(prefix="emfray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    saved = {k: os.environ.get(k) for k in (auth.TOKEN_PATH_VAR, auth.TOKEN_VAR)}
    os.environ[auth.TOKEN_PATH_VAR] = str(root / "auth_token")
    os.environ.pop(auth.TOKEN_VAR, None)
    overrides = [f"port={free_port()}", f"dashboard_port={free_port()}", f"client_server_port={free_port()}",
                 f"dashboard_agent_listen_port={free_port()}", "num_cpus=2", f"temp_dir={root / 'ray'}",
                 f"state_file={root / 'cluster.json'}"]
    assert main(["cluster", "up", *overrides]) == 0
    cfg = parse_cli(local.LocalClusterConfig, overrides)
    yield cfg, json.loads((root / "cluster.json").read_text()), root
    main(["cluster", "down", *overrides])  # a no-op when the last test already stopped it
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """What a user's checkout uploads: our packages (the job runs this copy of the code)."""
    folder = tmp_path_factory.mktemp("workdir")
    for package in ("emf_dist", "data_prep", "pipelines", "cluster"):
        shutil.copytree(REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def get(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def submit(workdir: Path, spec: dict, address: str, env: dict) -> subprocess.CompletedProcess:
    (workdir / "spec.json").write_text(json.dumps(spec))
    # -P: the submitter imports the checkout (a git tree), the job gets the uploaded copy.
    return subprocess.run([sys.executable, "-P", "-m", "emf_app.cli", "submit", "spec.json", "--address", address,
                           "--follow"], cwd=workdir, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)


def test_the_head_listens_on_loopback_and_requires_its_token(head):
    cfg, state, root = head
    token_file = root / "auth_token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    assert state["address"] == f"127.0.0.1:{cfg.port}" and state["dashboard_url"].startswith("http://127.0.0.1:")
    assert get(f"{cfg.dashboard_url}/api/version", None) == 401
    assert get(f"{cfg.dashboard_url}/api/version", "not-the-token") == 403
    assert get(f"{cfg.dashboard_url}/api/version", token) == 200
    raylets = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in local._all_pids()
               if local._pgid_of(pid) == state["pid"] and b"raylet" in Path(f"/proc/{pid}/comm").read_bytes()]
    assert len(raylets) == 1 and b"--node_ip_address=127.0.0.1" in raylets[0]  # not the machine's routable IP


def test_status_shows_the_resources_and_up_again_keeps_the_head(head, capsys):
    cfg, state, _ = head
    assert local.status(cfg)["pid"] == state["pid"]
    assert "0.0/2.0 CPU" in capsys.readouterr().out
    assert local.up(cfg)["pid"] == state["pid"]


def test_submit_follows_a_pipeline_job_to_success_with_secrets_sealed(head, workdir, tmp_path):
    cfg, _, root = head
    digest = hashlib.sha256(SECRET.encode()).hexdigest()[:16]
    check = ("import hashlib, os, ray; h = lambda v: hashlib.sha256((v or '').encode()).hexdigest()[:16]; "
             "print('driver', h(os.environ.get('EMF_TEST_SECRET'))); ray.init(); "
             "print('worker', ray.get(ray.remote(lambda: h(os.environ.get('EMF_TEST_SECRET'))).remote()))")
    storage_dir = tmp_path / "storage"
    spec = {"name": "job-ok", "storage": str(storage_dir),
            "steps": {"check": {"kind": "command", "config": {"argv": ["python", "-c", check]}}},
            "job": {"env_vars": ["EMF_TEST_SECRET"]}}
    done = submit(workdir, spec, cfg.dashboard_url, {"EMF_TEST_SECRET": SECRET})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "submitted job raysubmit_" in out and "sealed: EMF_TEST_SECRET" in out and "SUCCEEDED" in out
    assert f"driver {digest}" in out and f"worker {digest}" in out  # the driver and a Ray worker both got it
    latest = json.loads((storage_dir / "runs" / "latest.json").read_text())
    assert latest["status"] == "succeeded"
    record = json.loads((storage_dir / "runs" / f"{latest['run_id']}.json").read_text())
    assert record["code"]["source"] == "submitter" and len(record["code"]["revision"]) == 40
    for folder in (storage_dir, root / "ray", workdir):  # records, Ray's logs and job table dumps, the upload
        for path in folder.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path


def test_a_failing_job_gives_a_non_zero_exit(head, workdir, tmp_path):
    cfg, _, _ = head
    spec = {"name": "job-fails", "storage": str(tmp_path / "storage"),
            "steps": {"boom": {"kind": "command", "config": {"argv": ["python", "-c", "raise SystemExit(3)"]}}}}
    done = submit(workdir, spec, cfg.dashboard_url, {})
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "step boom (command) failed" in out and "FAILED" in out


def test_submit_without_a_token_is_refused_not_sent_unauthenticated(head, workdir, tmp_path):
    cfg, _, _ = head
    spec = {"name": "no-token", "steps": {"a": {"kind": "command", "config": {"argv": ["true"]}}}}
    done = submit(workdir, spec, cfg.dashboard_url, {auth.TOKEN_PATH_VAR: str(tmp_path / "missing"),
                                                     "HOME": str(tmp_path)})
    assert done.returncode == 1 and "no Ray auth token" in done.stderr


def test_down_stops_every_process_of_the_head(head):
    cfg, state, root = head
    assert (root / "ray" / "ray_current_cluster").read_text().strip() == state["address"]
    assert local.down(cfg)
    assert not local._group_alive(state["pid"])
    assert not (root / "cluster.json").exists()
    # A later plain `ray.init()` must not try to join the stopped head.
    assert not (root / "ray" / "ray_current_cluster").exists()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{cfg.dashboard_url}/api/version", timeout=5)
