"""Shard writing: one WebDataset tar per shard, published atomically, then its completion record.

A shard is first written whole to a temp file (hashing as it goes), then published under its
final name ``NNNNNN.tar`` in one step (see emf_dist/storage.py), and only then is its record
``_prep/shards/NNNNNN.json`` written. A rerun trusts a shard only when both exist and agree,
so a writer killed at any point leaves either nothing or a shard that is redone.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from typing import Iterator

import numpy as np

from data_prep.shard import ShardBatch, shard_name, unpack
from emf_dist.manifest import IMAGE_MEMBERS
from emf_dist.storage import Store

RECORDS = "_prep/shards"
# A fixed member mtime makes a shard's bytes a function of its content, so a shard redone
# after a crash has the same checksum as the first attempt would have had.
TAR_MTIME = 0


class InjectedCrash(RuntimeError):
    """Raised by the crash_after_shards fault injection (testing only)."""


def record_name(index: int) -> str:
    return f"{RECORDS}/{index:06d}.json"


class _HashingFile:
    """Write-through file wrapper that counts bytes and computes sha256 on the way."""

    def __init__(self, raw):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)


def _npy_rows(array: np.ndarray) -> Iterator[bytes]:
    """Each row of ``array`` as a complete .npy file; the header is the same for every row, so
    it is built once (np.save per row would rebuild it thousands of times per shard)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(array.dtype),
                                               "fortran_order": False, "shape": array.shape[1:]})
    header = buf.getvalue()
    for row in array:
        yield header + np.ascontiguousarray(row).tobytes()


def _samples(shard: ShardBatch, image_kind: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    ext = IMAGE_MEMBERS[image_kind]
    images = {"png": lambda: iter(shard.images), "uint8": lambda: _npy_rows(shard.images),
              "latent": lambda: _npy_rows(shard.latents)}[image_kind]()
    columns = zip(shard.keys, images, shard.captions, shard.meta,
                  _npy_rows(shard.tokens), _npy_rows(shard.mask), _npy_rows(shard.pooled))
    for key, image, caption, meta, tokens, mask, pooled in columns:
        yield key, {ext: image, "txt": caption.encode("utf-8"), "json": meta,
                    "tokens.npy": tokens, "mask.npy": mask, "pooled.npy": pooled}


def _write_tar(fileobj, samples: Iterator[tuple[str, dict[str, bytes]]]) -> None:
    """Members ``key.ext`` with a sample's members adjacent, as webdataset's TarWriter writes them
    (ustar headers; pax only for names over 100 characters). TarWriter itself is not used:
    importing webdataset imports torch, seconds of start-up in every writer process."""
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                data = members[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
                tar.addfile(info, io.BytesIO(data))


def write_shard(shard: ShardBatch, store: Store, image_kind: str, run_id: str = "", crash: bool = False) -> dict:
    """Write and publish one shard; returns its record (what the manifest lists)."""
    started = time.perf_counter()
    name = shard_name(shard.index)
    record = {"name": name, "index": shard.index, "version": shard.version, "plan": shard.plan_id,
              "samples": len(shard), "bytes": 0, "sha256": "", "skipped": shard.skipped,
              "examples": shard.examples, "truncated": shard.truncated, "run": run_id}
    if len(shard):  # a shard whose items were all skipped gets a record but no file
        tmp = store.local_temp_path(name)
        with open(tmp, "wb") as raw:
            out = _HashingFile(raw)
            _write_tar(out, _samples(shard, image_kind))
        if crash:
            _die_halfway(tmp, name)
        store.publish_local(tmp, name)
        record.update(bytes=out.size, sha256=out.sha.hexdigest())
    record["seconds"] = dict(shard.seconds, write=time.perf_counter() - started)
    store.write_bytes(json.dumps(record, sort_keys=True).encode(), record_name(shard.index))
    return record


def _die_halfway(tmp: str, name: str) -> None:
    """Leave what a writer killed mid-upload leaves: a partial temp file, nothing under ``name``."""
    os.truncate(tmp, os.path.getsize(tmp) // 2)
    raise InjectedCrash(f"crash_after_shards: writer died halfway through {name} (fault injection)")


def write_shard_batch(batch: dict[str, np.ndarray], store: Store, image_kind: str, run_id: str,
                      crash_after: int | None) -> dict[str, np.ndarray]:
    """Ray Data task: one shard in, its record (as JSON text) out."""
    shard = unpack(batch)
    if shard.error:  # strict mode found bad input: nothing is written, the driver stops the run
        record = {"index": shard.index, "error": shard.error}
    else:
        crash = crash_after is not None and _written_by(store, run_id) >= crash_after
        record = write_shard(shard, store, image_kind, run_id, crash)
    return {"shard": np.array([shard.index]), "record": np.array([json.dumps(record)], dtype=object)}


def _written_by(store: Store, run_id: str) -> int:
    """Shards this run has finished (fault injection only: it reads every record)."""
    records = (json.loads(store.read_bytes(name) or b"{}") for name in store.names(RECORDS))
    return sum(r.get("run") == run_id for r in records)
