"""What flows through a prep job: item references, raw items, and the checks that skip bad ones.

A source first *lists* its items as small `ItemRef`s (a key plus where to find it) in a stable
order; the plan cuts that list into shards. A loader later *reads* a shard's refs into
`RawItem`s and `check_caption` / `images.prepare_image` decide which of them are usable.
Every skipped item has one reason from `SKIP_REASONS`; with ``strict`` the first one becomes a
`BadInputError` that names the item instead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

SKIP_REASONS = {
    "unreadable_image": "the image could not be read or decoded (corrupt, truncated, not an image)",
    "unsupported_image_mode": "the image's pixels are 32-bit integers or floats, with no agreed 8-bit range",
    "unreachable_image": "the image's URL did not answer within source.io_timeout_s, after source.io_retries retries",
    "corrupt_tar_member": "the source tar is damaged around this sample (a garbled or truncated member)",
    "missing_image": "there is no image for this item",
    "missing_caption": "there is no caption for this item",
    "empty_caption": "the caption is empty or only whitespace",
    "caption_not_utf8": "the caption is not valid UTF-8",
    "caption_too_long": "the caption is longer than max_caption_chars",
    "unreadable_row": "the table row could not be parsed",
    "duplicate_key": "another item earlier in the source has the same key",
    "vanished": "the item was listed when its version was planned, but the source no longer has it",
}
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class PrepError(RuntimeError):
    """The job could not finish; the message says what happened and what to do."""


class BadInputError(PrepError):
    """--strict: the first bad input item, named."""


class ItemRef(NamedTuple):
    key: str       # the sample's key in the shards: unique, free of dots
    locator: Any   # source-specific and small (a scene index, file paths, (file, row), (tar, key))


@dataclass
class RawItem:
    key: str
    where: str                                  # for messages: "photos/001.jpg", "t.parquet row 7"
    image: bytes | np.ndarray | None = None     # encoded file bytes, or decoded uint8 [H, W, 3]
    caption: str | bytes | None = None          # bytes are checked for UTF-8
    meta: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None                  # a SKIP_REASONS key found while reading


def sanitize_key(raw: str) -> str:
    """A WebDataset-safe key: the first dot would split key from extension (docs/findings.md §8), and
    slashes would become tar folders; both, and anything else odd, become '_'."""
    return _KEY_UNSAFE.sub("_", raw) or "_"


def check_caption(raw: str | bytes | None, max_chars: int) -> tuple[str | None, str | None]:
    """(caption, None) when usable, else (None, reason)."""
    if raw is None:
        return None, "missing_caption"
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return None, "caption_not_utf8"
    if not isinstance(raw, str):
        return None, "missing_caption"
    caption = raw.strip()
    if not caption:
        return None, "empty_caption"
    if len(caption) > max_chars:
        return None, "caption_too_long"
    return caption, None
