"""Existing WebDataset tars as a source."""
from __future__ import annotations

import io
import posixpath
import tarfile
from collections import defaultdict
from typing import Any, Iterator

import numpy as np

from data_prep.items import ItemRef, PrepError, RawItem, sanitize_key
from data_prep.sources.common import group_by, json_dict
from data_prep.sources.config import SourceConfig
from data_prep.sources.tar_scan import WDS_KEY, scan_tar
from emf_dist.storage import expand_urls, open_url, redact


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
            refs += _tar_refs(url)
        return refs

    def read(self, refs: list[ItemRef]) -> Iterator[RawItem]:
        for url, group in group_by(refs, lambda ref: ref.locator[0]):
            members = _tar_members(url, {ref.locator[1] for ref in group if ref.locator[2] is None})
            for ref in group:
                if ref.locator[2] is not None:  # damaged while listing: counted, never half-read
                    yield RawItem(ref.key, ref.locator[2], problem="corrupt_tar_member")
                else:
                    yield self._item(ref, url, members.get(ref.locator[1], {}))

    def where(self, ref: ItemRef) -> str:
        url, key, lost = ref.locator
        return f"{redact(url)}:{key}" if key is not None else lost

    def _item(self, ref: ItemRef, url: str, files: dict[str, bytes]) -> RawItem:
        where = self.where(ref)
        caption = next((files[e] for e in self.cfg.caption_extensions if e in files), None)
        item = RawItem(ref.key, where, caption=caption)
        item.meta = dict(json_dict(files.get("json")), key=ref.key, source=where)
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


def _tar_refs(url: str) -> list[ItemRef]:
    """One ref per sample key in file order, (url, key, None); a damaged sample's third field is what
    was lost, and a region that lost whole samples becomes a ref of its own (always skipped)."""
    try:
        index = scan_tar(url)
    except (tarfile.TarError, OSError) as e:
        raise PrepError(f"cannot read tar {redact(url)}: {e}") from None
    damaged, whole = index.damaged(url)
    refs = [ItemRef(sanitize_key(key), (url, key, damaged.get(key))) for key in index.keys]
    stem = posixpath.splitext(posixpath.basename(url))[0]
    refs += [ItemRef(sanitize_key(f"{stem}-damaged-at-{r.start}"), (url, None, r.note(url))) for r in whole]
    return refs


def _tar_members(url: str, wanted: set[str]) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} for the wanted keys, in one streaming pass over the tar (past damaged
    regions, as the listing did; the samples they touch are not wanted)."""
    found: dict[str, dict[str, bytes]] = defaultdict(dict)
    if not wanted:
        return found
    with open_url(url) as f, tarfile.open(fileobj=f, mode="r|", ignore_zeros=True) as tar:
        for member in tar:
            match = WDS_KEY.match(member.name)
            if member.isfile() and match and match.group(1) in wanted:
                found[match.group(1)][match.group(2)] = tar.extractfile(member).read()
    return found
