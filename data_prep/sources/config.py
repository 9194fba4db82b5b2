"""What `emf prep` reads: the source's config (the kinds and their options)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from emf_dist.scenes.generator import SPLITS, SceneConfig

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TABLE_SUFFIXES = (".parquet", ".jsonl", ".ndjson")


@dataclass
class SourceConfig:
    # "scenes": the built-in generator; "folder": images with sidecar name.txt / name.json (the
    # img2dataset "files" layout); "table": parquet or JSONL rows; "webdataset": existing tars.
    kind: Literal["scenes", "folder", "table", "webdataset"] = "scenes"
    # Where the data is (any fsspec URL). folder: the root folder; table: a file, a folder of
    # tables or a glob; webdataset: a folder of tars, a glob or a brace pattern (a/{000..009}.tar).
    url: str = ""
    # scenes: generate indices [start, start + count) of this split. Raising count later appends.
    scenes: SceneConfig = field(default_factory=SceneConfig)
    count: int = 10_000
    start: int = 0
    split: str = "train"
    # table: the columns holding the image (a path/URL relative to the table's folder, raw bytes,
    # or a {"bytes", "path"} struct) and the caption; key_column names a unique id column
    # (default: the table file's path and the row number).
    image_column: str = "image"
    caption_column: str = "caption"
    key_column: str | None = None
    # folder: the field of name.json holding the caption when there is no name.txt.
    caption_field: str = "caption"
    # webdataset: member extensions tried in order for the image and the caption.
    image_extensions: tuple[str, ...] = ("png", "jpg", "jpeg", "webp", "rgb.npy")
    caption_extensions: tuple[str, ...] = ("txt", "caption")
    # table: an image URL that does not answer within io_timeout_s (connect, and each read) is
    # retried io_retries times with backoff, then skipped as "unreachable_image". (Datasets on an
    # object store are bounded by EMF_STORAGE_TIMEOUT_S / EMF_STORAGE_RETRIES, emf_dist/storage.py.)
    io_timeout_s: float = 20.0
    io_retries: int = 2

    def validate(self) -> list[str]:
        problems = []
        if self.kind == "scenes":
            if self.count < 0 or self.start < 0:
                problems.append("count and start must be >= 0")
            if self.split not in SPLITS:
                problems.append(f"split must be one of {sorted(SPLITS)}, got {self.split!r}")
            if self.split == "holdout" and not self.scenes.holdout:
                problems.append("split 'holdout' needs scenes.holdout pairs")
        elif not self.url.strip():
            problems.append(f"url is required for a {self.kind!r} source (a folder, file, glob or s3:// URL)")
        if not self.io_timeout_s > 0 or self.io_retries < 0:
            problems.append(f"io_timeout_s must be > 0 and io_retries >= 0, got {self.io_timeout_s}, {self.io_retries}")
        if not self.image_extensions or not self.caption_extensions:
            problems.append("image_extensions and caption_extensions must not be empty")
        return problems
