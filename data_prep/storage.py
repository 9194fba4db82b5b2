"""The destination dataset folder on any fsspec filesystem, with atomic writes.

Atomic means a reader never sees a partial file under its final name:
- local folders: write a hidden temp file in the same folder, then ``os.replace`` (a rename);
- object stores (s3, gcs, azure): upload the finished file under its final key in one put; an
  object becomes visible only when its upload completes, so nothing partial is ever listed;
- anything else: upload under a temp name, then move.

Credentials come from the environment (see data_prep/config.py); `redact` strips any
``user:password@`` from URLs before they reach a manifest or a log line.
"""
from __future__ import annotations

import os
import re
import tempfile
import uuid
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}
TEMP_PREFIX = ".tmp-"


def redact(url: str) -> str:
    """The URL without any user:password part (s3://KEY:SECRET@bucket/x -> s3://bucket/x)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


class Store:
    """A dataset folder: relative names in, atomic writes out. Picklable (Ray ships it to writers)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") or url
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.is_object_store = protocol_of(self.fs) in OBJECT_STORES
        if self.is_local:  # workers may run in another folder: ship them the absolute path
            self.url = self.root

    def __reduce__(self):
        return Store, (self.url,)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def url_of(self, name: str) -> str:
        return redact(f"{self.url}/{name}")

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def size(self, name: str) -> int | None:
        try:
            return int(self.fs.size(self.path(name)))
        except FileNotFoundError:
            return None

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            return None

    def list(self, folder: str = "") -> list[str]:
        """Names (relative to the root) of the files directly in ``folder``; [] when it is absent."""
        self.fs.invalidate_cache()  # s3fs caches listings: another process may have written since
        base = self.path(folder) if folder else self.root
        try:
            entries = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        prefix = f"{base}/"
        return sorted((f"{folder}/" if folder else "") + e[len(prefix):] for e in entries if e.startswith(prefix))

    def make_dirs(self) -> None:
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)

    # ------------------------------------------------------------- atomic writes

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomically create or replace ``name`` with ``data``."""
        if self.is_local:
            tmp = self.local_temp_path(name)
            with open(tmp, "wb") as f:
                f.write(data)
            self.publish_local(tmp, name)
        elif self.is_object_store:
            self.fs.pipe_file(self.path(name), data)
        else:
            tmp = self._temp_name(name)
            self.fs.pipe_file(self.path(tmp), data)
            self.fs.mv(self.path(tmp), self.path(name))

    def local_temp_path(self, name: str) -> str:
        """Where to write ``name`` before publishing it: beside the final file for a local folder
        (so publishing is a rename on the same filesystem), else in the machine's temp folder."""
        if self.is_local:
            folder = os.path.dirname(self.path(name))
            os.makedirs(folder, exist_ok=True)
            return os.path.join(folder, os.path.basename(self._temp_name(name)))
        return os.path.join(tempfile.gettempdir(), f"emf-prep-{uuid.uuid4().hex}-{os.path.basename(name)}")

    def publish_local(self, local_path: str, name: str) -> None:
        """Move a finished local file to ``name``; it appears whole or not at all."""
        if self.is_local:
            os.replace(local_path, self.path(name))
            return
        try:
            if self.is_object_store:
                self.fs.put_file(local_path, self.path(name))
            else:
                tmp = self._temp_name(name)
                self.fs.put_file(local_path, self.path(tmp))
                self.fs.mv(self.path(tmp), self.path(name))
        finally:
            os.remove(local_path)

    def remove_stale_temps(self, folder: str = "") -> int:
        """Delete temp files left by killed writers (only our own TEMP_PREFIX names)."""
        stale = [n for n in self.list(folder) if os.path.basename(n).startswith(TEMP_PREFIX)]
        for name in stale:
            self.fs.rm_file(self.path(name))
        return len(stale)

    @staticmethod
    def _temp_name(name: str) -> str:
        head, base = os.path.split(name)
        return os.path.join(head, f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{base}")


_GLOB = re.compile(r"[*?\[]")


def expand_urls(url: str, suffixes: tuple[str, ...]) -> list[str]:
    """A folder (files with these suffixes inside, recursively), a glob, a brace pattern
    (a/{000..009}.tar) or one file -> sorted full URLs. Hidden and temp files are ignored."""
    import braceexpand

    urls = []
    for one in braceexpand.braceexpand(url):
        fs, path = fsspec.core.url_to_fs(one)
        proto = protocol_of(fs)
        if _GLOB.search(path):
            found = fs.glob(path)
        elif fs.isdir(path):
            found = [p for p in fs.find(path) if p.endswith(suffixes)]
        elif fs.exists(path):
            found = [path]
        else:
            raise FileNotFoundError(f"source {redact(one)} does not exist")
        found = [p for p in found if not os.path.basename(p).startswith(".")]
        urls += [p if proto == "file" else fs.unstrip_protocol(p) for p in sorted(found)]
    return urls
