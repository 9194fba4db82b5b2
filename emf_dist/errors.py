"""Error classes that say *whose* problem a failure is, so the command line can answer each
with one line and an exit code by class (emf_app/errors.py) instead of a traceback.

- ``ConfigError`` (emf_dist/config.py) and other ValueErrors: the command or its config (exit 2);
- ``InputError``: the data or a file given as input is wrong or damaged (exit 3);
- ``StorageUnreachable``: an endpoint or URL did not answer in time (exit 4), like the other
  environment errors (PermissionError, connection errors) that Python and botocore raise.

Both are subclasses of the built-in classes older callers already catch.
"""
from __future__ import annotations


class InputError(ValueError):
    """An input (dataset, manifest, model export, image folder) is missing, damaged or inconsistent."""


class StorageUnreachable(TimeoutError):
    """A storage endpoint or URL did not answer within its timeout, after the bounded retries."""
