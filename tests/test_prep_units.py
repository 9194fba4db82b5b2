"""data_prep pieces that need no Ray: config checks, item checks, images, planning, shard writing.

The end-to-end job (real Ray, real S3 API server, real encoder) is in test_prep_job.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep.config import PrepConfig
from data_prep.images import decode, png_bytes
from data_prep.items import BadInputError, ItemRef, check_caption, sanitize_key
from data_prep.plan import select_new
from data_prep.shard import ShardBatch
from data_prep.sources import SourceConfig, make_source
from data_prep.state import VersionPlan
from data_prep.writer import InjectedCrash, write_shard
from emf_app.cli import main
from emf_dist.config import ConfigError, load_config
from emf_dist.storage import Store, redact


def test_bad_config_lists_every_problem_before_any_work():
    with pytest.raises(ConfigError) as err:  # every section's problems at once
        load_config(PrepConfig, None, ["source.kind=folder", "image.kind=latent", "ray.encoders=3"])
    text = str(err.value)
    for expected in ("source: url is required", "image: kind 'latent' needs vae", "ray: the stages need 4 CPUs"):
        assert expected in text
    with pytest.raises(ConfigError) as err:  # then the job-level checks
        load_config(PrepConfig, None, ["samples_per_shard=0", "encoder.dtype=bfloat16"])
    assert "samples_per_shard must be >= 1" in str(err.value) and "bfloat16 cannot be stored" in str(err.value)


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert main(["prep", "samples_per_shard=0", "image.resolution=64"]) == 2
    err = capsys.readouterr().err
    assert "samples_per_shard must be >= 1" in err and "resizing generated scenes would blur" in err
    assert "Traceback" not in err


def test_keys_are_made_webdataset_safe():
    assert sanitize_key("00000/photo.v2 final") == "00000_photo_v2_final"
    assert sanitize_key("scene-train-000000001") == "scene-train-000000001"


@pytest.mark.parametrize("raw, reason", [
    (None, "missing_caption"), (b"caf\xe9", "caption_not_utf8"), ("  \n", "empty_caption"),
    ("x" * 11, "caption_too_long"), (3.5, "missing_caption")])
def test_bad_captions_have_a_reason(raw, reason):
    assert check_caption(raw, max_chars=10) == (None, reason)


def test_good_captions_are_stripped_utf8():
    assert check_caption(" caf\xe9 ".encode(), max_chars=10) == ("caf\xe9", None)


def test_decode_resizes_the_short_side_and_center_crops():
    bands = np.zeros((32, 96, 3), np.uint8)  # red | green | blue, 32 px each
    bands[:, :32, 0] = bands[:, 32:64, 1] = bands[:, 64:, 2] = 255
    buf = io.BytesIO()
    Image.fromarray(bands).save(buf, format="JPEG", quality=95)
    out = decode(buf.getvalue(), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    center = out[4:12, 4:12].astype(int)
    assert (center[..., 1] > 200).all() and (center[..., [0, 2]] < 60).all()
    rgba = np.full((20, 20, 4), 200, np.uint8)
    assert decode(rgba, 20).shape == (20, 20, 3)  # arrays too: RGBA -> RGB


def test_decode_rejects_corrupt_and_truncated_images():
    good = png_bytes(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for bad in (b"not an image at all", good[: len(good) // 2]):
        with pytest.raises(ValueError, match="not a readable image"):
            decode(bad, 32)


def _ref(key: str, where: str) -> ItemRef:
    return ItemRef(key, where)


def test_select_new_skips_taken_keys_and_counts_duplicates():
    refs = [_ref("a", "a.jpg"), _ref("b", "b.jpg"), _ref("b", "b.png"), _ref("c", "c.jpg")]
    new, duplicates = select_new(refs, taken={"a"}, where=lambda r: r.locator)
    assert [r.locator for r in new] == ["b.jpg", "c.jpg"]
    assert [(d.locator, f.locator) for d, f in duplicates] == [("b.png", "b.jpg")]
    assert select_new(refs, taken={"a", "b", "c"}, where=lambda r: r.locator) == ([], [])
    with pytest.raises(BadInputError, match=r"bad input b.png \(key 'b'\): duplicate_key.*\(b.jpg\)"):
        select_new(refs, taken=set(), where=lambda r: r.locator, strict=True)


def test_plan_cuts_keys_into_fixed_shards_and_round_trips():
    plan = VersionPlan(version=2, first_shard=7, samples_per_shard=3, keys=list("abcdefgh"), settings={"x": 1},
                       source={"kind": "scenes"})
    assert plan.num_shards == 3
    assert [plan.shard_keys(j) for j in range(3)] == [list("abc"), list("def"), list("gh")]
    assert VersionPlan.from_bytes(plan.to_bytes()) == plan


def test_folder_listing_is_stable_and_pairs_sidecars(tmp_path):
    for name in ("b.jpg", "b.txt", "a.png", "a.json", "sub/c.d.webp", "sub/c.d.txt", "orphan.txt",
                 "00000_stats.json", ".hidden.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    refs = make_source(SourceConfig(kind="folder", url=str(tmp_path))).list_items()
    assert refs == [ItemRef("a", ("a.png", None, "a.json")), ItemRef("b", ("b.jpg", "b.txt", None)),
                    ItemRef("orphan", (None, "orphan.txt", None)), ItemRef("sub_c_d", ("sub/c.d.webp", "sub/c.d.txt", None))]


def test_redact_drops_credentials_from_urls():
    assert redact("s3://KEY:SECRET@bucket/ds") == "s3://bucket/ds"
    assert redact("/data/ds") == "/data/ds"


def _tiny_shard(n: int = 3) -> ShardBatch:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(n)]
    return ShardBatch(index=5, version=1, plan_id="p", keys=[f"k{i}" for i in range(n)], captions=[f"caption {i}" for i in range(n)],
                      meta=[json.dumps({"i": i}).encode() for i in range(n)], images=[png_bytes(im) for im in images],
                      tokens=rng.standard_normal((n, 4, 6)).astype(np.float16),
                      mask=np.tril(np.ones((n, 4), bool), 1), pooled=rng.standard_normal((n, 6)).astype(np.float16))


def test_shard_is_a_tar_that_webdataset_and_tar_read(tmp_path):
    shard = _tiny_shard()
    record = write_shard(shard, Store(str(tmp_path)), "png")
    path = tmp_path / "000005.tar"
    assert record["samples"] == 3 and record["bytes"] == path.stat().st_size
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    listing = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:7] == ["k0.json", "k0.mask.npy", "k0.png", "k0.pooled.npy", "k0.tokens.npy", "k0.txt", "k1.json"]
    samples = list(wds.WebDataset([str(path)], shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == shard.keys
    for i, sample in enumerate(samples):
        assert sample["txt"] == shard.captions[i] and sample["json"] == {"i": i}
        np.testing.assert_array_equal(sample["tokens.npy"], shard.tokens[i])
        np.testing.assert_array_equal(sample["mask.npy"], shard.mask[i])
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), decode(shard.images[i], 8))
    assert json.loads((tmp_path / "_prep/shards/000005.json").read_text())["sha256"] == record["sha256"]
    assert sorted(os.listdir(tmp_path)) == ["000005.tar", "_prep"]  # no temp file left behind


def test_a_writer_dying_midway_leaves_nothing_under_the_final_name(tmp_path):
    with pytest.raises(InjectedCrash):
        write_shard(_tiny_shard(), Store(str(tmp_path)), "png", crash=True)
    names = os.listdir(tmp_path)
    assert "000005.tar" not in names and not (tmp_path / "_prep").exists()
    assert len(names) == 1 and names[0].startswith(".tmp-")  # the partial upload, hidden
    assert Store(str(tmp_path)).remove_stale_temps() == 1 and os.listdir(tmp_path) == []
