"""Secrets passed by name to a Ray job: sealed with the cluster token, opened only with it,
never present in clear in what `emf submit` hands to Ray (which logs the runtime env)."""
from __future__ import annotations

import json
import os

import pytest
from cryptography.exceptions import InvalidTag

from cluster import auth
from cluster.sealed_env import SEALED_VAR, SETUP_HOOK, seal, unseal, unseal_environ
from cluster.submit import _spec_argument, build_runtime_env
from emf_dist.config import from_dict
from pipelines.spec import PipelineSpec

SECRET = "s3cr3t-value-Jw8-never-logged"


def test_only_the_cluster_token_opens_the_sealed_values():
    blob = seal({"AWS_SECRET_ACCESS_KEY": SECRET}, "token-a")
    assert SECRET not in blob
    assert unseal(blob, "token-a") == {"AWS_SECRET_ACCESS_KEY": SECRET}
    with pytest.raises(InvalidTag):
        unseal(blob, "token-b")
    assert seal({"K": "v"}, "token-a") != seal({"K": "v"}, "token-a")  # fresh nonce every time


def test_runtime_env_names_the_variables_and_carries_only_ciphertext(tmp_path, monkeypatch):
    monkeypatch.setenv("EMF_TEST_KEY", SECRET)
    monkeypatch.delenv("EMF_TEST_UNSET", raising=False)
    spec = from_dict(PipelineSpec, {"job": {"env_vars": ["EMF_TEST_KEY", "EMF_TEST_UNSET"], "pip": ["tqdm"]}})
    runtime_env, names = build_runtime_env(spec, tmp_path, "cluster-token")
    assert names == ["EMF_TEST_KEY"]  # unset variables are skipped, not sent empty
    assert SECRET not in json.dumps(runtime_env)
    assert runtime_env["worker_process_setup_hook"] == SETUP_HOOK and runtime_env["pip"] == ["tqdm"]
    assert unseal(runtime_env["env_vars"][SEALED_VAR], "cluster-token") == {"EMF_TEST_KEY": SECRET}
    assert json.loads(runtime_env["env_vars"]["EMF_GIT_REVISION"])["revision"]


def test_unseal_environ_reads_the_token_where_ray_does(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    monkeypatch.delenv(auth.TOKEN_VAR, raising=False)
    monkeypatch.setenv(auth.TOKEN_PATH_VAR, str(token_file))
    monkeypatch.setenv(SEALED_VAR, seal({"EMF_TEST_OPENED": SECRET}, "file-token"))
    monkeypatch.delenv("EMF_TEST_OPENED", raising=False)
    unseal_environ()
    assert os.environ["EMF_TEST_OPENED"] == SECRET and SEALED_VAR not in os.environ
    monkeypatch.setenv(auth.TOKEN_VAR, "env-token")  # RAY_AUTH_TOKEN wins over the file, as in Ray
    assert auth.read_token() == "env-token"


def test_a_new_token_is_owner_only(tmp_path, monkeypatch):
    monkeypatch.delenv(auth.TOKEN_VAR, raising=False)
    monkeypatch.setenv(auth.TOKEN_PATH_VAR, str(tmp_path / "ray" / "auth_token"))
    token = auth.ensure_token()
    assert len(token) == 64 and auth.ensure_token() == token  # made once, then reused
    assert (tmp_path / "ray" / "auth_token").stat().st_mode & 0o777 == 0o600


def test_a_spec_file_outside_the_uploaded_folder_is_refused(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("steps: {}\n")
    assert _spec_argument(str(spec), tmp_path) == "spec.yaml"
    assert _spec_argument("emf", tmp_path) == "emf"  # a packaged spec travels by name
    with pytest.raises(ValueError, match="outside job.working_dir"):
        _spec_argument(str(spec), tmp_path / "elsewhere")
