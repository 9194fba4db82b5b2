"""Sources: list items in a stable order (driver), read a shard's items (loader actors).

Each source kind has two halves. ``list_items()`` runs once in the driver and returns small
`ItemRef`s in an order that does not change between runs (sorted files, rows in file order,
scene indices), which is what makes shard assignment, resume and append deterministic.
``read(refs)`` runs in a loader actor and turns one shard's refs into `RawItem`s; anything
wrong with an item is recorded as ``RawItem.problem`` (a SKIP_REASONS key), never raised.

Kinds: generated scenes; a folder of images with sidecar captions (img2dataset's "files"
layout: ``name.jpg`` + ``name.txt`` and/or ``name.json``); parquet/JSONL tables; WebDataset tars.

One module per kind (scenes.py, folder.py, table.py, webdataset.py); their config is config.py.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol

from data_prep.items import ItemRef, RawItem
from data_prep.sources.config import IMAGE_SUFFIXES, TABLE_SUFFIXES, SourceConfig
from data_prep.sources.folder import FolderSource
from data_prep.sources.scenes import ScenesSource
from data_prep.sources.table import TableSource
from data_prep.sources.webdataset import WebDatasetSource

__all__ = ["IMAGE_SUFFIXES", "TABLE_SUFFIXES", "FolderSource", "ScenesSource", "Source", "SourceConfig",
           "TableSource", "WebDatasetSource", "make_source"]


class Source(Protocol):
    def list_items(self) -> list[ItemRef]: ...
    def where(self, ref: ItemRef) -> str: ...  # the item's location, for messages
    def read(self, refs: list[ItemRef]) -> Iterator[RawItem]: ...
    def describe(self) -> dict[str, Any]: ...


def make_source(cfg: SourceConfig) -> Source:
    kinds = {"scenes": ScenesSource, "folder": FolderSource, "table": TableSource, "webdataset": WebDatasetSource}
    return kinds[cfg.kind](cfg)
