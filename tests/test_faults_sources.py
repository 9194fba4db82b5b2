"""Prep sources that are damaged or do not answer: garbled and truncated tar members are counted
skips naming the bytes lost; 16-bit images are scaled, not clipped; URLs and S3 endpoints that
accept and never answer time out into a counted skip or a one-line error. No Ray: a shard is
loaded in-process (load_shard), and the S3 case fails before Ray would start."""
import io
import json
import socket
import tarfile
import threading
import time

import fsspec
import numpy as np
import pytest
from PIL import Image

from data_prep.images import ImageConfig, UnsupportedImage, decode, png_bytes
from data_prep.shard import ShardWork, load_shard
from data_prep.sources import SourceConfig, make_source
from data_prep.sources.fetch import read_url
from emf_app.cli import main


def sample_members(i: int) -> list[tuple[str, bytes]]:
    pixels = np.full((8, 8, 3), i % 256, np.uint8)
    return [(f"s{i:03d}.json", b"{}"), (f"s{i:03d}.png", png_bytes(pixels)), (f"s{i:03d}.txt", b"a red circle")]


def write_tar(path, n=20, garble=(), cut=None):
    """n samples of three members; ``garble``: member indices whose headers are overwritten."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for i in range(n):
            for name, data in sample_members(i):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = bytearray(buf.getvalue())
    members = tarfile.open(fileobj=io.BytesIO(bytes(data))).getmembers()
    for index in garble:
        data[members[index].offset:members[index].offset + 100] = b"\x07" * 100
    path.write_bytes(bytes(data[:cut] if cut else data))
    return path


def load(cfg: SourceConfig):
    source = make_source(cfg)
    refs = source.list_items()
    return refs, load_shard(ShardWork(0, 1, "p", refs), source, ImageConfig(resolution=8), 1000, strict=False)


def test_a_garbled_member_header_is_a_counted_skip_with_the_bytes_lost(tmp_path):
    refs, shard = load(SourceConfig(kind="webdataset", url=str(write_tar(tmp_path / "a.tar", garble=[31]))))
    assert len(refs) == 20 and len(shard) == 19  # was: 10 read, 0 skipped
    assert shard.skipped == {"corrupt_tar_member": 1}
    assert "bytes unreadable at offset" in shard.examples["corrupt_tar_member"][0]


def test_a_lost_whole_sample_is_still_counted(tmp_path):
    refs, shard = load(SourceConfig(kind="webdataset", url=str(write_tar(tmp_path / "a.tar", garble=[30, 31, 32]))))
    assert len(shard) == 19 and shard.skipped == {"corrupt_tar_member": 1}
    assert any("damaged-at" in ref.key for ref in refs)


def test_a_truncated_tar_counts_what_it_lost(tmp_path):
    whole = write_tar(tmp_path / "whole.tar").stat().st_size
    refs, shard = load(SourceConfig(kind="webdataset", url=str(write_tar(tmp_path / "a.tar", cut=whole * 6 // 10))))
    assert sum(shard.skipped.values()) == 1 and len(shard) == len(refs) - 1 < 20
    assert shard.skipped.keys() == {"corrupt_tar_member"}


def test_16_bit_grayscale_is_scaled_not_clipped():
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    rgb = decode(buf.getvalue(), 64)
    assert abs(rgb.mean() - ramp.mean() / 257) < 1 and rgb.max() == 255 and rgb.min() == 0  # was 99.8% white


def test_float_images_are_a_counted_skip():
    buf = io.BytesIO()
    Image.fromarray(np.ones((8, 8), np.float32)).save(buf, format="TIFF")
    with pytest.raises(UnsupportedImage) as err:
        decode(buf.getvalue(), 8)
    assert err.value.reason == "unsupported_image_mode"


@pytest.fixture
def black_hole():
    """127.0.0.1 only: accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_an_image_url_that_never_answers_is_skipped_in_bounded_time(tmp_path, black_hole):
    started = time.monotonic()
    assert read_url(f"http://{black_hole}/a.png", timeout_s=0.3, retries=1) == (None, "unreachable_image")
    assert time.monotonic() - started < 5
    assert read_url(str(tmp_path / "missing.png"), timeout_s=0.3, retries=5) == (None, "unreadable_image")
    table = tmp_path / "t.jsonl"
    rows = [{"image": f"http://{black_hole}/a.png", "caption": "a red circle"}]
    table.write_text("\n".join(json.dumps(r) for r in rows))
    _, shard = load(SourceConfig(kind="table", url=str(table), io_timeout_s=0.3, io_retries=0))
    assert shard.skipped == {"unreachable_image": 1}


def test_an_s3_endpoint_that_never_answers_is_a_one_line_error(tmp_path, black_hole, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{black_hole}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("EMF_STORAGE_TIMEOUT_S", "0.3")
    monkeypatch.setenv("EMF_STORAGE_RETRIES", "0")
    fsspec.AbstractFileSystem.clear_instance_cache()
    started = time.monotonic()
    try:
        assert main(["prep", "out=s3://bucket/data", "source.count=0", "progress=false"]) == 4
    finally:
        fsspec.AbstractFileSystem.clear_instance_cache()
    assert time.monotonic() - started < 20  # was: no output for 4 minutes
    err = capsys.readouterr().err
    assert "did not answer" in err and "AWS_ENDPOINT_URL" in err and "Traceback" not in err
