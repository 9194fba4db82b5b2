"""Reading one file a table row points at (local path, http(s) URL, s3:// ...): bounded in time.

A URL whose server accepts the connection and never answers used to hold a loader, and so the
whole prep, at 0% for minutes. Every read here has a timeout (connect and each read), is
retried ``retries`` times with exponential backoff, and then gives up: the item is skipped as
"unreachable_image" and counted, the job goes on. A file that is simply missing or unreadable is
not retried ("unreadable_image").
"""
from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import fsspec

from emf_dist.storage import storage_options

BACKOFF_S = 0.5  # first wait; doubled after each failed attempt
_NETWORK_ERRORS = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                   "ClientConnectorError", "ServerTimeoutError", "FSTimeoutError"}


def read_url(url: str, timeout_s: float, retries: int) -> tuple[bytes | None, str | None]:
    """(data, None), or (None, skip reason) once the URL is missing or did not answer in time."""
    for attempt in range(retries + 1):
        try:
            return _read(url, timeout_s), None
        except Exception as e:  # noqa: BLE001 - a bad item is skipped, not the job
            if not _is_network(e):
                return None, "unreadable_image"
        if attempt < retries:
            time.sleep(BACKOFF_S * 2 ** attempt)
    return None, "unreachable_image"


def _read(url: str, timeout_s: float) -> bytes:
    if url.startswith(("http://", "https://")):
        return _http_get(url, timeout_s)
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url))  # s3: botocore's timeouts
    return fs.cat_file(path)


def _http_get(url: str, timeout_s: float) -> bytes:
    """One GET; the socket timeout bounds the connect and every read, the deadline the whole body
    (a server dripping a byte now and then would pass each read)."""
    deadline = time.monotonic() + 4 * timeout_s
    chunks = []
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        while block := response.read(1 << 16):
            chunks.append(block)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}: the body took longer than {4 * timeout_s:g} s")
    return b"".join(chunks)


def _is_network(err: BaseException) -> bool:
    seen = 0
    while err is not None and seen < 5:
        if isinstance(err, urllib.error.HTTPError):
            return err.code >= 500 or err.code == 429  # server trouble: worth another try
        if isinstance(err, (TimeoutError, socket.timeout, ConnectionError)) or type(err).__name__ in _NETWORK_ERRORS:
            return True
        if isinstance(err, urllib.error.URLError) and not isinstance(err.reason, str):
            err = err.reason  # the socket error inside
            continue
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False
