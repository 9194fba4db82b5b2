"""A folder of images with sidecar captions (img2dataset's "files" layout)."""
from __future__ import annotations

import posixpath
from collections import defaultdict
from typing import Any, Iterator

import fsspec

from data_prep.items import ItemRef, PrepError, RawItem, sanitize_key
from data_prep.sources.common import json_dict
from data_prep.sources.config import IMAGE_SUFFIXES, SourceConfig
from emf_dist.storage import redact, storage_options


class FolderSource:
    """``a/b.jpg`` + ``a/b.txt`` (or ``a/b.json`` with a caption field) -> key ``a_b``."""

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.fs, root = fsspec.core.url_to_fs(cfg.url, **storage_options(cfg.url))
        self.root = root.rstrip("/")

    def list_items(self) -> list[ItemRef]:
        if not self.fs.isdir(self.root):
            raise PrepError(f"source folder {redact(self.cfg.url)} does not exist")
        groups: dict[str, dict[str, str]] = defaultdict(dict)  # stem -> {extension: relative path}
        for path in self.fs.find(self.root):
            rel = path[len(self.root) + 1:]
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            stem, ext = posixpath.splitext(rel)
            groups[stem][ext[1:].lower()] = rel
        refs = []
        for stem in sorted(groups):
            files = groups[stem]
            images = [files[e] for e in IMAGE_SUFFIXES if e in files]
            if not images and "txt" not in files:
                continue  # e.g. img2dataset's 00000_stats.json: metadata alone is not an item
            # Two images with one stem share a key: the plan reports the second as a duplicate.
            for image in images or [None]:
                refs.append(ItemRef(sanitize_key(stem), (image, files.get("txt"), files.get("json"))))
        return refs

    def where(self, ref: ItemRef) -> str:
        return ref.locator[0] or ref.locator[1]

    def read(self, refs: list[ItemRef]) -> Iterator[RawItem]:
        wanted = [p for ref in refs for p in ref.locator if p]
        # One batched call per shard: s3fs and friends fetch the files concurrently.
        blobs = self.fs.cat([f"{self.root}/{p}" for p in wanted], on_error="return") if wanted else {}
        blobs = {path[len(self.root) + 1:]: data for path, data in blobs.items()}
        for ref in refs:
            image_path, txt_path, json_path = ref.locator
            item = RawItem(ref.key, self.where(ref))
            meta = json_dict(blobs.get(json_path)) if json_path else {}
            item.meta = dict(meta, key=ref.key, source=item.where)
            item.caption = blobs.get(txt_path) if txt_path else meta.get(self.cfg.caption_field)
            if isinstance(item.caption, Exception):
                item.caption = None
            image = blobs.get(image_path) if image_path else None
            if image_path is None:
                item.problem = "missing_image"
            elif isinstance(image, Exception):
                item.problem = "unreadable_image"
            else:
                item.image = image
            yield item

    def describe(self) -> dict[str, Any]:
        return {"kind": "folder", "url": redact(self.cfg.url), "caption_field": self.cfg.caption_field}
