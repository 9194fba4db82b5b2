"""One shard's worth of work as it moves through the Ray Data pipeline, and the load step.

Each Ray Data row is one whole shard: ``{"shard": index, "payload": pickled ShardWork or
ShardBatch}``. Ray sees opaque bytes, so its block splitting, schema unification and tensor
extension types never touch our arrays, and every stage gets exactly one shard per call:
load (refs -> checked, decoded samples) -> encode (+ text embeddings, latents) -> write.
"""
from __future__ import annotations

import json
import pickle
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from data_prep.images import ImageConfig, decode, png_bytes
from data_prep.items import SKIP_REASONS, ItemRef, check_caption
from data_prep.sources import Source, SourceConfig, make_source

MAX_EXAMPLES = 3  # offenders remembered per skip reason, for the summary


def shard_name(index: int) -> str:
    return f"{index:06d}.tar"


@dataclass
class ShardWork:
    """What the driver sends: the source items of one shard."""
    index: int             # global shard number: the file is shard_name(index)
    version: int           # the manifest version this shard belongs to
    plan_id: str           # the plan it was cut from: records of another plan are never reused
    refs: list[ItemRef]
    vanished: list[str] = field(default_factory=list)  # planned keys the source no longer lists


@dataclass
class ShardBatch:
    """A shard's usable samples; the encoder fills in the text arrays (and latents)."""
    index: int
    version: int
    plan_id: str
    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    meta: list[bytes] = field(default_factory=list)          # one JSON document per sample
    images: list[bytes] | np.ndarray | None = None          # PNG bytes, or uint8 [N, R, R, 3]
    skipped: dict[str, int] = field(default_factory=dict)   # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few offenders
    tokens: np.ndarray | None = None    # [N, L, D]
    mask: np.ndarray | None = None      # [N, L] bool
    pooled: np.ndarray | None = None    # [N, D]
    latents: np.ndarray | None = None   # [N, C, h, w] float16 (image kind "latent")
    truncated: int = 0                  # captions longer than L tokens
    # strict mode: the first bad item, described. Travels to the driver as data, not as an
    # exception: Ray's wrappers would bury it in a remote traceback.
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # time spent per stage, for the summary

    def __len__(self) -> int:
        return len(self.keys)


def to_row(obj: ShardWork | ShardBatch) -> dict:
    """The Ray Data row holding ``obj``."""
    return {"shard": obj.index, "payload": pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)}


def pack(obj: ShardWork | ShardBatch) -> dict[str, np.ndarray]:
    """A one-row Ray Data batch holding ``obj``."""
    payload = np.empty(1, dtype=object)
    payload[0] = to_row(obj)["payload"]
    return {"shard": np.array([obj.index]), "payload": payload}


def unpack(batch: dict[str, np.ndarray]):
    if len(batch["payload"]) != 1:  # batch_size=1 everywhere: one shard per call
        raise RuntimeError(f"expected one shard per batch, got {len(batch['payload'])}")
    return pickle.loads(batch["payload"][0])


def bad_input_message(where: str, key: str, reason: str, detail: str = "") -> str:
    return (f"bad input {where} (key {key!r}): {reason}: {SKIP_REASONS[reason]}{detail}. Fix or remove it, "
            "or run without --strict to skip and count bad items")


def load_shard(work: ShardWork, source: Source, image: ImageConfig, max_caption_chars: int,
               strict: bool) -> ShardBatch:
    """Read, check, decode and resize a shard's items; count (or, strict, raise on) bad ones."""
    started = time.perf_counter()
    shard = ShardBatch(work.index, work.version, work.plan_id)
    skipped: Counter = Counter({"vanished": len(work.vanished)} if work.vanished else {})
    if work.vanished:
        shard.examples["vanished"] = work.vanished[:MAX_EXAMPLES]
    pixels = []
    for raw in source.read(work.refs):
        reason, caption, array = raw.problem, None, None
        if reason is None:
            caption, reason = check_caption(raw.caption, max_caption_chars)
        if reason is None:
            try:
                array = decode(raw.image, image.resolution)
            except ValueError as e:  # UnsupportedImage names its own reason
                reason = getattr(e, "reason", "unreadable_image")
        if reason is not None:
            if strict:
                shard.error = bad_input_message(raw.where, raw.key, reason)
                return ShardBatch(work.index, work.version, work.plan_id, error=shard.error)
            skipped[reason] += 1
            examples = shard.examples.setdefault(reason, [])
            if len(examples) < MAX_EXAMPLES:
                examples.append(raw.where)
            continue
        shard.keys.append(raw.key)
        shard.captions.append(caption)
        shard.meta.append(json.dumps(raw.meta, default=str, ensure_ascii=False).encode("utf-8"))
        pixels.append(png_bytes(array) if image.kind == "png" else array)
    shard.skipped = dict(skipped)
    if image.kind == "png":
        shard.images = pixels
    else:
        shard.images = np.stack(pixels) if pixels else np.zeros((0, image.resolution, image.resolution, 3), np.uint8)
    shard.seconds["load"] = time.perf_counter() - started
    return shard


class ShardLoader:
    """Ray Data actor: builds the source once (parsed configs, file-system clients), then loads
    one shard per call."""

    def __init__(self, source_cfg: SourceConfig, image_cfg: ImageConfig, max_caption_chars: int, strict: bool):
        self.source = make_source(source_cfg)
        self.image, self.max_caption_chars, self.strict = image_cfg, max_caption_chars, strict

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        work = unpack(batch)
        return pack(load_shard(work, self.source, self.image, self.max_caption_chars, self.strict))
