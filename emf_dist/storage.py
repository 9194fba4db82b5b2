"""Where runs and datasets live: a local path or an S3-compatible bucket, named by URL.

Credentials never pass through our configs: s3fs/botocore and pyarrow read
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or an instance role) from the environment.
A non-AWS endpoint (MinIO, Ceph, a test server) is named by AWS_ENDPOINT_URL, the
variable the AWS SDKs themselves use; it is not a secret but is still kept out of configs
so that the same config runs against any store.
"""
from __future__ import annotations

import os
import posixpath
from urllib.parse import urlparse

import fsspec

ENDPOINT_ENV = "AWS_ENDPOINT_URL"


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def storage_options(url: str) -> dict:
    """fsspec options for ``url``: the S3 endpoint from the environment, nothing secret."""
    endpoint = os.environ.get(ENDPOINT_ENV)
    if url.startswith("s3://") and endpoint:
        return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def local_path(url: str) -> str:
    return os.path.abspath(os.path.expanduser(url[len("file://"):] if url.startswith("file://") else url))


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts) if is_remote(url) else os.path.join(local_path(url), *parts)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a URL."""
    if not is_remote(url):
        return fsspec.filesystem("file"), local_path(url)
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    return fs, path


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
    return f"{parsed.netloc}{parsed.path}".rstrip("/"), pyarrow.fs.S3FileSystem(**options)
