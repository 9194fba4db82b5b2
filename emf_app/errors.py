"""The one error boundary of the `emf` command line: every expected failure ends in one line that
names the thing and the fix, with an exit code by class; anything else is a bug and keeps its
traceback. ``--debug`` (or EMF_DEBUG=1) prints the traceback of expected failures too.

    2  usage or config: a bad option or value, an output path of the wrong kind
    3  input or data: a missing, damaged or inconsistent dataset, manifest, export or folder
    4  environment: storage unreachable or timing out, permission denied, a lock held elsewhere
    130 interrupted (Ctrl-C): finished work is kept, the same command resumes
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

EXIT_USAGE, EXIT_INPUT, EXIT_ENVIRONMENT, EXIT_INTERRUPTED = 2, 3, 4, 130
DEBUG_ENV = "EMF_DEBUG"


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(debug?, argv without ``--debug``): accepted anywhere on the line, so that it works the
    same after every subcommand (their parsers are defined in several packages)."""
    rest = [a for a in argv if a != "--debug"]
    return len(rest) != len(argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0"), rest


def run_guarded(command: str, run: Callable[[], int], debug: bool) -> int:
    try:
        return run()
    except KeyboardInterrupt:
        _trace(debug)
        print(f"\nemf {command}: interrupted. Finished work is kept: rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - sorted below; unknown errors are re-raised
        found = classify(err)
        if found is None:
            raise
        code, message = found
        _trace(debug)
        hint = "" if debug else f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
        print(f"emf {command}: error: {message}{hint if code != EXIT_USAGE else ''}", file=sys.stderr)
        return code


def _trace(debug: bool) -> None:
    if debug:
        traceback.print_exc()


def classify(err: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for an expected failure, None for a bug."""
    for check in (_ours, _storage, _os_error, _value):
        found = check(err)
        if found is not None:
            return found
    return None


def _ours(err: BaseException) -> tuple[int, str] | None:
    from data_prep.items import PrepError
    from emf_dist.errors import InputError, StorageUnreachable
    from emf_dist.lease import LockHeld, LockLost

    if isinstance(err, (LockHeld, LockLost)):
        return EXIT_ENVIRONMENT, str(err)
    if isinstance(err, StorageUnreachable):
        return EXIT_ENVIRONMENT, str(err)
    if isinstance(err, (InputError, PrepError)):
        return EXIT_INPUT, str(err)
    if type(err).__name__ == "SafetensorError":  # safetensors' Rust error: the class is not importable by name
        return EXIT_INPUT, (f"a weights file is damaged or not a safetensors file ({err}): re-export the model "
                            "or copy the export folder again")
    return None


def _storage(err: BaseException) -> tuple[int, str] | None:
    """botocore's network errors (s3fs raises them as they are, or wraps them in OSError)."""
    try:
        from botocore import exceptions as boto
    except ImportError:
        return None
    cause = err if isinstance(err, boto.BotoCoreError) else err.__cause__ or err.__context__
    if isinstance(cause, (boto.EndpointConnectionError, boto.ConnectTimeoutError, boto.ReadTimeoutError,
                          boto.ConnectionClosedError)):
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
        return EXIT_ENVIRONMENT, (f"cannot reach the object store ({cause}); check AWS_ENDPOINT_URL ({endpoint}) "
                                  "and the network, then rerun")
    if isinstance(cause, boto.NoCredentialsError):
        return EXIT_ENVIRONMENT, "no object-store credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    return None


def _os_error(err: BaseException) -> tuple[int, str] | None:
    if not isinstance(err, OSError):
        return None
    name = err.filename or ""
    if isinstance(err, IsADirectoryError):
        return EXIT_USAGE, f"{name} is a folder, but a file is expected here: give a file path"
    if isinstance(err, (NotADirectoryError, FileExistsError)):  # makedirs meets a file: FileExistsError
        return EXIT_USAGE, (f"{name} (or a folder above it) is a file, but a folder is expected here: "
                            "choose another path")
    if isinstance(err, PermissionError):
        return EXIT_ENVIRONMENT, f"permission denied: {name}: choose a location you can write to, or fix its permissions"
    if isinstance(err, FileNotFoundError):
        return EXIT_INPUT, f"{name} does not exist" if name and err.strerror else str(err)
    if isinstance(err, (TimeoutError, ConnectionError)):
        return EXIT_ENVIRONMENT, f"{err or type(err).__name__}: check the network and the storage endpoint, then rerun"
    if err.strerror:  # disk full, read-only filesystem, ...
        return EXIT_ENVIRONMENT, f"{err.strerror}: {name}" if name else err.strerror
    return EXIT_ENVIRONMENT, str(err)


def _value(err: BaseException) -> tuple[int, str] | None:
    return (EXIT_USAGE, str(err)) if isinstance(err, ValueError) else None
