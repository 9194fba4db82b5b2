"""Secrets for a Ray job, passed by name and sealed with the cluster's auth token.

Ray writes a job's runtime environment, ``env_vars`` values included, in plain text into the
head's logs (runtime_env_agent.log: "Creating runtime env: {"env_vars": {...}}") and keeps it in
the job table. So `emf submit` never puts a secret there. It reads the variables a spec names
(``job.env_vars``) from the submitter's environment and passes one opaque variable,
``EMF_SEALED_ENV``: the values, encrypted and authenticated with AES-GCM under a key derived
from the cluster's Ray auth token. Whoever can read that blob and holds the token can already
run code on the cluster and read the environment there, so the secrets are exactly as safe as
the cluster is, and Ray's logs hold only ciphertext.

Opening it, on the cluster:
- the job's driver: the entrypoint is ``python -m cluster.sealed_env CMD...``, which unseals
  into ``os.environ`` and replaces itself with CMD (so steps' subprocesses inherit the values);
- every Ray worker of the job: Ray calls ``unseal_environ`` at worker start-up (the runtime
  env's ``worker_process_setup_hook``), so Ray Data / Ray Train tasks see the same variables.

The token is read where Ray reads it (cluster/auth.py): RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or
~/.ray/auth_token; KubeRay sets RAY_AUTH_TOKEN in every container of a cluster with authOptions.
"""
from __future__ import annotations

import base64
import json
import os
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cluster import auth

SEALED_VAR = "EMF_SEALED_ENV"
SETUP_HOOK = "cluster.sealed_env.unseal_environ"
_CONTEXT = b"emf-dist sealed env v1"


def _key(token: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_CONTEXT).derive(token.encode())


def seal(values: dict[str, str], token: str) -> str:
    nonce = os.urandom(12)
    sealed = AESGCM(_key(token)).encrypt(nonce, json.dumps(values).encode(), _CONTEXT)
    return base64.b64encode(nonce + sealed).decode()


def unseal(blob: str, token: str) -> dict[str, str]:
    raw = base64.b64decode(blob)
    return json.loads(AESGCM(_key(token)).decrypt(raw[:12], raw[12:], _CONTEXT))


def sealed_from_environment(names: list[str], token: str) -> tuple[str | None, list[str]]:
    """(the sealed values of the named variables that are set, the names that were set)."""
    values = {name: os.environ[name] for name in names if os.environ.get(name)}
    return (seal(values, token) if values else None), sorted(values)


def unseal_environ() -> None:
    """Move the sealed values into os.environ (the driver wrapper and Ray's worker setup hook)."""
    blob = os.environ.pop(SEALED_VAR, None)
    if blob:
        os.environ.update(unseal(blob, auth.require_token("opening the job's sealed environment")))


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m cluster.sealed_env COMMAND [ARGS...]")
    unseal_environ()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
