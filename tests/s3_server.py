"""A real S3 API server on 127.0.0.1 for the tests (moto's server mode, as s3fs's own tests use).

The endpoint and credentials go into the environment, where s3fs, botocore, pyarrow and Ray
workers started afterwards find them, exactly as in production. fsspec caches filesystems
per process, so every server gets a fresh one: a cached client would still point at the port
of a server an earlier test module stopped.
"""
from __future__ import annotations

import contextlib
import logging
import os

import fsspec


@contextlib.contextmanager
def s3_server(bucket: str, secret: str):
    """Start a server, create ``bucket``, yield an s3fs filesystem for it; restore the environment after."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.AbstractFileSystem.clear_instance_cache()
    fs = fsspec.filesystem("s3", skip_instance_cache=True, client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
    fs.mkdir(bucket)
    try:
        yield fs
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        fsspec.AbstractFileSystem.clear_instance_cache()
        server.stop()
