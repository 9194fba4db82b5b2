"""Sources: list items in a stable order (driver), read a shard's items (loader actors).

Each source kind has two halves. ``list_items()`` runs once in the driver and returns small
`ItemRef`s in an order that does not change between runs (sorted files, rows in file order,
scene indices), which is what makes shard assignment, resume and append deterministic.
``read(refs)`` runs in a loader actor and turns one shard's refs into `RawItem`s; anything
wrong with an item is recorded as ``RawItem.problem`` (a SKIP_REASONS key), never raised.

Kinds: generated scenes; a folder of images with sidecar captions (img2dataset's "files"
layout: ``name.jpg`` + ``name.txt`` and/or ``name.json``); parquet/JSONL tables; WebDataset tars.
"""
from __future__ import annotations

import io
import json
import math
import posixpath
import re
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Protocol

import fsspec
import numpy as np

from data_prep.items import ItemRef, PrepError, RawItem, sanitize_key
from emf_dist.config import to_dict
from emf_dist.scenes.generator import SPLITS, SceneConfig, make_scene, scene_key
from emf_dist.storage import expand_urls, redact

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TABLE_SUFFIXES = (".parquet", ".jsonl", ".ndjson")
# WebDataset's own rule: the key is everything up to the first dot of the file name.
_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


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
        if not self.image_extensions or not self.caption_extensions:
            problems.append("image_extensions and caption_extensions must not be empty")
        return problems


class Source(Protocol):
    def list_items(self) -> list[ItemRef]: ...
    def where(self, ref: ItemRef) -> str: ...  # the item's location, for messages
    def read(self, refs: list[ItemRef]) -> Iterator[RawItem]: ...
    def describe(self) -> dict[str, Any]: ...


def make_source(cfg: SourceConfig) -> Source:
    kinds = {"scenes": ScenesSource, "folder": FolderSource, "table": TableSource, "webdataset": WebDatasetSource}
    return kinds[cfg.kind](cfg)


# ---------------------------------------------------------------- scenes

class ScenesSource:
    """The built-in generator: scene i of a split is a pure function of (config, split, i)."""

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg

    def list_items(self) -> list[ItemRef]:
        first = self.cfg.start
        return [ItemRef(scene_key(self.cfg.split, i), i) for i in range(first, first + self.cfg.count)]

    def where(self, ref: ItemRef) -> str:
        return f"scene {self.cfg.split} #{ref.locator}"

    def read(self, refs: list[ItemRef]) -> Iterator[RawItem]:
        for ref in refs:
            scene = make_scene(self.cfg.scenes, ref.locator, self.cfg.split)
            yield RawItem(ref.key, self.where(ref), scene.image, scene.caption, scene.metadata())

    def describe(self) -> dict[str, Any]:
        return {"kind": "scenes", "split": self.cfg.split, "start": self.cfg.start, "count": self.cfg.count,
                "scenes": to_dict(self.cfg.scenes)}


# ---------------------------------------------------------------- folder

class FolderSource:
    """``a/b.jpg`` + ``a/b.txt`` (or ``a/b.json`` with a caption field) -> key ``a_b``."""

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.fs, root = fsspec.core.url_to_fs(cfg.url)
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
            meta = _json_dict(blobs.get(json_path)) if json_path else {}
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


def _json_dict(data: Any) -> dict:
    if not isinstance(data, (bytes, bytearray)):
        return {}
    try:
        parsed = json.loads(data)
    except ValueError:  # unparseable sidecar metadata: the item may still have a .txt caption
        return {}
    return parsed if isinstance(parsed, dict) else {}


# ---------------------------------------------------------------- tables

class TableSource:
    """Parquet or JSONL rows: an image column (path/URL, bytes, or {"bytes", "path"}) and a caption."""

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg

    def list_items(self) -> list[ItemRef]:
        try:
            files = expand_urls(self.cfg.url, TABLE_SUFFIXES)
        except FileNotFoundError as e:
            raise PrepError(str(e)) from None
        if not files:
            raise PrepError(f"no {'/'.join(TABLE_SUFFIXES)} files under {redact(self.cfg.url)}")
        base = _common_folder(files)
        refs = []
        for path in files:
            stem = posixpath.splitext(path[len(base):].lstrip("/"))[0]
            keys = self._keys(path)
            refs += [ItemRef(sanitize_key(str(k)) if k is not None else sanitize_key(f"{stem}-{row:09d}"), (path, row))
                     for row, k in enumerate(keys)]
        return refs

    def _keys(self, path: str) -> list:
        """One entry per row: the key column's value, or None for "file + row number"."""
        column = self.cfg.key_column
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq
            with fsspec.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                self._check_columns(path, pf.schema_arrow.names)
                if column is None:
                    return [None] * pf.metadata.num_rows
                return pf.read(columns=[column]).column(column).to_pylist()
        rows = _jsonl_lines(path)
        if rows:
            first = _parse_row(rows[0])
            if first is not None:
                self._check_columns(path, list(first))
        return [(_parse_row(line) or {}).get(column) if column else None for line in rows]

    def _check_columns(self, path: str, names: list[str]) -> None:
        wanted = [c for c in (self.cfg.image_column, self.cfg.caption_column, self.cfg.key_column) if c]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise PrepError(f"table {redact(path)} has no column {missing[0]!r} (it has {names}); "
                            "set source.image_column / caption_column / key_column")

    def read(self, refs: list[ItemRef]) -> Iterator[RawItem]:
        for path, group in _group_by(refs, lambda ref: ref.locator[0]):
            rows = [ref.locator[1] for ref in group]
            for ref, row in zip(group, self._rows(path, rows)):
                yield self._item(ref, path, row)

    def _rows(self, path: str, rows: list[int]) -> list[dict | None]:
        if path.endswith(".parquet"):
            return _parquet_rows(path, rows)
        lines = _jsonl_lines(path)
        return [_parse_row(lines[r]) for r in rows]

    def where(self, ref: ItemRef) -> str:
        return f"{redact(ref.locator[0])} row {ref.locator[1]}"

    def _item(self, ref: ItemRef, path: str, row: dict | None) -> RawItem:
        where = self.where(ref)
        if row is None:
            return RawItem(ref.key, where, problem="unreadable_row")
        item = RawItem(ref.key, where, caption=row.get(self.cfg.caption_column))
        item.meta = {k: v for k, v in row.items() if k not in (self.cfg.image_column,) and _is_scalar(v)}
        item.meta.update(key=ref.key, source=where)
        value = row.get(self.cfg.image_column)
        if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if value is None or value == "":
            item.problem = "missing_image"
        elif isinstance(value, (bytes, bytearray)):
            item.image = bytes(value)
        elif isinstance(value, str):
            item.image = _read_url(_resolve(value, path))
            if item.image is None:
                item.problem = "unreadable_image"
        else:
            item.problem = "unreadable_image"
        return item

    def describe(self) -> dict[str, Any]:
        return {"kind": "table", "url": redact(self.cfg.url), "image_column": self.cfg.image_column,
                "caption_column": self.cfg.caption_column, "key_column": self.cfg.key_column}


def _jsonl_lines(path: str) -> list[str]:
    with fsspec.open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")  # a bad byte spoils one row, not the file
    return [line for line in text.splitlines() if line.strip()]


def _parse_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _parquet_rows(path: str, rows: list[int]) -> list[dict]:
    """The given rows of a parquet file, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        starts = np.cumsum([0] + sizes)
        group_of = {r: int(np.searchsorted(starts, r, side="right")) - 1 for r in rows}
        groups = sorted(set(group_of.values()))
        table = pf.read_row_groups(groups)
    offset, before = {}, 0  # where each read group starts inside `table`
    for g in groups:
        offset[g], before = before, before + sizes[g]
    return table.take([offset[group_of[r]] + r - int(starts[group_of[r]]) for r in rows]).to_pylist()


def _is_scalar(value: Any) -> bool:
    return value is None or (isinstance(value, (str, int, float, bool)) and not
                             (isinstance(value, float) and not math.isfinite(value)))


def _resolve(value: str, table_path: str) -> str:
    """Image paths in a table are relative to the table's folder unless absolute or a URL."""
    if "://" in value or value.startswith("/"):
        return value
    return posixpath.join(posixpath.dirname(table_path), value)


def _read_url(url: str) -> bytes | None:
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except (OSError, ValueError):  # missing file, permission, bad URL: the item is skipped, not the job
        return None


def _common_folder(urls: list[str]) -> str:
    return posixpath.commonpath([posixpath.dirname(u) for u in urls]) if len(urls) > 1 else posixpath.dirname(urls[0])


def _group_by(items: Iterable, key) -> Iterator[tuple[Any, list]]:
    """Consecutive runs with the same key (refs arrive in listing order, so runs are whole files)."""
    run, current = [], object()
    for item in items:
        k = key(item)
        if run and k != current:
            yield current, run
            run = []
        current = k
        run.append(item)
    if run:
        yield current, run


# ---------------------------------------------------------------- webdataset tars

class WebDatasetSource:
    """Existing WebDataset tars (for example our own shards, re-encoded with another encoder)."""

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg

    def list_items(self) -> list[ItemRef]:
        try:
            tars = expand_urls(self.cfg.url, (".tar",))
        except FileNotFoundError as e:
            raise PrepError(str(e)) from None
        if not tars:
            raise PrepError(f"no .tar files under {redact(self.cfg.url)}")
        refs = []
        for url in tars:
            refs += [ItemRef(sanitize_key(key), (url, key)) for key in _tar_keys(url)]
        return refs

    def read(self, refs: list[ItemRef]) -> Iterator[RawItem]:
        for url, group in _group_by(refs, lambda ref: ref.locator[0]):
            members = _tar_members(url, {ref.locator[1] for ref in group})
            for ref in group:
                yield self._item(ref, url, members.get(ref.locator[1], {}))

    def where(self, ref: ItemRef) -> str:
        return f"{redact(ref.locator[0])}:{ref.locator[1]}"

    def _item(self, ref: ItemRef, url: str, files: dict[str, bytes]) -> RawItem:
        where = self.where(ref)
        caption = next((files[e] for e in self.cfg.caption_extensions if e in files), None)
        item = RawItem(ref.key, where, caption=caption)
        item.meta = dict(_json_dict(files.get("json")), key=ref.key, source=where)
        ext = next((e for e in self.cfg.image_extensions if e in files), None)
        if ext is None:
            item.problem = "missing_image"
        elif ext.endswith("npy"):
            try:
                item.image = np.load(io.BytesIO(files[ext]), allow_pickle=False)
            except ValueError:
                item.problem = "unreadable_image"
        else:
            item.image = files[ext]
        return item

    def describe(self) -> dict[str, Any]:
        return {"kind": "webdataset", "url": redact(self.cfg.url),
                "image_extensions": list(self.cfg.image_extensions),
                "caption_extensions": list(self.cfg.caption_extensions)}


def _tar_keys(url: str) -> list[str]:
    """Sample keys of a tar in file order, from the headers only (seeking over the data)."""
    keys: dict[str, None] = {}
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                match = _WDS_KEY.match(member.name)
                if member.isfile() and match:
                    keys.setdefault(match.group(1))
    except (tarfile.TarError, OSError) as e:
        raise PrepError(f"cannot read tar {redact(url)}: {e}") from None
    return list(keys)


def _tar_members(url: str, wanted: set[str]) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} for the wanted keys, in one streaming pass over the tar."""
    found: dict[str, dict[str, bytes]] = defaultdict(dict)
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            match = _WDS_KEY.match(member.name)
            if member.isfile() and match and match.group(1) in wanted:
                found[match.group(1)][match.group(2)] = tar.extractfile(member).read()
    return found
