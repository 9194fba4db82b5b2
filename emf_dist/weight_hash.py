"""The identity of a model folder's weights: sha256 over its weight files.

Text encoders and VAEs are compared by it (manifest vs training config vs export): the same weights
copied to another machine, or named by hub id instead of folder, hash the same.
"""
from __future__ import annotations

import hashlib
import json
import os

_HASH_CACHE: dict[tuple, str] = {}


def weight_files(folder: str) -> list[str]:
    """Relative paths of the weight files a load reads: *.safetensors (else *.bin) at the top level
    and in sentence-transformers module folders (e.g. 2_Dense). Exported copies in onnx/, openvino/
    are skipped so that extra downloads do not change the hash."""
    subdirs = [""]
    modules_json = os.path.join(folder, "modules.json")
    if os.path.isfile(modules_json):
        with open(modules_json) as f:
            subdirs += [m["path"] for m in json.load(f) if m.get("path")]
    found = []
    for sub in subdirs:
        names = sorted(os.listdir(os.path.join(folder, sub))) if os.path.isdir(os.path.join(folder, sub)) else []
        chosen = [n for n in names if n.endswith(".safetensors")] or [n for n in names if n.endswith(".bin")]
        found += [os.path.join(sub, n) if sub else n for n in chosen]
    return sorted(found)


def weights_sha256(folder: str) -> str:
    """sha256 over the weight files (name + bytes, sorted by name), cached per folder in-process."""
    files = weight_files(folder)
    if not files:
        raise ValueError(f"no *.safetensors or *.bin weight files in {folder}")
    # size and mtime in the key: a folder overwritten in place is hashed again.
    key = (os.path.realpath(folder),) + tuple((f, os.stat(os.path.join(folder, f)).st_size,
                                               os.stat(os.path.join(folder, f)).st_mtime_ns) for f in files)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        for rel in files:
            h.update(rel.replace(os.sep, "/").encode() + b"\0")
            with open(os.path.join(folder, rel), "rb") as f:  # weights can be GBs: stream 1 MiB at a time
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def combined_sha256(parts: dict[str, str | None]) -> str:
    """One hash for a model made of several weight folders (a pipeline's text encoders), from each
    part's ``weights_sha256`` keyed by its name (None: a part the folder leaves out). A single part's
    hash is its own, so a one-encoder pipeline fingerprints as its encoder folder does."""
    if len(parts) == 1 and None not in parts.values():
        return next(iter(parts.values()))
    lines = "".join(f"{name}={sha or 'absent'}\n" for name, sha in sorted(parts.items()))
    return hashlib.sha256(lines.encode()).hexdigest()
