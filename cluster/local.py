"""`emf cluster up|down|status`: the embedded local cluster, a Ray head on 127.0.0.1 with token auth.

`up` starts ``ray start --head --block`` as a child in its own process group, with
``RAY_AUTH_MODE=token`` and the token in the user's Ray folder (``~/.ray/auth_token``, created
owner-only if missing; cluster/auth.py), waits until the job API answers an authenticated
request, and records the process and addresses in a state file. `down` stops exactly that
process group: SIGTERM to the ``ray start`` process (it drains and stops its children), SIGKILL
for whatever of the group is left after ``stop_timeout_s``. It never runs ``ray stop``, which
would kill every Ray process of the user on the machine, other clusters included.

127.0.0.1: the node registers under the loopback address (``--node-ip-address`` plus
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, without which Ray 2.60 swaps a loopback address for the
machine's routable one), and the dashboard / job API binds to it. Ray's gRPC servers (GCS,
raylet) still listen on all interfaces (hard-coded in Ray); token authentication is what guards
them, which is why this head never runs without it.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cluster import auth

HOST = "127.0.0.1"
_LOOPBACK_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps loopback node and bootstrap addresses


@dataclass
class LocalClusterConfig:
    port: int = 6379                # GCS: drivers connect to 127.0.0.1:port
    dashboard_port: int = 8265      # dashboard and job submission API (`emf submit`)
    client_server_port: int = 10001  # Ray Client (ray://); keep it outside 10002-19999, Ray's worker ports
    dashboard_agent_listen_port: int = 52365
    num_cpus: int | None = None     # None: Ray detects
    num_gpus: int | None = None
    object_store_memory: int | None = None  # bytes; None: Ray's default (30% of memory)
    temp_dir: str | None = None     # Ray's session folders (None: /tmp/ray, where `ray.init()` finds this head)
    state_file: str = "~/.ray/emf-local-cluster.json"  # what `down` and `status` read
    start_timeout_s: float = 120.0
    stop_timeout_s: float = 60.0

    def validate(self) -> list[str]:
        ports = {"port": self.port, "dashboard_port": self.dashboard_port,
                 "client_server_port": self.client_server_port,
                 "dashboard_agent_listen_port": self.dashboard_agent_listen_port}
        problems = [f"{k} must lie in 1..65535, got {v}" for k, v in ports.items() if not 0 < v < 65536]
        if len(set(ports.values())) < len(ports):
            problems.append(f"the ports must differ: {ports}")
        if 10002 <= self.client_server_port <= 19999:
            problems.append("client_server_port lies in Ray's worker port range 10002-19999; pick another")
        return problems

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.dashboard_port}"


class ClusterError(RuntimeError):
    pass


def up(cfg: LocalClusterConfig, echo=print) -> dict:
    """Start the head (or report the one already running); returns its recorded state."""
    running = running_state(cfg)
    if running is not None:
        echo(f"already running: {running['address']} (job API {running['dashboard_url']}, pid {running['pid']})")
        return running
    token = auth.ensure_token()
    state_path = Path(cfg.state_file).expanduser()
    state_path.parent.mkdir(parents=True, exist_ok=True)
    log_path = state_path.with_suffix(".log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(_start_command(cfg), env=_head_env(), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    state = {"pid": process.pid, "address": cfg.address, "dashboard_url": cfg.dashboard_url, "port": cfg.port,
             "temp_dir": cfg.temp_dir, "log": str(log_path), "token_file": str(auth.token_path()),
             "started": time.time()}
    try:
        _wait_until_ready(process, cfg, token, log_path)
    except BaseException:
        _stop_group(process.pid, cfg.stop_timeout_s)
        process.wait()
        raise
    state_path.write_text(json.dumps(state, indent=1))
    echo(f"Ray head on {cfg.address} with token authentication (token: {state['token_file']})\n"
         f"  job API / dashboard: {cfg.dashboard_url}\n"
         f"  submit:  emf submit SPEC --address {cfg.dashboard_url} --follow\n"
         f"  drivers: export RAY_ADDRESS={cfg.address} RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0\n"
         f"  stop:    emf cluster down")
    return state


@contextlib.contextmanager
def driver(state: dict) -> Iterator[None]:
    """This process as a Ray driver of the recorded head for the block, sending the token; the
    steps it runs find the head through RAY_ADDRESS. Ray swaps a loopback bootstrap address for
    the machine's routable one (where this head does not listen) unless
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, a flag it reads once at import: set both. Everything
    is put back after, so a later `ray.init()` in the same process starts a plain local instance."""
    import ray
    from ray._private import ray_constants

    names = (_LOOPBACK_VAR, auth.MODE_VAR, "RAY_ADDRESS")
    saved_env, saved_flag = {name: os.environ.get(name) for name in names}, ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update({_LOOPBACK_VAR: "0", "RAY_ADDRESS": state["address"]})
    ray_constants.ENABLE_RAY_CLUSTER = False
    auth.enable_client_auth()
    try:
        ray.init(address=state["address"], log_to_driver=True)
        yield
    finally:
        ray.shutdown()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        auth.reload_ray_auth_config()


def down(cfg: LocalClusterConfig, echo=print) -> bool:
    """Stop the recorded head; False when there was none."""
    state_path = Path(cfg.state_file).expanduser()
    state = _read_state(state_path)
    if state is None:
        echo(f"no local cluster recorded in {state_path}")
        return False
    if _is_our_head(state):
        _stop_group(state["pid"], cfg.stop_timeout_s)
        echo(f"stopped the Ray head on {state['address']} (pid {state['pid']})")
    else:
        echo(f"the Ray head recorded in {state_path} (pid {state['pid']}) is not running any more")
    _forget_bootstrap_address(state)
    state_path.unlink(missing_ok=True)
    return True


def _forget_bootstrap_address(state: dict) -> None:
    """`ray start` records its address in <temp dir>/ray_current_cluster and a later plain
    `ray.init()` joins whatever that names; `ray stop` removes it, so must we (when it is ours)."""
    path = Path(state.get("temp_dir") or "/tmp/ray") / "ray_current_cluster"
    try:
        if path.read_text().strip() == state["address"]:
            path.unlink()
    except OSError:
        pass


def status(cfg: LocalClusterConfig, echo=print) -> dict | None:
    """The recorded head's nodes and resources (`ray status` through the authenticated job API)."""
    state = running_state(cfg)
    if state is None:
        echo(f"no local cluster running (state file {Path(cfg.state_file).expanduser()}); "
             "start one with `emf cluster up`")
        return None
    token = auth.require_token("the local cluster")
    text = _cluster_status_text(state["dashboard_url"], token)
    echo(f"Ray head {state['address']}, pid {state['pid']}, job API {state['dashboard_url']}, token auth on\n{text}")
    return {**state, "status": text}


# ---------------------------------------------------------------- internals


def _cluster_status_text(dashboard_url: str, token: str, wait_s: float = 20.0) -> str:
    """`ray status`'s text; a head that just started needs a few seconds before its monitor reports."""
    deadline = time.monotonic() + wait_s
    while True:
        report = _get_json(f"{dashboard_url}/api/cluster_status?format=1", token)
        text = (report.get("data") or {}).get("clusterStatus") or ""
        if "Resources" in text or time.monotonic() > deadline:
            return text or "(no status reported yet)"
        time.sleep(1.0)


def _start_command(cfg: LocalClusterConfig) -> list[str]:
    ray = Path(sys.executable).with_name("ray")  # the ray of this environment, not whichever is on PATH
    cmd = [str(ray) if ray.exists() else "ray", "start", "--head", "--block", "--disable-usage-stats",
           f"--node-ip-address={HOST}", f"--port={cfg.port}", f"--dashboard-host={HOST}",
           f"--dashboard-port={cfg.dashboard_port}", f"--ray-client-server-port={cfg.client_server_port}",
           f"--dashboard-agent-listen-port={cfg.dashboard_agent_listen_port}"]
    for flag, value in (("num-cpus", cfg.num_cpus), ("num-gpus", cfg.num_gpus),
                        ("object-store-memory", cfg.object_store_memory), ("temp-dir", cfg.temp_dir)):
        if value is not None:
            cmd.append(f"--{flag}={value}")
    return cmd


def _head_env() -> dict[str, str]:
    env = dict(os.environ)
    env[auth.MODE_VAR] = "token"
    env[_LOOPBACK_VAR] = "0"  # keep 127.0.0.1 as the node address (see module doc)
    # Jobs run `python` / `emf` from PATH: make that this environment's, as on a cluster image.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _wait_until_ready(process: subprocess.Popen, cfg: LocalClusterConfig, token: str, log_path: Path) -> None:
    deadline = time.monotonic() + cfg.start_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ClusterError(f"`ray start` exited with code {process.returncode}:\n{_tail(log_path)}")
        try:
            _get_json(f"{cfg.dashboard_url}/api/version", token)
            # `ray start` brings up the dashboard before the node's raylet: a head is ready for
            # work only once both run (a busy machine showed the gap in a test).
            if _raylet_running(process.pid):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise ClusterError(f"the Ray head (job API on {cfg.dashboard_url}, raylet) was not up within "
                       f"{cfg.start_timeout_s:.0f} s:\n"
                       f"{_tail(log_path)}")


def _get_json(url: str, token: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise ClusterError(f"{url} refused the token from {auth.token_path()} (HTTP {err.code}): the head was "
                               "started with another token") from None
        raise


def _stop_group(pid: int, timeout_s: float) -> None:
    """SIGTERM the `ray start --block` process, then SIGKILL what is left of its process group."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _group_alive(pid):
        time.sleep(0.5)
    if _group_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)  # the group id is the leader's pid (start_new_session)
        except ProcessLookupError:
            pass


def _group_alive(pgid: int) -> bool:
    # Zombies (exited, not yet reaped by their parent) still belong to the group but hold nothing.
    return any(_pgid_of(pid) == pgid and _state_of(pid) != "Z" for pid in _all_pids())


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _raylet_running(pgid: int) -> bool:
    return any(_pgid_of(pid) == pgid and _comm_of(pid) == "raylet" for pid in _all_pids())


def _comm_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _state_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def running_state(cfg: LocalClusterConfig) -> dict | None:
    """The recorded head's state while it runs, else None."""
    state = _read_state(Path(cfg.state_file).expanduser())
    return state if state is not None and _is_our_head(state) else None


def _is_our_head(state: dict) -> bool:
    """The recorded pid is still our `ray start --head` (not a reused pid) and leads its group."""
    try:
        cmdline = Path(f"/proc/{state['pid']}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    ours = b"--head" in cmdline and f"--port={state['port']}".encode() in cmdline
    return ours and _pgid_of(state["pid"]) == state["pid"]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return "(no log)"
