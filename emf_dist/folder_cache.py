"""A node's local copy of a folder on object storage, for code that reads only local paths
(diffusers and transformers load a pipeline, a transformer or a text encoder from a folder).

    <EMF_CACHE_DIR, default ~/.cache/emf-dist>/folders/
        <key>/                   a complete copy (with .emf-copy.json: its source and listing)
        <key>.lock               held by the one process that downloads <key>
        .tmp-<key>-<random>/     a download under way, or what a crashed one left

The key is a hash of the URL and its listing: every file's relative name, size and version (the
ETag where the store gives one, else its modification time). An unchanged folder is downloaded
once per node however many processes ask for it (the first takes the lock and downloads, the
others wait on the lock and find the copy); a folder changed on the store lists differently and
gets a copy of its own. A copy is assembled under a temporary name, every file's size checked
against the listing, then renamed into place, so a crashed download never sits under a key's name;
the next download of that key removes its leftovers. Files and folders whose names start with
"." (hub download metadata, our own temp names) are not part of a copy. Old copies stay until
deleted: remove a key's folder when no run uses it.

Credentials come from the environment, as for every storage call (emf_dist/storage.py); a URL
that carries them (s3://KEY:SECRET@bucket/...) is refused before anything is read.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import tempfile
from typing import Iterator

import fsspec.callbacks
from tqdm.auto import tqdm

from emf_dist import storage

CACHE_ENV = "EMF_CACHE_DIR"
COPY_RECORD = ".emf-copy.json"

File = tuple[str, int, str]  # (name relative to the folder, size in bytes, version)


def cache_root() -> str:
    """Where this node keeps its copies: EMF_CACHE_DIR, else ~/.cache/emf-dist (local disk, not shared)."""
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or "~/.cache/emf-dist"))


def _version(info: dict) -> str:
    """What changes when an object is rewritten: its ETag where the store gives one, else its timestamp."""
    for key in ("ETag", "etag", "md5Hash"):
        if info.get(key):
            return str(info[key]).strip('"')
    return repr(storage.modified_time(info))


def _hidden(name: str) -> bool:
    return any(part.startswith(".") for part in name.split("/"))


def remote_listing(url: str) -> list[File]:
    """Every file below the folder ``url``, fresh from the store (not a cached listing), sorted by name."""
    fs, path = storage.filesystem(url)
    base = path.rstrip("/") + "/"
    fs.invalidate_cache(path.rstrip("/"))
    files = sorted((name[len(base):], int(info["size"]), _version(info))
                   for name, info in fs.find(base, detail=True).items()
                   if info.get("type") != "directory" and name.startswith(base) and not _hidden(name[len(base):]))
    if not files:
        raise FileNotFoundError(f"{storage.redact(url)} holds no files: give the folder that holds the model "
                                "(for a diffusers pipeline, the one with model_index.json)")
    return files


def copy_key(url: str, files: list[File]) -> str:
    return hashlib.sha256(json.dumps([url.rstrip("/"), files]).encode()).hexdigest()[:24]


def local_copy(url: str, progress: bool = True) -> str:
    """The local folder holding ``url``'s files: a local path as it is, an object-store folder as this
    node's cached copy (downloaded when no complete copy of its current listing is here)."""
    if storage.redact(url) != url:
        raise ValueError(f"{storage.redact(url)}: the URL carries credentials; take them out and set "
                         "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or an instance role) in the environment")
    if not storage.is_remote(url):
        return storage.local_path(url)
    files = remote_listing(url)
    root = os.path.join(cache_root(), "folders")
    os.makedirs(root, exist_ok=True)
    key = copy_key(url, files)
    final = os.path.join(root, key)
    if os.path.isdir(final):
        return final
    with _locked(final + ".lock"):
        if os.path.isdir(final):  # another process finished it while this one waited
            return final
        _remove_leftovers(root, key)  # the lock is ours: nobody else is downloading this key
        staging = tempfile.mkdtemp(prefix=f"{storage.TEMP_PREFIX}{key}-", dir=root)
        try:
            _download(url, files, staging, progress)
            with open(os.path.join(staging, COPY_RECORD), "w") as f:
                json.dump({"source": url, "files": files}, f, indent=1)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(root: str, key: str) -> None:
    for folder in glob.glob(os.path.join(root, f"{storage.TEMP_PREFIX}{key}-*")):
        shutil.rmtree(folder, ignore_errors=True)


class _BarCallback(fsspec.callbacks.Callback):
    """fsspec's per-file progress, added to one bar over the whole folder."""

    def __init__(self, bar: tqdm):
        super().__init__()
        self.bar = bar

    def relative_update(self, inc: int = 1) -> None:
        self.bar.update(inc)


def _download(url: str, files: list[File], staging: str, progress: bool) -> None:
    fs, path = storage.filesystem(url)
    total = sum(size for _, size, _ in files)
    # delay: a bar only for downloads that take a while (the large weight files), not for a config read.
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, delay=2.0, disable=not progress,
              desc=f"copying {storage.redact(url)}") as bar:
        for name, size, _ in files:
            target = os.path.join(staging, *name.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fs.get_file(f"{path.rstrip('/')}/{name}", target, callback=_BarCallback(bar))
            got = os.path.getsize(target)
            if got != size:
                raise OSError(f"{storage.redact(url)}/{name}: {got} bytes arrived, the listing says {size} (the "
                              "object changed while it was copied, or the transfer broke off): run again")
