"""Small JSON documents under one storage URL (a local folder or s3://bucket/prefix).

The pipeline records, the step cache, the model registry and the lease lock all keep their
state as small JSON objects. This module gives them the few operations they need, with the
same guarantees on both kinds of storage:

- ``write_json`` is atomic: a reader sees the old document or the new one, never a torn one
  (local: write a temporary file beside it, then ``os.replace``; S3: one PUT is atomic).
- ``listing`` returns each object's modification time *as the storage records it* (local
  mtime, S3 LastModified). The lease lock compares only these timestamps with each other, so
  it never depends on the clocks of the machines that use the lock.

There is no create-if-absent here: S3 has no rename and moto does not implement conditional
PUTs reliably, so callers that need exclusivity use unique object names (see lock.py).
"""
from __future__ import annotations

import json
import os
import posixpath
import tempfile
from dataclasses import dataclass
from datetime import datetime

from emf_dist import storage


@dataclass
class Entry:
    name: str        # object name relative to the listed folder
    modified: float  # the storage's own timestamp (seconds since the epoch)


class Store:
    def __init__(self, url: str):
        self.url = url if storage.is_remote(url) else storage.local_path(url)
        self.remote = storage.is_remote(url)
        self.fs, self.root = storage.filesystem(url)

    def url_of(self, *parts: str) -> str:
        return storage.join(self.url, *parts)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if self.remote else os.path.join(self.root, *parts)

    def _fresh(self, path: str) -> None:
        # s3fs caches listings and object info per process; a lock or registry must see other writers now.
        if self.remote:
            self.fs.invalidate_cache(path)

    def read_json(self, *parts: str) -> dict | None:
        path = self._path(*parts)
        self._fresh(path)
        try:
            # One GET: s3fs's file objects check the ETag between reads and fail on an object
            # replaced meanwhile, which is exactly what leases and pointers are.
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    def write_json(self, doc: dict, *parts: str) -> str:
        path = self._path(*parts)
        data = json.dumps(doc, indent=1, sort_keys=True).encode()
        if self.remote:
            self.fs.pipe_file(path, data)
            self._fresh(path)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        return self.url_of(*parts)

    def delete(self, *parts: str) -> bool:
        """Remove one object; False if it was already gone (another process may have removed it)."""
        path = self._path(*parts)
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        finally:
            self._fresh(path)
        return True

    def exists(self, *parts: str) -> bool:
        path = self._path(*parts)
        self._fresh(path)
        return self.fs.exists(path)

    def modified(self, *parts: str) -> float | None:
        path = self._path(*parts)
        self._fresh(path)
        try:
            return _modified(self.fs.info(path))
        except FileNotFoundError:
            return None

    def listing(self, *parts: str) -> list[Entry]:
        """Files directly in a folder with their storage timestamps; [] when the folder does not exist."""
        path = self._path(*parts)
        self._fresh(path)
        try:
            infos = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return [Entry(posixpath.basename(i["name"].rstrip("/")), _modified(i))
                for i in infos if i.get("type") == "file" and not posixpath.basename(i["name"]).startswith(".tmp-")]


def _modified(info: dict) -> float:
    if "mtime" in info:                     # local files
        return float(info["mtime"])
    stamp = info.get("LastModified") or info.get("last_modified")  # s3fs
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    if isinstance(stamp, str):
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    raise ValueError(f"storage gave no modification time for {info.get('name')}")
