"""The CLI's one error boundary (emf_app/errors.py): one line, exit code by class, no traceback."""
import errno

import pytest

from emf_app.errors import classify, debug_requested, run_guarded


def boto_endpoint_error():
    from botocore.exceptions import EndpointConnectionError
    return EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bucket")


class SafetensorError(Exception):  # the Rust extension's class is matched by name
    pass


@pytest.mark.parametrize("make, code, words", [
    (lambda: ValueError("optim.lr must be > 0"), 2, "optim.lr"),
    (lambda: IsADirectoryError(errno.EISDIR, "Is a directory", "out"), 2, "out is a folder"),
    (lambda: NotADirectoryError(errno.ENOTDIR, "Not a directory", "f"), 2, "is a file"),
    (lambda: FileNotFoundError(errno.ENOENT, "No such file", "data/x"), 3, "data/x does not exist"),
    (lambda: SafetensorError("incomplete metadata"), 3, "damaged or not a safetensors file"),
    (lambda: PermissionError(errno.EACCES, "Permission denied", "/root/out"), 4, "permission denied: /root/out"),
    (boto_endpoint_error, 4, "cannot reach the object store"),
    (lambda: _wrapped(boto_endpoint_error()), 4, "AWS_ENDPOINT_URL"),
    (lambda: TimeoutError("read timed out"), 4, "check the network"),
])
def test_expected_failures_get_one_line_and_a_class(make, code, words):
    found = classify(make())
    assert found is not None and found[0] == code and words in found[1]


def _wrapped(cause):
    try:
        raise OSError("s3fs gave up") from cause
    except OSError as err:
        return err


def test_our_own_classes():
    from data_prep.items import PrepError
    from emf_dist.errors import InputError, StorageUnreachable
    from emf_dist.lease import LockHeld

    assert classify(InputError("bad manifest"))[0] == 3
    assert classify(PrepError("bad tar"))[0] == 3
    assert classify(StorageUnreachable("no answer"))[0] == 4
    assert classify(LockHeld("s3://b/d/_prep/lock", {"holder": "h:1"}, 0.0))[0] == 4


def test_a_bug_keeps_its_traceback():
    with pytest.raises(KeyError):
        run_guarded("x", lambda: {}["missing"], debug=False)


def test_ctrl_c_ends_cleanly_and_says_how_to_resume(capsys):
    def interrupted():
        raise KeyboardInterrupt

    assert run_guarded("prep", interrupted, debug=False) == 130
    err = capsys.readouterr().err
    assert "rerun the same command to resume" in err and "Traceback" not in err


def test_debug_flag_anywhere_or_env(monkeypatch):
    monkeypatch.delenv("EMF_DEBUG", raising=False)
    assert debug_requested(["prep", "out=x", "--debug"]) == (True, ["prep", "out=x"])
    assert debug_requested(["prep"]) == (False, ["prep"])
    monkeypatch.setenv("EMF_DEBUG", "1")
    assert debug_requested(["prep"])[0]
