"""Decoding training samples from real WebDataset shards: values, the no-pickle rule, counted skips."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from emf_dist.train.shard_loader import BatchIterator, DecodedShardCache, StreamSpec, _load_npy


def npy_bytes(array: np.ndarray, version=None, allow_pickle=False) -> bytes:
    buffer = io.BytesIO()
    if version is None:
        np.save(buffer, array, allow_pickle=allow_pickle)
    else:
        np.lib.format.write_array(buffer, array, version=version, allow_pickle=allow_pickle)
    return buffer.getvalue()


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.float16).reshape(2, 3, 4),
    np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
    np.array([True, False, True]),
    np.arange(6, dtype=">i4").reshape(2, 3),
    np.float32(3.5),
])
@pytest.mark.parametrize("version", [None, (2, 0)])
def test_npy_members_load_as_numpy_loads_them(array, version):
    data = npy_bytes(array, version)
    expected = np.load(io.BytesIO(data), allow_pickle=False)
    loaded = _load_npy(data)
    assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
    np.testing.assert_array_equal(loaded, expected)


def test_npy_members_that_need_pickle_or_are_truncated_are_refused():
    with pytest.raises(ValueError, match="object arrays"):
        _load_npy(npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True))
    with pytest.raises(ValueError):
        _load_npy(npy_bytes(np.zeros((4, 4), np.float32))[:-8])
    with pytest.raises(ValueError, match="not a .npy"):
        _load_npy(b"PK\x03\x04 a zip, not an array")


def write_shard(path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def good_sample(key: str, value: int) -> dict:
    png = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(png, format="PNG")
    return {"__key__": key, "png": png.getvalue(),
            "tokens.npy": npy_bytes(np.full((3, 8), value / 255, np.float16)),
            "mask.npy": npy_bytes(np.array([True, True, False])),
            "pooled.npy": npy_bytes(np.full((8,), value / 255, np.float16))}


def test_batches_decode_every_good_sample_and_count_the_bad_ones(tmp_path):
    samples = [good_sample(f"{i:03d}", 10 * i) for i in range(6)]
    nan_tokens = dict(good_sample("nan", 0), **{"tokens.npy": npy_bytes(np.full((3, 8), np.nan, np.float16))})
    pickled = dict(good_sample("pickled", 0), **{"pooled.npy": npy_bytes(np.array([None], object), allow_pickle=True)})
    broken_png = dict(good_sample("png", 0), png=b"\x89PNG not really")
    write_shard(tmp_path / "000000.tar", samples[:3] + [nan_tokens, pickled, broken_png] + samples[3:])
    spec = StreamSpec(urls=[str(tmp_path / "000000.tar")], image_kind="png", micro_batch=6, batches_per_epoch=1,
                      shuffle_buffer=1, seed=0, rank=0, storage_options={})
    batches = BatchIterator(spec, loader_workers=0)
    batch = next(batches)
    # Shuffle buffer 1 keeps shard order: the six good samples, the three bad ones skipped and counted.
    levels = batch["image"][:, 0, 0, 0]
    torch.testing.assert_close(levels, torch.tensor([10.0 * i for i in range(6)]) / 127.5 - 1.0)
    assert batch["tokens"].dtype == torch.float32 and batch["tokens"].shape == (6, 3, 8)
    torch.testing.assert_close(batch["pooled"][:, 0], torch.tensor([10.0 * i / 255 for i in range(6)]),
                               atol=1e-3, rtol=0)
    assert batch["mask"].dtype == torch.bool and batch["mask"][0].tolist() == [True, True, False]
    assert batches.skipped == 3


def test_decoded_shard_cache_gives_the_same_stream_and_skip_counts_across_epochs(tmp_path):
    """data.cache_mib: shards decoded once and replayed from memory; batches, epochs and skipped counts
    are those of decoding every draw, and a budget too small for a shard caches nothing."""
    urls = []
    for shard in range(3):
        samples = [good_sample(f"{shard}{i:02d}", 20 * shard + i) for i in range(5)]
        bad = dict(good_sample(f"{shard}bad", 0), png=b"\x89PNG not really")
        write_shard(tmp_path / f"{shard:06d}.tar", samples[:2] + [bad] + samples[2:])
        urls.append(str(tmp_path / f"{shard:06d}.tar"))
    spec = StreamSpec(urls=urls, image_kind="png", micro_batch=4, batches_per_epoch=5, shuffle_buffer=3,
                      seed=7, rank=1, storage_options={})

    def stream(cache_mib):
        batches = BatchIterator(spec, loader_workers=0, cache_mib=cache_mib)
        taken = [next(batches) for _ in range(12)]  # two epochs and a bit
        return taken, batches

    plain, plain_iter = stream(0)
    cached, cached_iter = stream(1)
    for a, b in zip(plain, cached):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert cached_iter.skipped == plain_iter.skipped > 0
    assert cached_iter.position() == plain_iter.position() == {"epoch": 2, "taken": 2}
    assert set(cached_iter.cache.shards) == set(urls)  # every shard decoded once, then served from memory
    shard_bytes = cached_iter.cache.used_bytes // 3
    tight = DecodedShardCache(shard_bytes - 1)
    tight.offer(urls[0], cached_iter.cache.shards[urls[0]])
    assert tight.shards == {} and tight.used_bytes == 0
    with pytest.raises(ValueError, match="loader_workers: 0"):
        BatchIterator(spec, loader_workers=1, cache_mib=1)
