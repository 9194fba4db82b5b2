"""Parquet and JSONL tables: an image column (path/URL, bytes, or a struct) and a caption column."""
from __future__ import annotations

import json
import math
import posixpath
from typing import Any, Iterator

import numpy as np

from data_prep.items import ItemRef, PrepError, RawItem, sanitize_key
from data_prep.sources.common import group_by
from data_prep.sources.config import TABLE_SUFFIXES, SourceConfig
from data_prep.sources.fetch import read_url
from emf_dist.storage import expand_urls, open_url, redact


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
            with open_url(path) as f:
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
        for path, group in group_by(refs, lambda ref: ref.locator[0]):
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
            item.image, item.problem = read_url(_resolve(value, path), self.cfg.io_timeout_s, self.cfg.io_retries)
        else:
            item.problem = "unreadable_image"
        return item

    def describe(self) -> dict[str, Any]:
        return {"kind": "table", "url": redact(self.cfg.url), "image_column": self.cfg.image_column,
                "caption_column": self.cfg.caption_column, "key_column": self.cfg.key_column}


def _jsonl_lines(path: str) -> list[str]:
    with open_url(path) as f:
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

    with open_url(path) as f:
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


def _common_folder(urls: list[str]) -> str:
    return posixpath.commonpath([posixpath.dirname(u) for u in urls]) if len(urls) > 1 else posixpath.dirname(urls[0])
