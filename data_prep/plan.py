"""Deciding what a run does: which source items are new, and whether settings still match.

Pure functions over listings, plans and manifests (no Ray, no I/O), so every rule here is
checked in milliseconds and unit-tested directly.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable

from data_prep.config import PrepConfig
from data_prep.items import BadInputError, ItemRef, PrepError
from data_prep.shard import bad_input_message
from emf_dist.manifest import Manifest
from emf_dist.text_encoder import check_fingerprint

# Encoder settings that come straight from the config, compared before any model is loaded.
_CONFIG_FIELDS = ("backend", "max_length", "padding_side", "dtype", "normalize_pooled")


def select_new(refs: list[ItemRef], taken: set[str], where: Callable[[ItemRef], str],
               strict: bool = False) -> tuple[list[ItemRef], list[tuple[ItemRef, ItemRef]]]:
    """Items not yet in the dataset, in listing order, and (duplicate, first) pairs among them.

    A key planned by an earlier version is old data (skipped silently: that is what makes a
    rerun a no-op and an append add only the new items). A key seen twice in this listing is a
    duplicate: the first wins, later ones are counted as "duplicate_key" (or raise, strict)."""
    new: list[ItemRef] = []
    first: dict[str, ItemRef] = {}
    duplicates = []
    for ref in refs:
        if ref.key in taken:
            continue
        if ref.key in first:
            if strict:
                raise BadInputError(bad_input_message(where(ref), ref.key, "duplicate_key",
                                                      f" ({where(first[ref.key])})"))
            duplicates.append((ref, first[ref.key]))
            continue
        first[ref.key] = ref
        new.append(ref)
    return new, duplicates


def config_mismatches(manifest: Manifest, cfg: PrepConfig) -> list[str]:
    """Settings in the config that differ from an existing dataset's, without loading any model."""
    problems = []
    for name in _CONFIG_FIELDS:
        have, want = manifest.encoder.get(name), getattr(cfg.encoder, name)
        if have is not None and have != want:
            problems.append(f"encoder.{name} {have!r} != {want!r}")
    if cfg.encoder.backend == "transformers" and manifest.encoder.get("pooling") not in (None, cfg.encoder.pooling):
        problems.append(f"encoder.pooling {manifest.encoder['pooling']!r} != {cfg.encoder.pooling!r}")
    if manifest.image.kind != cfg.image.kind:
        problems.append(f"image.kind {manifest.image.kind!r} != {cfg.image.kind!r}")
    if manifest.image.resolution != cfg.image.resolution:
        problems.append(f"image.resolution {manifest.image.resolution} != {cfg.image.resolution}")
    return problems


def check_same_settings(recorded: dict, current: dict, *, what: str, where: str) -> None:
    """Raise PrepError when shards made with ``current`` settings cannot join ``recorded`` ones.

    ``recorded``/``current`` are describe_models() outputs (image as a dict)."""
    try:
        check_fingerprint(recorded["encoder"], current["encoder"], what_expected=what, what_actual="this config")
    except ValueError as e:
        raise PrepError(f"{e}. Shards of one dataset must share one encoder: use the same encoder settings, "
                        f"or prepare into a new destination (out=...). Dataset: {where}") from None
    problems = []
    if recorded["text_shapes"] != current["text_shapes"]:
        problems.append(f"text shapes {recorded['text_shapes']} != {current['text_shapes']}")
    for name in ("kind", "resolution", "shape", "scale_factor", "shift_factor", "vae_sha256"):
        have, want = recorded["image"].get(name), current["image"].get(name)
        if have != want:
            problems.append(f"image {name} {have!r} != {want!r}")
    if problems:
        raise PrepError(f"{what} and this config differ: " + "; ".join(problems) +
                        f". Use the same settings, or prepare into a new destination (out=...). Dataset: {where}")


def manifest_settings(manifest: Manifest) -> dict:
    """An existing manifest in describe_models() form, for check_same_settings."""
    return {"encoder": manifest.encoder, "text_shapes": manifest.text_shapes, "image": asdict(manifest.image)}
