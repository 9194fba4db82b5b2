"""The built-in source: generated scenes."""
from __future__ import annotations

from typing import Any, Iterator

from data_prep.items import ItemRef, RawItem
from data_prep.sources.config import SourceConfig
from emf_dist.config import to_dict
from emf_dist.scenes.generator import make_scene, scene_key


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
