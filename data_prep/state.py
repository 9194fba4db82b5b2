"""What a dataset folder says about past and unfinished prep runs; manifests written last.

Besides the shards and manifests (the contract in emf_dist/manifest.py), a dataset keeps:

    _prep/plan-vNNNNNN.json.gz   the plan of version N, written before its first shard: the
                                 source item keys in order (shard k of the version holds keys
                                 [k*n, (k+1)*n)), duplicates found while planning, and the
                                 settings (encoder fingerprint, shapes) its shards are made with
    _prep/shards/NNNNNN.json     one record per finished shard (samples, bytes, sha256, skips)

A plan without a manifest of its version is an interrupted run: a rerun finishes it with the
same plan, redoing only shards without a valid record. Finished plans are the memory of which
source items were already taken, so an append adds only new ones.
"""
from __future__ import annotations

import gzip
import json
import math
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from data_prep.items import PrepError
from data_prep.shard import shard_name
from data_prep.writer import RECORDS, record_name
from emf_dist.manifest import MANIFEST_NAME, ImageSpec, Manifest, ShardEntry
from emf_dist.storage import Store

PLANS = "_prep"
MANIFESTS = "manifests"


def plan_name(version: int) -> str:
    return f"{PLANS}/plan-v{version:06d}.json.gz"


def versioned_manifest_name(version: int) -> str:
    return f"{MANIFESTS}/v{version:06d}.json"


@dataclass
class VersionPlan:
    version: int
    first_shard: int          # global index of the version's first shard
    samples_per_shard: int    # source items per shard (skipped ones included)
    keys: list[str]           # the version's source items, in the source's stable order
    settings: dict[str, Any]  # describe_models() output (image as a dict): a resume must match it
    source: dict[str, Any]
    planned_skips: dict[str, int] = field(default_factory=dict)  # duplicate keys found while planning
    created: str = ""
    plan_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # shard records name the plan they belong to

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.keys) / self.samples_per_shard)

    def shard_keys(self, j: int) -> list[str]:
        """Keys of the version's j-th shard (global index first_shard + j)."""
        return self.keys[j * self.samples_per_shard:(j + 1) * self.samples_per_shard]

    def to_bytes(self) -> bytes:
        return gzip.compress(json.dumps(asdict(self)).encode(), mtime=0)

    @classmethod
    def from_bytes(cls, data: bytes) -> "VersionPlan":
        return cls(**json.loads(gzip.decompress(data)))


class DatasetState:
    def __init__(self, store: Store):
        self.store = store

    def manifest(self) -> Manifest | None:
        data = self.store.read_bytes(MANIFEST_NAME)
        if data is None:
            return None
        try:
            return Manifest.from_json(data.decode(), where=self.store.url_of(MANIFEST_NAME))
        except ValueError as e:
            raise PrepError(f"{self.store.url_of(MANIFEST_NAME)} is not readable ({e}); "
                            "choose another destination (out=...)") from None

    def plan(self, version: int) -> VersionPlan | None:
        data = self.store.read_bytes(plan_name(version))
        return VersionPlan.from_bytes(data) if data is not None else None

    def save_plan(self, plan: VersionPlan) -> None:
        self.store.make_dirs()
        self.store.write_bytes(plan.to_bytes(), plan_name(plan.version))

    def discard_plan(self, plan: VersionPlan) -> None:
        """Forget a plan that cannot finish (strict mode met bad input): the rerun plans afresh,
        and the shard records that name this plan are never reused."""
        self.store.fs.rm_file(self.store.path(plan_name(plan.version)))

    def taken_keys(self, manifest: Manifest | None) -> set[str]:
        """Keys of every source item already planned by a finished version (skipped ones too)."""
        if manifest is None:
            return set()
        taken: set[str] = set()
        for version in range(1, manifest.version + 1):
            plan = self.plan(version)
            if plan is None:
                raise PrepError(f"{self.store.url_of(plan_name(version))} is missing, so it is unknown which "
                                "source items the dataset already holds: copy the _prep folder along with "
                                "the shards, or prepare into a new destination")
            taken.update(plan.keys)
        return taken

    def finished_records(self, plan: VersionPlan) -> dict[int, dict]:
        """Records of the plan's shards that are complete: record present and, for a non-empty
        shard, the tar present with the recorded size."""
        indices = set(range(plan.first_shard, plan.first_shard + plan.num_shards))
        listed = set(self.store.names(RECORDS))
        tars = {name: self.store.size(name) for name in map(shard_name, indices)}
        done = {}
        for index in sorted(indices):
            if record_name(index) not in listed:
                continue
            record = json.loads(self.store.read_bytes(record_name(index)))
            if record.get("plan") != plan.plan_id:
                continue
            if record["samples"] == 0 or tars[record["name"]] == record["bytes"]:
                done[index] = record
        return done

    def write_manifest(self, manifest: Manifest) -> str:
        """The versioned copy first, then manifest.json: the latest manifest always has its copy."""
        text = manifest.to_json().encode()
        self.store.write_bytes(text, versioned_manifest_name(manifest.version))
        self.store.write_bytes(text, MANIFEST_NAME)
        return self.store.url_of(MANIFEST_NAME)


def build_manifest(previous: Manifest | None, plan: VersionPlan, records: list[dict], created: str) -> Manifest:
    """The next manifest: every earlier shard untouched, this version's non-empty shards added."""
    settings = plan.settings
    new = [ShardEntry(r["name"], r["samples"], r["bytes"], r["sha256"], plan.version)
           for r in sorted(records, key=lambda r: r["index"]) if r["samples"] > 0]
    skipped = dict(previous.skipped) if previous else {}
    for counts in [plan.planned_skips] + [r["skipped"] for r in records]:
        for reason, n in counts.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return Manifest(
        version=plan.version, shards=(previous.shards if previous else []) + new,
        encoder=settings["encoder"], image=ImageSpec(**settings["image"]),
        text_shapes=settings["text_shapes"], dtypes=settings["dtypes"], source=plan.source,
        skipped=dict(sorted(skipped.items())),
        truncated=(previous.truncated if previous else 0) + sum(r["truncated"] for r in records),
        created=created)
