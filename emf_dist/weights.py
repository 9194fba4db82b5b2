"""A weights file's record (size, sha256, tensor shapes) and its verification.

An export records its weights when it is written; a reader checks the file against the record
before trusting it. A flipped byte keeps the length and a valid safetensors header, and its
weights load fine: only the checksum tells, and without it the model samples NaNs into black
PNGs. A truncated file or one resized by a wrong copy fails on the size or on the header.
"""
from __future__ import annotations

import hashlib
import os

from emf_dist.errors import InputError

WEIGHTS_KEY = "weights"


def file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def weights_record(path: str, tensors: dict) -> dict:
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": file_sha256(path),
            "shapes": {name: list(t.shape) for name, t in sorted(tensors.items())}}


def header_shapes(path: str) -> dict[str, list[int]]:
    """Tensor shapes from the safetensors header alone (no tensor is read)."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError (not importable by name) or OSError
        raise InputError(f"{path} is truncated or not a safetensors file ({type(err).__name__}: {err}); "
                         "copy the export folder again, or export the model again") from None


def verify_weights(path: str, record: dict | None, expected: dict[str, list[int]] | None, described_by: str) -> None:
    """Raise InputError naming ``path`` unless it matches ``record`` (when there is one) and its tensors
    have the ``expected`` shapes (those of the model ``described_by`` describes; None: not known ahead)."""
    damaged = (f"{path} is damaged: it does not match the record in {described_by} "
               "(copy the export folder again, or export the model again)")
    if record is not None:
        size = os.path.getsize(path)
        if size != record["bytes"]:
            raise InputError(f"{damaged}: {size} bytes, recorded {record['bytes']}")
    shapes = header_shapes(path)
    for wanted, what in ((record["shapes"] if record else shapes, "the shapes recorded"), (expected or shapes, "the model")):
        diff = sorted(n for n in set(shapes) | set(wanted) if shapes.get(n) != wanted.get(n))
        if diff:
            raise InputError(f"{path} does not fit {what} in {described_by}: tensors "
                             + ", ".join(f"{n} {shapes.get(n)} (expected {wanted.get(n)})" for n in diff[:4]))
    if record is not None and file_sha256(path) != record["sha256"]:
        raise InputError(f"{damaged}: its sha256 differs (same length: bytes were changed, not cut)")
