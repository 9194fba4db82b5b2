"""Where datasets, runs, models and pipeline records live: a local path or an object store, by URL.

One storage layer for every writer in the project (data prep's shards and manifests, training's
exports, the pipelines' records, step cache, model registry and lease lock):

- URLs: ``is_remote``, ``join``, ``filesystem`` (fsspec), ``ray_storage`` (pyarrow, for Ray Train);
- ``Store``: a folder addressed by relative names, with atomic writes. A reader never sees a
  partial file under its final name: a local file is written beside its final name and renamed
  (``os.replace``); on an object store (s3, gcs, azure) a finished file is uploaded under its
  final key in one PUT, and an object becomes visible only when its upload completes; any other
  filesystem gets a temporary name, then a move;
- ``local_folder`` / ``output_folder``: a local view of a possibly remote folder, for code that
  reads or writes local paths.
  A remote folder read again and again (a pretrained model) is copied once per node instead
  (emf_dist/folder_cache.py).

Credentials never pass through our configs: s3fs/botocore and pyarrow read AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY (or an instance role) from the environment. A non-AWS endpoint (MinIO, Ceph,
a test server) is named by AWS_ENDPOINT_URL, the variable the AWS SDKs themselves use; it is not a
secret but is still kept out of configs so that the same config runs against any store. ``redact``
strips a ``user:password@`` part from URLs before they reach a manifest, a record or a log line.

Every request is bounded: botocore's connect and read timeouts (EMF_STORAGE_TIMEOUT_S, 20 s)
with EMF_STORAGE_RETRIES (2) retries by s3fs, pyarrow's S3 alike, and a total limit on each
``Store`` call on S3; an endpoint that never answers ends in StorageUnreachable or botocore's
timeout error, not in a hang.

There is no create-if-absent: S3 has no rename and conditional PUTs are not portable, so callers
that need exclusivity use unique object names (see emf_dist/lease.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator
from urllib.parse import urlparse, urlsplit, urlunsplit

import fsspec
import fsspec.exceptions

from emf_dist.errors import StorageUnreachable

ENDPOINT_ENV = "AWS_ENDPOINT_URL"
TIMEOUT_ENV = "EMF_STORAGE_TIMEOUT_S"
RETRIES_ENV = "EMF_STORAGE_RETRIES"
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}
TEMP_PREFIX = ".tmp-"


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def io_limits() -> tuple[float, int]:
    """(timeout in seconds for connecting and for each read, retries after the first attempt) of every
    storage request: EMF_STORAGE_TIMEOUT_S, EMF_STORAGE_RETRIES. Environment variables rather than
    config fields, because every reader needs them (Ray workers too) and no config should differ by
    the network it runs on."""
    try:
        timeout, retries = float(os.environ.get(TIMEOUT_ENV, 20)), int(os.environ.get(RETRIES_ENV, 2))
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds and {RETRIES_ENV} a whole number") from None
    if timeout <= 0 or retries < 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0 and {RETRIES_ENV} >= 0")
    return timeout, retries


def total_timeout() -> float:
    """The most one storage call may take, retries and s3fs's backoff included."""
    timeout, retries = io_limits()
    return 2 * timeout * (retries + 1) + 2.0


def storage_options(url: str) -> dict:
    """fsspec options for ``url``: the S3 endpoint from the environment (nothing secret) and bounded
    I/O. Without bounds an endpoint that accepts connections and never answers stalls for minutes:
    botocore's retries (15 s read timeout each) run inside s3fs's own five. Here botocore makes one
    attempt per call and s3fs retries it ``retries`` times with its backoff."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    timeout, retries = io_limits()
    _bound_s3fs_retries(retries)
    options: dict = {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                                       "retries": {"max_attempts": 1, "mode": "standard"}}}
    endpoint = os.environ.get(ENDPOINT_ENV)
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def _bound_s3fs_retries(retries: int) -> None:
    # s3fs reads its retry count from a class attribute (not a constructor argument), for every
    # instance, including those fsspec.open() creates from the options above.
    import s3fs
    s3fs.S3FileSystem.retries = retries + 1


def open_url(url: str, mode: str = "rb"):
    """fsspec.open with this layer's options (endpoint, timeouts)."""
    return fsspec.open(url, mode, **storage_options(url))


def local_path(url: str) -> str:
    return os.path.abspath(os.path.expanduser(url[len("file://"):] if url.startswith("file://") else url))


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts) if is_remote(url) else os.path.join(local_path(url), *parts)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a URL."""
    if not is_remote(url):
        return fsspec.filesystem("file"), local_path(url)
    return fsspec.core.url_to_fs(url, **storage_options(url))


def redact(url: str) -> str:
    """The URL without any user:password part (s3://KEY:SECRET@bucket/x -> s3://bucket/x)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def ray_storage(url: str):
    """(storage_path, storage_filesystem) for ray.train.RunConfig."""
    if not is_remote(url):
        return local_path(url), None
    parsed = urlparse(url)
    if parsed.scheme != "s3":
        return url, None  # gs://, hdfs://...: Ray resolves these itself
    import pyarrow.fs
    endpoint = os.environ.get(ENDPOINT_ENV)
    options = {}
    if endpoint:
        ep = urlparse(endpoint)
        options = {"endpoint_override": ep.netloc, "scheme": ep.scheme or "https"}
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        options["region"] = region
    timeout, retries = io_limits()
    options.update(connect_timeout=timeout, request_timeout=timeout,
                   retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=retries + 1))
    return f"{parsed.netloc}{parsed.path}".rstrip("/"), pyarrow.fs.S3FileSystem(**options)


_GLOB = re.compile(r"[*?\[]")


def expand_urls(url: str, suffixes: tuple[str, ...]) -> list[str]:
    """A folder (files with these suffixes inside, recursively), a glob, a brace pattern
    (a/{000..009}.tar) or one file -> sorted full URLs. Hidden and temp files are ignored."""
    import braceexpand

    urls = []
    for one in braceexpand.braceexpand(url):
        fs, path = filesystem(one)
        if _GLOB.search(path):
            found = fs.glob(path)
        elif fs.isdir(path):
            found = [p for p in fs.find(path) if p.endswith(suffixes)]
        elif fs.exists(path):
            found = [path]
        else:
            raise FileNotFoundError(f"source {redact(one)} does not exist")
        found = [p for p in found if not os.path.basename(p).startswith(".")]
        urls += [p if protocol_of(fs) == "file" else fs.unstrip_protocol(p) for p in sorted(found)]
    return urls


@dataclass
class Entry:
    name: str        # file name inside the listed folder
    modified: float  # the storage's own timestamp (seconds since the epoch)


class Store:
    """A folder: relative names in (``*parts`` are joined with "/"), atomic writes out.

    Picklable (Ray ships it to data prep's writers). ``listing`` returns each file's modification
    time *as the storage records it* (local mtime, S3 LastModified): the lease lock compares only
    these with each other, so it never depends on the clocks of the machines that use it.
    """

    def __init__(self, url: str):
        self.remote = is_remote(url)
        self.url = url.rstrip("/") if self.remote else local_path(url)
        self.fs, root = filesystem(self.url)
        self.root = root.rstrip("/") or root
        self.is_object_store = self.remote and protocol_of(self.fs) in OBJECT_STORES

    def __reduce__(self):
        return Store, (self.url,)

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts)) if parts else self.root

    def url_of(self, *parts: str) -> str:
        return redact(join(self.url, *parts))

    def _io(self, method: str, *args, upload: str | None = None, **kwargs):
        """One storage call, bounded in total on an async filesystem (s3fs): botocore's timeouts bound
        each read, but a PUT that waits for "100 Continue" from a server that never answers is not
        bounded by them, and hung a prep's first write for minutes. An ``upload`` (a local file) gets a
        second more per MiB: a large shard on a slow link is slow, not dead."""
        call = getattr(self.fs, method)
        if not getattr(self.fs, "async_impl", False):
            return call(*args, **kwargs)
        limit = total_timeout() + (os.path.getsize(upload) / 2**20 if upload else 0.0)
        try:
            return call(*args, timeout=limit, **kwargs)
        except fsspec.exceptions.FSTimeoutError:
            raise StorageUnreachable(f"{self.url} did not answer a {method} within {limit:g} s: check "
                                     f"{ENDPOINT_ENV} ({os.environ.get(ENDPOINT_ENV, 'the default endpoint')}) "
                                     f"and the network ({TIMEOUT_ENV}, {RETRIES_ENV} set the limits)") from None

    def _fresh(self, path: str) -> None:
        # s3fs caches listings and object info per process; a lock, a registry or a resumed prep
        # must see what other processes wrote since.
        if self.remote:
            self.fs.invalidate_cache(path)

    # ------------------------------------------------------------- reading

    def exists(self, *parts: str) -> bool:
        path = self.path(*parts)
        self._fresh(path)
        return self._io("exists", path)

    def size(self, *parts: str) -> int | None:
        path = self.path(*parts)
        self._fresh(path)
        try:
            return int(self._io("size", path))
        except FileNotFoundError:
            return None

    def modified(self, *parts: str) -> float | None:
        path = self.path(*parts)
        self._fresh(path)
        try:
            return modified_time(self._io("info", path))
        except FileNotFoundError:
            return None

    def read_bytes(self, *parts: str) -> bytes | None:
        path = self.path(*parts)
        self._fresh(path)
        try:
            # One GET: s3fs's file objects check the ETag between reads and fail on an object
            # replaced meanwhile, which is exactly what leases and pointers are.
            return self._io("cat_file", path)
        except FileNotFoundError:
            return None

    def read_json(self, *parts: str) -> dict | None:
        data = self.read_bytes(*parts)
        return None if data is None else json.loads(data)

    def names(self, folder: str = "") -> list[str]:
        """Names (relative to the root, temp files included) of the files directly in ``folder``."""
        base = self.path(folder) if folder else self.root
        self._fresh(base)
        try:
            entries = self._io("ls", base, detail=False)
        except FileNotFoundError:
            return []
        prefix = f"{base}/"
        return sorted((f"{folder}/" if folder else "") + e[len(prefix):] for e in entries if e.startswith(prefix))

    def listing(self, *parts: str) -> list[Entry]:
        """Files directly in a folder with their storage timestamps, temp files left out; [] when absent."""
        path = self.path(*parts)
        self._fresh(path)
        try:
            infos = self._io("ls", path, detail=True)
        except FileNotFoundError:
            return []
        return [Entry(posixpath.basename(i["name"].rstrip("/")), modified_time(i)) for i in infos
                if i.get("type") == "file" and not posixpath.basename(i["name"]).startswith(TEMP_PREFIX)]

    # ------------------------------------------------------------- atomic writes

    def make_dirs(self) -> None:
        if not self.remote:
            os.makedirs(self.root, exist_ok=True)

    def write_bytes(self, data: bytes, *parts: str) -> str:
        """Atomically create or replace the file with ``data``; returns its URL."""
        path = self.path(*parts)
        if self.is_object_store:
            self._io("pipe_file", path, data)
            self._fresh(path)
            return self.url_of(*parts)
        tmp = self.local_temp_path(*parts)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
        except BaseException:
            os.remove(tmp) if os.path.exists(tmp) else None
            raise
        self.publish_local(tmp, *parts)
        return self.url_of(*parts)

    def write_json(self, doc: dict, *parts: str) -> str:
        return self.write_bytes(json.dumps(doc, indent=1, sort_keys=True).encode(), *parts)

    def local_temp_path(self, *parts: str) -> str:
        """Where to write a file before publishing it: beside its final name in a local folder (so
        publishing is a rename on one filesystem), else in the machine's temp folder."""
        name = "/".join(parts)
        if not self.remote:
            folder = os.path.dirname(self.path(name))
            os.makedirs(folder, exist_ok=True)
            return os.path.join(folder, posixpath.basename(_temp_name(name)))
        return os.path.join(tempfile.gettempdir(), f"emf-{uuid.uuid4().hex}-{posixpath.basename(name)}")

    def publish_local(self, local_file: str, *parts: str) -> None:
        """Move a finished local file to its final name; it appears whole or not at all."""
        path = self.path(*parts)
        if not self.remote:
            os.replace(local_file, path)
            return
        try:
            if self.is_object_store:
                self._io("put_file", local_file, path, upload=local_file)
            else:
                tmp = self.path(_temp_name("/".join(parts)))
                self._io("put_file", local_file, tmp, upload=local_file)
                self._io("mv", tmp, path)
        finally:
            os.remove(local_file)
            self._fresh(path)

    def delete(self, *parts: str) -> bool:
        """Remove one file; False if it was already gone (another process may have removed it)."""
        path = self.path(*parts)
        try:
            self._io("rm_file", path)
        except FileNotFoundError:
            return False
        finally:
            self._fresh(path)
        return True

    def remove_stale_temps(self, folder: str = "") -> int:
        """Delete temp files left by killed writers (only our own TEMP_PREFIX names)."""
        stale = [n for n in self.names(folder) if posixpath.basename(n).startswith(TEMP_PREFIX)]
        for name in stale:
            self.delete(name)
        return len(stale)


def _temp_name(name: str) -> str:
    head, base = posixpath.split(name)
    return posixpath.join(head, f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{base}")


def modified_time(info: dict) -> float:
    if "mtime" in info:                     # local files
        return float(info["mtime"])
    stamp = info.get("LastModified") or info.get("last_modified")  # s3fs
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    if isinstance(stamp, str):
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    raise ValueError(f"storage gave no modification time for {info.get('name')}")


@contextlib.contextmanager
def local_folder(url: str, only: tuple[str, ...] = ()) -> Iterator[str]:
    """A local copy of a (possibly remote) folder for code that reads local paths; ``only`` copies
    just those files (a model's description without its weights)."""
    if not is_remote(url):
        yield local_path(url)
        return
    fs, path = filesystem(url)
    with tempfile.TemporaryDirectory(prefix="emf-input-") as tmp:
        if only:
            for name in only:
                fs.get(f"{path.rstrip('/')}/{name}", os.path.join(tmp, name))
        else:
            fs.get(path.rstrip("/") + "/", tmp, recursive=True)
        yield tmp


@contextlib.contextmanager
def output_folder(url: str) -> Iterator[str]:
    """A local folder whose contents end up at ``url`` (uploaded after the block for remote URLs)."""
    if not is_remote(url):
        os.makedirs(local_path(url), exist_ok=True)
        yield local_path(url)
        return
    fs, path = filesystem(url)
    with tempfile.TemporaryDirectory(prefix="emf-output-") as tmp:
        yield tmp
        fs.put(tmp.rstrip("/") + "/", path.rstrip("/"), recursive=True)
