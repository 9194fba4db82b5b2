"""Streaming training batches from WebDataset shards (emf_dist/manifest.py's format).

Every training rank reads its own endless stream: shards are drawn with replacement
(resampled) by a seeded RNG, samples pass a seeded shuffle buffer, and an epoch is a fixed
number of batches per rank, so no rank runs dry and every rank takes the same number of
steps whatever the shard sizes. Everything random is seeded by (seed, epoch, rank, loader
worker), so a resumed run rebuilds the epoch's stream and skips the batches it already
consumed: the data position is just (epoch, batches taken).

A rank that decodes in its own process (``loader_workers: 0``) can keep decoded shards in
memory (``DecodedShardCache``, ``data.cache_mib``): a small dataset that fits is then read and
decoded once instead of on every draw, and the stream stays the same batch for batch (decoding
is deterministic, and a cached shard replays its skip count).

Samples decode without pickle (``np.load(allow_pickle=False)``, PNG via PIL). A sample or
shard that fails to read or decode is skipped and counted; the count rides along with the
next batch to the training loop, so a corrupt shard shows up in the metrics, never as a hang.
"""
from __future__ import annotations

import functools
import io
import math
import random
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from emf_dist.manifest import IMAGE_MEMBERS, Manifest

MAX_EMPTY_SHARDS_IN_A_ROW = 20


@dataclass
class StreamSpec:
    urls: list[str]
    image_kind: str          # manifest.image.kind
    micro_batch: int
    batches_per_epoch: int   # per rank
    shuffle_buffer: int
    seed: int
    rank: int
    storage_options: dict


@functools.lru_cache(maxsize=256)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], str]:
    """(dtype, shape, order) of a .npy header. Every sample's member of one name has the same
    header, so numpy's header parsing (a Python literal eval) runs once per layout, not per sample."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed (they would need pickle)")
    return dtype, shape, "F" if fortran_order else "C"


def _load_npy(data: bytes) -> np.ndarray:
    """np.load(allow_pickle=False) of in-memory bytes, with the header parse cached (read-only view)."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy member")
    header_end = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    dtype, shape, order = _npy_layout(bytes(data[:header_end]))
    count = math.prod(shape)
    return np.frombuffer(data, dtype=dtype, count=count, offset=header_end).reshape(shape, order=order)


def raw_samples(url: str, stream):
    """A shard's samples as WebDataset groups them: {"__key__": ..., member name: bytes, ...}."""
    return wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{"url": url, "stream": stream}]))


def decode_sample(sample: dict, image_kind: str) -> dict:
    """Raw tar members -> float tensors; raises on anything malformed (the caller counts it)."""
    member = IMAGE_MEMBERS[image_kind]
    if image_kind == "png":
        rgb = np.asarray(Image.open(io.BytesIO(sample[member])).convert("RGB"))
        image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    elif image_kind == "uint8":
        image = torch.from_numpy(_load_npy(sample[member]).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    else:
        image = torch.from_numpy(_load_npy(sample[member]).astype(np.float32))
    tokens = torch.from_numpy(_load_npy(sample["tokens.npy"]).astype(np.float32))
    mask = torch.from_numpy(_load_npy(sample["mask.npy"]).astype(bool))
    pooled = torch.from_numpy(_load_npy(sample["pooled.npy"]).astype(np.float32))
    if not (torch.isfinite(image).all() and torch.isfinite(tokens).all() and torch.isfinite(pooled).all()):
        raise ValueError("non-finite values")
    return {"image": image, "tokens": tokens, "mask": mask, "pooled": pooled}


class DecodedShardCache:
    """Decoded shards kept whole, up to a byte budget; shards that no longer fit are decoded on every draw.

    A shard is kept as its sequence of decoded samples and skips (None), so a replay counts each
    skip exactly where decoding met it: the count rides with the batch it fell in."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes, self.used_bytes = budget_bytes, 0
        self.shards: dict[str, list[dict | None]] = {}

    def offer(self, url: str, samples_and_skips: list[dict | None]) -> None:
        size = sum(t.nbytes for sample in samples_and_skips if sample is not None for t in sample.values())
        if self.used_bytes + size <= self.budget_bytes:
            self.shards[url] = samples_and_skips
            self.used_bytes += size


class ShardStream(IterableDataset):
    """One epoch of one rank's batches; each DataLoader worker yields its share of them."""

    def __init__(self, spec: StreamSpec, epoch: int, cache: DecodedShardCache | None = None):
        self.spec, self.epoch, self.cache = spec, epoch, cache
        self.skipped = 0

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def _samples(self, rng: random.Random):
        """Endless decoded samples from shards drawn with replacement."""
        empty_in_a_row = 0  # shards that gave no usable sample: all bad means fail loudly, not spin
        while True:
            url, good, error = rng.choice(self.spec.urls), 0, None
            try:
                for sample in self._shard_samples(url):
                    good += 1
                    yield sample
            except Exception as exc:  # noqa: BLE001 - unreadable or truncated shard: count it, draw another
                self.skipped += 1
                error = exc
            empty_in_a_row = 0 if good else empty_in_a_row + 1
            if empty_in_a_row >= MAX_EMPTY_SHARDS_IN_A_ROW:
                raise RuntimeError(f"{empty_in_a_row} shards in a row gave no readable sample (last: {url}"
                                   f"{f': {error}' if error else ''}); check the dataset URL, credentials "
                                   "and endpoint, or re-run `emf prep`")

    def _shard_samples(self, url: str):
        """A shard's good samples, replayed from the cache (its skips counted where decoding met them)
        or decoded."""
        cached = self.cache.shards.get(url) if self.cache is not None else None
        if cached is None:
            yield from self._decode_shard(url)
            return
        for sample in cached:
            if sample is None:
                self.skipped += 1
            else:
                yield sample

    def _decode_shard(self, url: str):
        """A shard's good samples (bad ones counted), offered whole to the cache once read to its end."""
        decoded = []
        with fsspec.open(url, "rb", **self.spec.storage_options) as stream:
            for raw in raw_samples(url, stream):
                try:
                    sample = decode_sample(raw, self.spec.image_kind)
                except Exception:  # noqa: BLE001 - a bad sample is counted, never fatal
                    sample = None
                    self.skipped += 1
                if self.cache is not None:
                    decoded.append(sample)
                if sample is not None:
                    yield sample
        if self.cache is not None:
            self.cache.offer(url, decoded)

    def _shuffled(self, rng: random.Random):
        buffer = []
        for sample in self._samples(rng):
            buffer.append(sample)
            if len(buffer) >= self.spec.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))

    def __iter__(self):
        worker, workers = self._worker()
        spec = self.spec
        share = spec.batches_per_epoch // workers + (worker < spec.batches_per_epoch % workers)
        rng = random.Random(f"{spec.seed}/{self.epoch}/{spec.rank}/{worker}")
        samples = self._shuffled(rng)
        for _ in range(share):
            batch = [next(samples) for _ in range(spec.micro_batch)]
            collated = {k: torch.stack([s[k] for s in batch]) for k in batch[0]}
            collated["skipped"] = torch.tensor(self.skipped)
            self.skipped = 0
            yield collated


def epoch_loader(spec: StreamSpec, epoch: int, loader_workers: int,
                 cache: DecodedShardCache | None = None) -> DataLoader:
    """Batches are assembled inside the loader workers (batch_size=None passes them through)."""
    return DataLoader(ShardStream(spec, epoch, cache), batch_size=None, num_workers=loader_workers,
                      persistent_workers=False, prefetch_factor=2 if loader_workers else None)


class BatchIterator:
    """Endless batches for one rank with a resumable position (epoch, batches taken)."""

    def __init__(self, spec: StreamSpec, loader_workers: int, epoch: int = 0, taken: int = 0, cache_mib: int = 0):
        if cache_mib and loader_workers:
            raise ValueError("data.cache_mib keeps decoded shards in the training process: it needs data."
                             "loader_workers: 0 (loader processes would each fill a copy and drop it every epoch)")
        self.spec, self.loader_workers = spec, loader_workers
        self.epoch, self.taken = epoch, taken
        self.skipped = 0
        self.cache = DecodedShardCache(cache_mib * 2**20) if cache_mib else None
        self._iter = self._open(skip=taken)

    def _open(self, skip: int):
        it = iter(epoch_loader(self.spec, self.epoch, self.loader_workers, self.cache))
        for _ in range(skip):  # resume: replay the epoch's stream up to where the run stopped
            next(it)
        return it

    def position(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken}

    def __next__(self) -> dict:
        try:
            batch = next(self._iter)
        except StopIteration:
            self.epoch, self.taken = self.epoch + 1, 0
            self._iter = self._open(skip=0)
            batch = next(self._iter)
        self.taken += 1
        self.skipped += int(batch.pop("skipped"))
        return batch


def stream_spec(manifest: Manifest, dataset_url: str, *, micro_batch: int, world_size: int, rank: int,
                samples_per_epoch: int, shuffle_buffer: int, seed: int, storage_options: dict) -> StreamSpec:
    samples = samples_per_epoch or manifest.total_samples
    return StreamSpec(urls=manifest.shard_urls(dataset_url), image_kind=manifest.image.kind,
                      micro_batch=micro_batch, batches_per_epoch=max(1, samples // (world_size * micro_batch)),
                      shuffle_buffer=max(1, shuffle_buffer), seed=seed, rank=rank, storage_options=storage_options)
