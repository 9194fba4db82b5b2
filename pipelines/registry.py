"""The model registry: which model is promoted, trained on which data, with which scores.

Layout under the registry URL (a local folder or s3://bucket/prefix)::

    versions/v000003-1f2e3d4c.json   one immutable object per evaluated model, never rewritten
    promoted.json                    the pointer: which version object is promoted now

Every model that retraining evaluates gets a version object, promoted or not, with the reason
for the decision, so the history of what was tried stays readable. Promotion is one atomic
write of the small pointer object (S3: a single PUT; local: write beside it, then rename), so a
reader sees the old promoted model or the new one, never a mix. Version objects carry a random
suffix, so two writers can never overwrite each other's version even if they picked the same
number; the pointer itself is last-writer-wins, which is why retraining promotes only while it
holds the lease lock (lock.py) and checks the lock just before.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from emf_dist.config import from_dict, to_dict
from emf_dist.storage import Store

POINTER = "promoted.json"
VERSIONS = "versions"
_VERSION_NAME = re.compile(r"^v(\d{6,})-[0-9a-f]{8}\.json$")


@dataclass
class ModelVersion:
    model: str                      # exported model folder (what `emf generate --model` takes)
    base: str                       # the flow-matching export it was fine-tuned from; retraining starts there
    dataset: str                    # dataset URL (holds manifest.json)
    manifest_version: int           # the dataset version it was trained on
    metrics: dict[str, float] = field(default_factory=dict)  # benchmark overall accuracy per sampler label
    metrics_url: str = ""           # the full metrics.json of its evaluation
    checkpoint: str = ""            # last training checkpoint
    promoted: bool = False          # whether it was promoted when it was registered
    reason: str = ""                # why it was (not) promoted
    run: str = ""                   # the retrain/pipeline run that made it
    created: str = ""
    number: int = 0                 # set by the registry: 1, 2, 3, ...
    id: str = ""                    # set by the registry: the version object's name


class Registry:
    def __init__(self, url: str):
        self.store = Store(url)
        self.url = self.store.url

    def versions(self) -> list[ModelVersion]:
        return [self._read(name) for _, name in self._names()]

    def get(self, version_id: str) -> ModelVersion:
        return self._read(version_id)

    def promoted(self) -> ModelVersion | None:
        pointer = self.store.read_json(POINTER)
        return None if pointer is None else self._read(pointer["id"])

    def register(self, version: ModelVersion, promote: bool) -> ModelVersion:
        """Write ``version`` as a new immutable object; then, if ``promote``, point at it."""
        number = 1 + max((n for n, _ in self._names()), default=0)
        version_id = f"v{number:06d}-{uuid.uuid4().hex[:8]}.json"
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        saved = from_dict(ModelVersion, {**to_dict(version), "number": number, "id": version_id,
                                         "promoted": promote, "created": version.created or stamp})
        self.store.write_json(to_dict(saved), VERSIONS, version_id)
        if promote:
            self.store.write_json({"id": version_id, "number": number, "updated": stamp}, POINTER)
        return saved

    def _names(self) -> list[tuple[int, str]]:
        """(number, object name) of every version, oldest first, from the listing alone."""
        return sorted((int(m.group(1)), e.name) for e in self.store.listing(VERSIONS)
                      if (m := _VERSION_NAME.match(e.name)))

    def _read(self, version_id: str) -> ModelVersion:
        doc = self.store.read_json(VERSIONS, version_id)
        if doc is None:
            raise FileNotFoundError(f"model registry {self.url}: version object {VERSIONS}/{version_id} is missing "
                                    "(version objects are never deleted by emf; was the registry edited by hand?)")
        return from_dict(ModelVersion, doc)
