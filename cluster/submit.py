"""`emf submit SPEC`: run a pipeline as one Ray job through the job submission API.

The spec is loaded and validated here first (a typo fails in a second, not after upload). The
job's runtime environment carries the working directory (``job.working_dir`` minus
``job.excludes``), extra pip requirements (``job.pip``), the submitter's git revision, and the
environment variables the spec names in ``job.env_vars``, sealed with the cluster token
(cluster/sealed_env.py): their values appear in no spec, entrypoint, record or Ray log.

The entrypoint is ``python -m cluster.sealed_env python -m emf_app.cli pipeline run SPEC
[overrides] storage=...``: the code comes from the uploaded working directory, and local
storage is passed as an absolute path (a relative one would land in the job's temporary copy).
Overrides travel in the entrypoint, which Ray shows in its job table: configs, never secrets.

Token authentication stays on: the client sends the token from the same places Ray reads it
(cluster/auth.py). With --follow the logs stream here and the exit code is the job's outcome.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from cluster import auth
from cluster.local import LocalClusterConfig, running_state
from cluster.sealed_env import SEALED_VAR, SETUP_HOOK, sealed_from_environment
from emf_dist import storage
from pipelines.spec import PipelineSpec, load_spec, spec_path

ADDRESS_VAR = "RAY_API_SERVER_ADDRESS"  # the variable `ray job submit` reads, too


@dataclass
class JobOutcome:
    job_id: str
    address: str
    status: str | None = None       # None without --follow; else SUCCEEDED, FAILED or STOPPED

    @property
    def exit_code(self) -> int:
        return 0 if self.status in (None, "SUCCEEDED") else 1


def submit(spec_arg: str, overrides: list[str], address: str | None = None, follow: bool = False,
           echo=print) -> JobOutcome:
    spec = load_spec(spec_arg, overrides)
    address = job_api_address(address)
    auth.enable_client_auth()
    token = auth.require_token(address)
    working_dir = Path(spec.job.working_dir).expanduser().resolve()
    if not storage.is_remote(spec.storage) and not _is_loopback(address):
        echo(f"warning: storage {spec.storage} is a local folder; on a remote cluster it is a folder on the head "
             "node. Use s3://... to keep the results")
    args = [_spec_argument(spec_arg, working_dir), *overrides, f"storage={spec.storage}"]
    entrypoint = shlex.join(["python", "-m", "cluster.sealed_env", "python", "-m", "emf_app.cli", "pipeline", "run",
                             *args])
    runtime_env, sealed_names = build_runtime_env(spec, working_dir, token)

    from ray.job_submission import JobSubmissionClient
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata={"pipeline": spec.name},
                               entrypoint_num_cpus=spec.job.entrypoint_num_cpus,
                               entrypoint_num_gpus=spec.job.entrypoint_num_gpus)
    echo(f"submitted job {job_id} to {address}: pipeline {spec.name}, storage {spec.storage}; environment passed "
         f"sealed: {', '.join(sealed_names) or 'none'}")
    if not follow:
        echo(f"follow it with: RAY_AUTH_MODE=token ray job logs --follow {job_id} --address {address}")
        return JobOutcome(job_id, address)
    status = follow_job(client, job_id, echo)
    echo(f"job {job_id}: {status}")
    return JobOutcome(job_id, address, status)


def build_runtime_env(spec: PipelineSpec, working_dir: Path, token: str) -> tuple[dict, list[str]]:
    from pipelines.run import code_revision
    env_vars = {"EMF_GIT_REVISION": json.dumps(code_revision())}
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": list(spec.job.excludes), "env_vars": env_vars}
    sealed, names = sealed_from_environment(spec.job.env_vars, token)
    if sealed is not None:
        env_vars[SEALED_VAR] = sealed
        runtime_env["worker_process_setup_hook"] = SETUP_HOOK
    if spec.job.pip:
        runtime_env["pip"] = list(spec.job.pip)
    return runtime_env, names


def follow_job(client, job_id: str, echo=print, poll_s: float = 1.0) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            echo(chunk.rstrip("\n"))

    asyncio.run(tail())
    while True:  # the log stream can close a moment before the status turns final
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return str(status)
        time.sleep(poll_s)


def job_api_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else the head `emf cluster up` recorded."""
    address = address or os.environ.get(ADDRESS_VAR)
    if not address:
        local = running_state(LocalClusterConfig())
        address = local["dashboard_url"] if local else None
    if not address:
        raise ValueError(f"no cluster to submit to: pass --address http://HEAD:8265, set {ADDRESS_VAR}, or start the "
                         "local cluster with `emf cluster up`")
    return address if "://" in address else f"http://{address}"


def _spec_argument(spec_arg: str, working_dir: Path) -> str:
    """How the job names the spec: a packaged name as is, a file by its path inside the working dir."""
    path = spec_path(spec_arg).resolve()
    if not Path(spec_arg).is_file():
        return spec_arg  # a packaged spec: the job resolves the name from its own copy of pipelines/specs
    try:
        return str(path.relative_to(working_dir))
    except ValueError:
        raise ValueError(f"{spec_arg} lies outside job.working_dir ({working_dir}), which is all the job gets: move it "
                         "there or set job.working_dir") from None


def _is_loopback(address: str) -> bool:
    return (urlparse(address).hostname or "") in ("127.0.0.1", "localhost", "::1")
