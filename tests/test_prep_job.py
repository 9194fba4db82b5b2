"""`emf prep` end to end on real components: a local Ray instance, the packaged MiniLM weights,
a real S3 API server (moto's server mode, as s3fs's own tests use) on 127.0.0.1, shards read
back with webdataset and `tar`.

One Ray instance serves the module (its start costs seconds); the S3 server starts first so
the Ray workers inherit its endpoint and dummy credentials from the environment, exactly as
a user's cluster would get them.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import json
import os
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests must never reach a hub

import fsspec
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep.config import PrepConfig
from data_prep.job import run_prep
from emf_app.cli import main
from emf_dist.config import load_config
from emf_dist.manifest import read_manifest
from emf_dist.scenes.generator import SceneConfig, make_scene
from emf_dist.text_encoder import TextEncoder, TextEncoderConfig
from tests.s3_server import s3_server

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-never-in-any-file-Zq9"


@pytest.fixture(scope="module")
def s3():
    with s3_server("emf-bucket", SECRET):
        yield "s3://emf-bucket"


@pytest.fixture(scope="module")
def ray_local(s3):
    import logging

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder(TextEncoderConfig())


def prep_config(out, *overrides: str) -> PrepConfig:
    return load_config(PrepConfig, None, [f"out={out}", "progress=false", *overrides])


def tar_members(path) -> list[str]:
    return subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True).stdout.split()


def file_state(path) -> tuple:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, hashlib.sha256(open(path, "rb").read()).hexdigest()


def shard_files(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("[0-9]*.tar"))


def read_shards(urls, decode=("rgb8",)) -> list[dict]:
    return list(wds.WebDataset(urls, shardshuffle=False).decode(*decode))


# ---------------------------------------------------------------- scenes, local folder

def test_crash_resume_noop_and_append(tmp_path, ray_local, minilm, capsys):
    out = tmp_path / "ds"
    # `emf prep`, dying after 2 of its 4 shards: a clear error, a progress bar, no stack trace.
    assert main(["prep", f"out={out}", "source.count=40", "samples_per_shard=10", "crash_after_shards=2"]) == 3
    err = capsys.readouterr().err
    assert "emf prep: error: the pipeline stopped: InjectedCrash: crash_after_shards" in err
    assert "Traceback" not in err and "item" in err
    assert not (out / "manifest.json").exists()
    done = shard_files(out)
    assert len(done) == 2  # exactly the shards finished before the crash; the third died halfway
    assert any(p.name.startswith(".tmp-") for p in out.iterdir())
    for name in done:
        assert len(tar_members(out / name)) == 10 * 6  # png, txt, json, tokens, mask, pooled
    before = {name: file_state(out / name) for name in done}

    summary = run_prep(prep_config(out, "source.count=40", "samples_per_shard=10"))
    assert (summary.shards_reused, summary.shards_written, summary.samples_written) == (2, 2, 20)
    assert {name: file_state(out / name) for name in done} == before  # untouched, not rewritten
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())
    manifest = read_manifest(str(out))
    assert manifest.version == 1 and manifest.total_samples == 40 and len(manifest.shards) == 4
    for shard in manifest.shards:
        data = (out / shard.name).read_bytes()
        assert (shard.samples, shard.bytes, shard.sha256) == (10, len(data), hashlib.sha256(data).hexdigest())
    assert manifest.encoder == minilm.fingerprint()
    assert manifest.text_shapes == {"tokens": [32, 384], "mask": [32], "pooled": [384]}
    assert manifest.dtypes == {"tokens": "float16", "mask": "bool", "pooled": "float16", "image": "uint8"}
    assert (manifest.image.kind, manifest.image.resolution, manifest.image.shape) == ("png", 32, [3, 32, 32])
    assert manifest.source["kind"] == "scenes" and manifest.skipped == {} and manifest.truncated == 0

    samples = read_shards(manifest.shard_urls(str(out)))
    assert sorted(s["__key__"] for s in samples) == [f"scene-train-{i:09d}" for i in range(40)]
    check = [s for s in samples if s["__key__"] in ("scene-train-000000000", "scene-train-000000037")]
    encoded = minilm.encode([s["txt"] for s in check])
    for i, sample in enumerate(check):
        scene = make_scene(SceneConfig(), int(sample["__key__"].rsplit("-", 1)[1]))
        np.testing.assert_array_equal(sample["png"], scene.image)
        assert sample["txt"] == scene.caption and sample["json"]["objects"] == scene.metadata()["objects"]
        np.testing.assert_array_equal(sample["mask.npy"], encoded.mask[i].numpy())
        np.testing.assert_allclose(sample["tokens.npy"].astype(np.float32), encoded.tokens[i].float().numpy(), atol=2e-3)
        np.testing.assert_allclose(sample["pooled.npy"].astype(np.float32), encoded.pooled[i].float().numpy(), atol=2e-3)

    manifest_bytes = (out / "manifest.json").read_bytes()
    again = run_prep(prep_config(out, "source.count=40", "samples_per_shard=10"))
    assert again.versions_written == [] and again.pipeline_seconds == 0
    assert (out / "manifest.json").read_bytes() == manifest_bytes

    old = {name: file_state(out / name) for name in shard_files(out)}
    appended = run_prep(prep_config(out, "source.count=55", "samples_per_shard=10"))
    assert appended.versions_written == [2] and appended.samples_written == 15
    assert {name: file_state(out / name) for name in old} == old
    v2 = read_manifest(str(out))
    assert v2.version == 2 and v2.total_samples == 55
    assert [(s.name, s.samples, s.version) for s in v2.shards[4:]] == [("000004.tar", 10, 2), ("000005.tar", 5, 2)]
    assert v2.shards[:4] == manifest.shards
    assert json.loads((out / "manifests/v000001.json").read_text())["version"] == 1
    assert (out / "manifests/v000002.json").read_bytes() == (out / "manifest.json").read_bytes()


# ---------------------------------------------------------------- bad input

def _png(path, size=(48, 40), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
    """An img2dataset-style folder with one of every kind of bad item."""
    root = tmp_path / "messy"
    good = _png(root / "good1.png")
    (root / "good1.txt").write_text("a red rectangle")
    _png(root / "good2.png", color=(0, 0, 255))
    (root / "good2.json").write_text(json.dumps({"caption": "a blue rectangle", "url": "http://x/2.png"}))
    _png(root / "sub/good3.png")
    (root / "sub/good3.txt").write_text("a nested one")
    _png(root / "with.dots.png")
    (root / "with.dots.txt").write_text("dots in the file name")
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    (root / "corrupt.txt").write_text("corrupt image")
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "truncated.txt").write_text("truncated image")
    _png(root / "nocaption.png")
    _png(root / "empty.png")
    (root / "empty.txt").write_text("  \n")
    _png(root / "latin1.png")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    _png(root / "long.png")
    (root / "long.txt").write_text("word " * 400)
    _png(root / "dup.png")
    _png(root / "dup.jpg")
    (root / "dup.txt").write_text("two images share this stem")
    (root / "orphan.txt").write_text("a caption without an image")
    return root


def test_bad_input_is_skipped_and_counted_by_reason(tmp_path, ray_local, messy_folder, capsys):
    out = tmp_path / "ds"
    summary = run_prep(prep_config(out, "source.kind=folder", f"source.url={messy_folder}"))
    expected = {"unreadable_image": 2, "missing_caption": 1, "empty_caption": 1, "caption_not_utf8": 1,
                "caption_too_long": 1, "duplicate_key": 1, "missing_image": 1}
    assert summary.skipped == expected
    manifest = read_manifest(str(out))
    assert manifest.skipped == expected and manifest.total_samples == 5
    text = capsys.readouterr().out
    assert "unreadable_image 2" in text and "corrupt.png" in text and str(out / "manifest.json") in text
    samples = read_shards(manifest.shard_urls(str(out)))
    assert sorted(s["__key__"] for s in samples) == ["dup", "good1", "good2", "sub_good3", "with_dots"]
    good2 = next(s for s in samples if s["__key__"] == "good2")
    assert good2["txt"] == "a blue rectangle" and good2["json"]["url"] == "http://x/2.png"
    assert good2["png"].shape == (32, 32, 3) and tuple(good2["png"][16, 16]) == (0, 0, 255)


def test_strict_names_the_first_offender_without_a_traceback(tmp_path, ray_local, messy_folder, capsys):
    args = ["prep", f"out={tmp_path / 'ds'}", "progress=false", "source.kind=folder", f"source.url={messy_folder}"]
    assert main(args + ["--strict"]) == 3  # the duplicate is found while planning, before any shard
    err = capsys.readouterr().err
    assert "bad input dup.png (key 'dup'): duplicate_key" in err and "dup.jpg" in err and "Traceback" not in err
    (messy_folder / "dup.jpg").unlink()
    assert main(args + ["--strict"]) == 3  # now the loaders find the first bad image
    err = capsys.readouterr().err
    assert "bad input corrupt.png (key 'corrupt'): unreadable_image" in err and "Traceback" not in err
    assert not (tmp_path / "ds" / "manifest.json").exists() and not shard_files(tmp_path / "ds")


# ---------------------------------------------------------------- tables + VAE latents

@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.5)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return folder, vae.eval()


def test_tables_with_named_columns_to_vae_latents(tmp_path, ray_local, tiny_vae):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    root = tmp_path / "tables"
    _png(root / "imgs/a.png", color=(10, 200, 10))
    _png(root / "imgs/b.png", size=(40, 64), color=(250, 250, 0))
    rows = [{"id": "a", "img": "imgs/a.png", "text": "a green box"},
            {"id": "b", "img": f"file://{root / 'imgs/b.png'}", "text": "a yellow box"},
            {"id": "gone", "img": "imgs/missing.png", "text": "no such file"}]
    (root / "part1.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n{not json\n")
    c_bytes = _png(tmp_path / "c.png", color=(0, 0, 0))
    pq.write_table(pa.table({"id": ["c"], "img": [c_bytes], "text": ["a black box"]}), root / "part2.parquet")
    folder, vae = tiny_vae
    summary = run_prep(prep_config(tmp_path / "ds", "source.kind=table", f"source.url={root}", "source.image_column=img",
                                   "source.caption_column=text", "source.key_column=id", "image.kind=latent",
                                   f"image.vae={folder}", "encoder.max_length=16"))
    assert summary.skipped == {"unreadable_image": 1, "unreadable_row": 1}
    manifest = read_manifest(str(tmp_path / "ds"))
    assert (manifest.image.kind, manifest.image.shape, manifest.image.scale_factor) == ("latent", [4, 16, 16], 0.5)
    assert manifest.image.vae == str(folder) and len(manifest.image.vae_sha256) == 64
    assert manifest.dtypes["image"] == "float16" and manifest.text_shapes["tokens"] == [16, 384]
    samples = {s["__key__"]: s for s in read_shards(manifest.shard_urls(str(tmp_path / "ds")), decode=())}
    assert sorted(samples) == ["a", "b", "c"]
    assert set(samples["a"]) >= {"latent.npy", "txt", "json", "tokens.npy"} and "png" not in samples["a"]
    latent = samples["b"]["latent.npy"]
    assert latent.dtype == np.float16 and latent.shape == (4, 16, 16)
    pixels = np.full((32, 32, 3), (250, 250, 0), np.uint8)  # b, resized and cropped: still all yellow
    with torch.no_grad():
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
        want = (vae.encode(x).latent_dist.mean * 0.5).numpy()[0]
    np.testing.assert_allclose(latent.astype(np.float32), want, atol=2e-3)
    assert samples["c"]["json"]["id"] == "c" and samples["c"]["txt"] == "a black box"


# ---------------------------------------------------------------- S3

def test_s3_destination_and_reencoding_from_s3_tars(tmp_path, ray_local, s3, capsys, monkeypatch):
    url = f"{s3}/scenes"
    run_prep(prep_config(url, "source.count=30", "samples_per_shard=12"))
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    names = sorted(p.split("/", 2)[2] for p in fs.find("emf-bucket/scenes"))
    assert [n for n in names if n.endswith(".tar")] == ["000000.tar", "000001.tar", "000002.tar"]
    assert "manifest.json" in names and "manifests/v000001.json" in names
    assert not any(".tmp-" in n for n in names)
    manifest = read_manifest(url)
    assert [s.samples for s in manifest.shards] == [12, 12, 6]
    local = tmp_path / "000001.tar"
    fs.get("emf-bucket/scenes/000001.tar", str(local))
    assert hashlib.sha256(local.read_bytes()).hexdigest() == manifest.shards[1].sha256
    assert len(tar_members(local)) == 12 * 6

    # webdataset streams the shards straight from S3 through fsspec-opened files
    gopen = importlib.import_module("webdataset.gopen")  # `wds.gopen` is the function of the same name
    monkeypatch.setitem(gopen.gopen_schemes, "s3", lambda u, mode="rb", bufsize=8192, **kw: fsspec.open(u, mode).open())
    samples = read_shards(manifest.shard_urls(url))
    assert len(samples) == 30 and samples[0]["tokens.npy"].shape == (32, 384)

    # re-encode those tars, read from S3, with another encoder length and raw uint8 pixels
    run_prep(prep_config(f"{s3}/scenes16", "source.kind=webdataset", f"source.url={url}", "encoder.max_length=16",
                         "image.kind=uint8", "samples_per_shard=16"))
    again = read_manifest(f"{s3}/scenes16")
    assert again.source["kind"] == "webdataset" and again.encoder["max_length"] == 16 and again.total_samples == 30
    redone = {s["__key__"]: s for s in read_shards(again.shard_urls(f"{s3}/scenes16"), decode=())}
    first = {s["__key__"]: s for s in samples}
    assert sorted(redone) == sorted(first)
    key = "scene-train-000000029"
    np.testing.assert_array_equal(redone[key]["rgb.npy"], first[key]["png"])
    assert redone[key]["rgb.npy"].dtype == np.uint8 and redone[key]["tokens.npy"].shape == (16, 384)

    # credentials stay in the environment: not in any object written, nor in what was printed
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    for path in fs.find("emf-bucket"):
        data = fs.cat_file(path)
        assert SECRET.encode() not in (gzip.decompress(data) if path.endswith(".gz") else data)
