"""Ray token authentication, as Ray 2.60 implements it (docs/findings.md §6).

Read from ray/_private/authentication/ in the installed Ray:

- The mode comes only from the environment: ``RAY_AUTH_MODE=token`` (never from a config).
  `ray start --head` with token mode but no token refuses to start; `ray.init()` of a new
  local instance makes one. A client (job submission, `ray.init(address=...)` with an explicit
  address) sends the token only when its own process has ``RAY_AUTH_MODE=token``.
- The token is looked up in this order: ``RAY_AUTH_TOKEN`` (the value), ``RAY_AUTH_TOKEN_PATH``
  (a file), then ``~/.ray/auth_token``. Ray's generator is ``secrets.token_hex(32)``.

We never turn authentication off and never tell anyone to; every command here turns it on.
"""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

MODE_VAR = "RAY_AUTH_MODE"
TOKEN_VAR = "RAY_AUTH_TOKEN"
TOKEN_PATH_VAR = "RAY_AUTH_TOKEN_PATH"


class NoToken(RuntimeError):
    pass


def token_path() -> Path:
    """Where this process's token file is (whether or not it exists yet)."""
    explicit = os.environ.get(TOKEN_PATH_VAR)
    return Path(explicit).expanduser() if explicit else Path.home() / ".ray" / "auth_token"


def read_token() -> str | None:
    """The token Ray would use in this process, or None."""
    value = os.environ.get(TOKEN_VAR, "").strip()
    if value:
        return value
    path = token_path()
    if path.is_file():
        return path.read_text().strip() or None
    return None


def ensure_token() -> str:
    """The token, created in the token file (owner-only) when there is none, as `ray get-auth-token
    --generate` would; a head started with token mode needs it to exist beforehand."""
    existing = read_token()
    if existing:
        return existing
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


def require_token(where: str) -> str:
    token = read_token()
    if token is None:
        raise NoToken(f"no Ray auth token for {where}: `emf cluster up` creates one for the local head; for another "
                      f"cluster put its token in {token_path()} (or point {TOKEN_PATH_VAR} at a file holding it)")
    return token


def enable_client_auth() -> None:
    """Make this process send its token: set RAY_AUTH_MODE=token unless the user chose a mode, and
    refresh Ray's cached config if Ray was already imported (it reads the mode once)."""
    if os.environ.get(MODE_VAR):
        return
    os.environ[MODE_VAR] = "token"
    reload_ray_auth_config()


def reload_ray_auth_config() -> None:
    """Make an already imported Ray read the auth mode and token from the environment again."""
    if "ray._raylet" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
