"""Listing a WebDataset tar without trusting it: damaged regions are found and reported.

Python's tarfile stops at the first garbled header after the start of a file *without an
error*, so a tar with one bad member header read as its first half, with 0 skips. Here the
headers are walked with ``ignore_zeros`` (which resynchronises at the next valid header) and
every stretch of non-zero bytes between the end of one member and the next header, or after the
last member, is a damaged region. A truncated tar ends in one, or lacks the zero blocks that
end every tar.

Who lost what: the samples next to a region that lack a member the tar's other samples have
are marked damaged (skipped as "corrupt_tar_member" with the region named). When neither
neighbour lacks anything, a whole sample was lost: the region becomes an item of its own, so it
is still counted as a skip rather than vanishing.
"""
from __future__ import annotations

import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field

from emf_dist.storage import open_url, redact

BLOCK = tarfile.BLOCKSIZE
# WebDataset's own rule: the key is everything up to the first dot of the file name.
WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass
class Region:
    start: int
    end: int
    before: str | None  # the key of the member just before the region
    after: str | None   # ... and just after it
    cut: bool = False   # the member before it runs past the end of the file: its sample is damaged

    def note(self, url: str) -> str:
        if self.end == self.start:
            return f"{redact(url)}: cut short at {self.start} bytes (no end-of-archive marker)"
        return f"{redact(url)}: {self.end - self.start} bytes unreadable at offset {self.start}"


@dataclass
class TarIndex:
    extensions: dict[str, set[str]] = field(default_factory=dict)  # key -> member extensions, in file order
    regions: list[Region] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return list(self.extensions)

    def damaged(self, url: str) -> tuple[dict[str, str], list[Region]]:
        """({key: note} for samples that lost a member, regions that lost whole samples)."""
        common = Counter(frozenset(e) for e in self.extensions.values()).most_common(1)
        expected = set(common[0][0]) if common else set()
        keys, whole = {}, []
        for region in self.regions:
            hit = [k for k in (region.before, region.after) if k is not None and self.extensions[k] < expected]
            if region.cut:
                hit.append(region.before)
            for key in hit:
                keys.setdefault(key, region.note(url))
            if not hit:
                whole.append(region)
        return keys, whole


def scan_tar(url: str) -> TarIndex:
    """Keys and damaged regions from the headers (seeking over the data; gaps are read to tell
    zero padding from damage). Raises tarfile.ReadError for a file that is not a tar at all."""
    index = TarIndex()
    with open_url(url) as f:
        size = f.seek(0, 2)
        f.seek(0)
        end, start, last = 0, 0, None  # the previous member: where its padded data ends, its header, its key
        try:
            with tarfile.open(fileobj=f, mode="r:", ignore_zeros=True) as tar:
                for member in tar:
                    match = WDS_KEY.match(member.name)
                    key = match.group(1) if member.isfile() and match else last
                    _gap(f, index, end, member.offset, last, key)
                    if member.isfile() and match:
                        index.extensions.setdefault(key, set()).add(match.group(2))
                    end, start, last = member.offset_data + -(-member.size // BLOCK) * BLOCK, member.offset, key
        except tarfile.ReadError:  # cut short in a member's data: handled below, like any cut
            if not index.extensions:
                raise
        if end > size:
            index.regions.append(Region(start, size, last, None, cut=True))
        elif end == size and index.extensions:  # a whole tar ends in zero blocks: this one was cut at a member
            index.regions.append(Region(size, size, last, None))
        else:
            _gap(f, index, end, size, last, None)
    return index


def _gap(f, index: TarIndex, start: int, stop: int, before: str | None, after: str | None) -> None:
    """Record [start, stop) as damaged unless it is only zero blocks (end-of-archive, padding)."""
    if stop <= start:
        return
    pos = f.tell()
    f.seek(start)
    remaining, nonzero = stop - start, False
    while remaining > 0 and not nonzero:
        chunk = f.read(min(remaining, 1 << 20))
        if not chunk:
            break
        nonzero = chunk.count(0) != len(chunk)
        remaining -= len(chunk)
    f.seek(pos)
    if nonzero:
        index.regions.append(Region(start, stop, before, after))
