"""Two preps into one dataset exclude each other (local and S3); readers refuse a manifest that
lists a shard twice, whose totals disagree with its shards, or whose shard files do not match it.
No Ray: the lock is taken before anything starts, and a no-op prep never starts Ray."""
import json
import threading
import time

import pytest

from data_prep.config import PrepConfig
from data_prep.dataset_lock import prep_lock
from data_prep.job import run_prep
from emf_app.cli import main
from emf_dist.config import load_config
from emf_dist.errors import InputError
from emf_dist.lease import LockHeld
from emf_dist.manifest import ImageSpec, Manifest, ShardEntry, check_shard_files, read_manifest
from tests.s3_server import s3_server


def config(out, *overrides):
    return load_config(PrepConfig, None, [f"out={out}", "progress=false", "source.count=0", *overrides])


@pytest.fixture(scope="module")
def s3():
    with s3_server("lock-bucket", "s3cr3t"):
        yield "s3://lock-bucket"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_prep_refuses_while_the_first_holds_the_dataset(tmp_path, request, where):
    out = str(tmp_path / "data") if where == "local" else f"{request.getfixturevalue('s3')}/data"
    with prep_lock(out, ttl_s=30).acquire():
        with pytest.raises(LockHeld, match="Another `emf prep` is writing this dataset"):
            run_prep(config(out), echo=lambda _: None)
    run_prep(config(out), echo=lambda _: None)  # released: the next prep runs


def test_the_cli_says_who_holds_it_and_exits_4(tmp_path, capsys):
    out = str(tmp_path / "data")
    with prep_lock(out, ttl_s=30).acquire():
        assert main(["prep", f"out={out}", "source.count=0", "progress=false"]) == 4
    err = capsys.readouterr().err
    assert "emf prep into" in err and "lock_wait_s" in err and "Traceback" not in err


def test_a_second_prep_can_wait_for_the_first(tmp_path):
    out = str(tmp_path / "data")
    lease = prep_lock(out, ttl_s=30).acquire()
    threading.Timer(0.5, lease.release).start()
    started = time.monotonic()
    run_prep(config(out, "lock_wait_s=20"), echo=lambda _: None)
    assert 0.4 < time.monotonic() - started < 20


def manifest(shards, **totals) -> str:
    doc = json.loads(Manifest(1, shards, {}, ImageSpec(shape=[3, 8, 8]), {}, {}).to_json())
    doc.update(totals)
    return json.dumps(doc)


def test_a_manifest_listing_a_shard_twice_is_refused(tmp_path):
    twice = [ShardEntry("000000.tar", 50, 100, "x"), ShardEntry("000000.tar", 50, 100, "x")]
    (tmp_path / "manifest.json").write_text(manifest(twice))
    with pytest.raises(InputError, match="listed more than once"):
        read_manifest(str(tmp_path))
    with pytest.raises(InputError, match="total_samples is 800 but its shards hold 50"):
        Manifest.from_json(manifest(twice[:1], total_samples=800))


def test_shard_files_must_match_the_manifest(tmp_path):
    (tmp_path / "000000.tar").write_bytes(b"x" * 100)
    (tmp_path / "000001.tar").write_bytes(b"x" * 60)  # truncated to 60%
    entries = [ShardEntry("000000.tar", 5, 100, "x"), ShardEntry("000001.tar", 5, 100, "x"),
               ShardEntry("000002.tar", 5, 100, "x")]
    with pytest.raises(InputError, match=r"2 of 3 shards .* \(000001.tar: 60 bytes, manifest says 100; 000002.tar: missing"):
        check_shard_files(Manifest(1, entries, {}, ImageSpec(), {}, {}), str(tmp_path))
