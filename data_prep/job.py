"""`emf prep`: one run, start to finish.

1. Validate the config and read the destination (latest manifest, any interrupted plan) and
   compare cheap settings - all before Ray starts, so mistakes surface in a second.
2. List the source in its stable order; keep the items no earlier version took.
3. Nothing new and nothing interrupted: a no-op (Ray never starts).
4. Otherwise start or join Ray, load the models once to learn the fingerprint and shapes,
   check them against the dataset, write the version's plan, run the pipeline over the shards
   that have no valid record yet, and write the manifest last. An interrupted version is
   finished first; new items then become the next version.
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Callable

from data_prep.config import PrepConfig
from data_prep.dataset_lock import dataset_lock
from data_prep.items import BadInputError, ItemRef, PrepError
from data_prep.plan import check_same_settings, config_mismatches, manifest_settings, select_new
from data_prep.shard import ShardWork, bad_input_message
from data_prep.sources import Source, make_source
from data_prep.state import DatasetState, VersionPlan, build_manifest
from data_prep.writer import RECORDS
from emf_dist.config import validate_config
from emf_dist.lease import Lease
from emf_dist.manifest import Manifest
from emf_dist.storage import Store


@dataclass
class PrepSummary:
    dataset: str                       # destination URL (without credentials)
    manifest: str | None = None        # URL of manifest.json, once there is one
    version: int = 0                   # latest manifest version after the run
    versions_written: list[int] = field(default_factory=list)
    shards_written: int = 0
    shards_reused: int = 0             # finished by an earlier, interrupted run
    samples_written: int = 0
    total_samples: int = 0             # in the dataset after the run
    skipped: dict[str, int] = field(default_factory=dict)   # versions finished by this run
    examples: dict[str, list[str]] = field(default_factory=dict)
    truncated: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # load/encode/write, summed over new shards
    seconds: float = 0.0               # the whole run
    pipeline_seconds: float = 0.0      # Ray pipelines only (actor start + model load included)

    @property
    def samples_per_s(self) -> float:
        return self.samples_written / self.pipeline_seconds if self.pipeline_seconds else 0.0

    def text(self) -> str:
        if not self.versions_written:
            return (f"prep: nothing new: {self.dataset} is up to date (version {self.version}, "
                    f"{self.total_samples} samples); manifest: {self.manifest}")
        lines = [f"prep: {self.samples_written} samples in {self.shards_written} new shards "
                 f"({self.shards_reused} kept from an interrupted run) in {self.seconds:.1f} s: "
                 f"{self.samples_per_s:.1f} samples/s in the pipeline",
                 f"  version {self.version}: {self.total_samples} samples in total"]
        skipped = sum(self.skipped.values())
        by_reason = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items()))
        lines.append(f"  skipped {skipped}" + (f": {by_reason}" if skipped else ""))
        for reason, where in sorted(self.examples.items()):
            lines.append(f"    {reason}: e.g. {'; '.join(where)}")
        lines.append(f"  captions truncated to the encoder's max_length: {self.truncated}")
        if self.stage_seconds:
            busy = ", ".join(f"{stage} {s:.1f}" for stage, s in self.stage_seconds.items())
            lines.append(f"  stage seconds summed over shards (the largest is the one to scale): {busy}")
        lines.append(f"  manifest: {self.manifest}")
        return "\n".join(lines)


def run_prep(cfg: PrepConfig, echo: Callable[[str], None] = print) -> PrepSummary:
    validate_config(cfg)  # configs built in code get the same checks as `emf prep` arguments
    cfg = _absolute_paths(cfg)
    started = time.perf_counter()
    store = Store(cfg.out)
    state = DatasetState(store)
    summary = PrepSummary(dataset=store.url_of("").rstrip("/"))
    with dataset_lock(cfg.out, cfg.lock_wait_s, cfg.lock_ttl_s) as lease:  # before reading what to do
        _check_config(state.manifest(), cfg, store)
        source = make_source(cfg.source)
        refs = source.list_items()
        models = _Models(cfg)
        try:
            while (plan := _next_plan(cfg, state, source, refs, models, summary)) is not None:
                _run_version(cfg, store, state, plan, refs, summary, echo, lease)
        finally:
            models.close()
    manifest = state.manifest()
    if manifest is not None:
        summary.version, summary.total_samples = manifest.version, manifest.total_samples
        summary.manifest = store.url_of("manifest.json")
    summary.seconds = time.perf_counter() - started
    echo(summary.text())
    return summary


def _absolute_paths(cfg: PrepConfig) -> PrepConfig:
    """Local paths made absolute: Ray workers may run in another folder than this process."""
    def absolute(path: str) -> str:
        return path if "://" in path else os.path.abspath(os.path.expanduser(path))

    source = replace(cfg.source, url=absolute(cfg.source.url)) if cfg.source.url else cfg.source
    image = replace(cfg.image, vae=absolute(cfg.image.vae)) if cfg.image.vae else cfg.image
    encoder = cfg.encoder
    if os.path.isdir(os.path.expanduser(encoder.name)):
        encoder = replace(encoder, name=absolute(encoder.name))
    return replace(cfg, source=source, image=image, encoder=encoder)


class _Models:
    """Ray and the models' description, started on first need: a no-op run never starts Ray."""

    def __init__(self, cfg: PrepConfig):
        self.cfg, self.ray_started, self.info = cfg, False, None

    def describe(self) -> dict:
        if self.info is None:
            from data_prep.pipeline import check_resources, connect, describe
            self.ray_started = connect(self.cfg.ray)
            check_resources(self.cfg.ray)
            self.info = describe(self.cfg)
        return self.info

    def close(self) -> None:
        if self.ray_started:
            import ray
            ray.shutdown()


def _next_plan(cfg: PrepConfig, state: DatasetState, source: Source, refs: list[ItemRef], models: _Models,
               summary: PrepSummary) -> VersionPlan | None:
    """The interrupted version's plan to finish, else a plan for the items no version has taken
    yet, else None (up to date). Either way its settings must match the dataset's."""
    manifest = state.manifest()
    plan = state.plan(manifest.version + 1 if manifest else 1)
    if plan is None:
        new, duplicates = select_new(refs, state.taken_keys(manifest), source.where, cfg.strict)
        if not new:
            return None
        summary.examples["duplicate_key"] = [source.where(ref) for ref, _ in duplicates[:3]]
    current, where = models.describe(), state.store.url_of("")
    if manifest is not None:
        check_same_settings(manifest_settings(manifest), current, where=where,
                            what=f"version {manifest.version} of the dataset")
    if plan is not None:
        check_same_settings(plan.settings, current, where=where, what=f"the interrupted run of version {plan.version}")
        return plan
    plan = _new_plan(cfg, state, manifest, new, duplicates, current, source)
    state.save_plan(plan)
    return plan


def _check_config(manifest: Manifest | None, cfg: PrepConfig, store: Store) -> None:
    problems = config_mismatches(manifest, cfg) if manifest else []
    if problems:
        raise PrepError(f"the dataset at {store.url_of('')} (version {manifest.version}) was made with other "
                        f"settings: {'; '.join(problems)}. Shards of one dataset share one encoder and image "
                        "format: use its settings, or prepare into a new destination (out=...)")


def _new_plan(cfg: PrepConfig, state: DatasetState, manifest: Manifest | None, new: list[ItemRef],
              duplicates: list, models: dict, source: Source) -> VersionPlan:
    version = manifest.version + 1 if manifest else 1
    previous = state.plan(manifest.version) if manifest else None
    first_shard = previous.first_shard + previous.num_shards if previous else 0
    return VersionPlan(version=version, first_shard=first_shard, samples_per_shard=cfg.samples_per_shard,
                       keys=[ref.key for ref in new], settings=models, source=source.describe(),
                       planned_skips={"duplicate_key": len(duplicates)} if duplicates else {},
                       created=_now())


def _shard_work(plan: VersionPlan, done: dict, refs: list[ItemRef], strict: bool) -> list[ShardWork]:
    """The plan's unfinished shards. Items the source lost since the plan was made (an interrupted
    run, then files deleted) are counted as "vanished": the other shards' work is kept."""
    by_key: dict[str, ItemRef] = {}
    for ref in refs:
        by_key.setdefault(ref.key, ref)  # duplicates were left out of the plan: the first one counts
    work = []
    for j in range(plan.num_shards):
        index = plan.first_shard + j
        if index in done:
            continue
        keys = plan.shard_keys(j)
        vanished = [k for k in keys if k not in by_key]
        if vanished and strict:
            raise BadInputError(bad_input_message(f"planned item {vanished[0]}", vanished[0], "vanished"))
        work.append(ShardWork(index, plan.version, plan.plan_id, [by_key[k] for k in keys if k in by_key], vanished))
    return work


def _run_version(cfg: PrepConfig, store: Store, state: DatasetState, plan: VersionPlan, refs: list[ItemRef],
                 summary: PrepSummary, echo, lease: Lease) -> None:
    """Run the plan's unfinished shards, then write the version's manifest."""
    from data_prep.pipeline import run_shards

    done = state.finished_records(plan)
    work = _shard_work(plan, done, refs, cfg.strict)
    store.remove_stale_temps()  # one job per destination at a time (the lock): these are a dead run's
    store.remove_stale_temps(RECORDS)
    items = sum(len(w.refs) for w in work)
    resuming = f", resuming: {len(done)} of them already done" if done else ""
    echo(f"prep: version {plan.version}: {len(plan.keys)} items in {plan.num_shards} shards of "
         f"{plan.samples_per_shard} -> {store.url_of('')}{resuming}")
    records = list(done.values())
    t0 = time.perf_counter()
    bar = _progress_bar(items, cfg.progress)
    try:
        for record in run_shards(cfg, store, work, run_id=uuid.uuid4().hex):
            records.append(record)
            summary.shards_written += record["samples"] > 0
            summary.samples_written += record["samples"]
            for stage, seconds in record.get("seconds", {}).items():
                summary.stage_seconds[stage] = summary.stage_seconds.get(stage, 0.0) + seconds
            bar.update(record["samples"] + sum(record["skipped"].values()))
    except BadInputError:
        state.discard_plan(plan)  # this plan cannot finish: after the fix, the rerun plans afresh
        raise
    finally:
        bar.close()
        summary.pipeline_seconds += time.perf_counter() - t0
    summary.shards_reused += sum(r["samples"] > 0 for r in done.values())
    _add_counts(summary, plan, records)
    lease.check()  # stalled past the lock's ttl and taken over: the other prep owns the manifest now
    state.write_manifest(build_manifest(state.manifest(), plan, records, _now()))
    summary.versions_written.append(plan.version)


def _add_counts(summary: PrepSummary, plan: VersionPlan, records: list[dict]) -> None:
    summary.truncated += sum(r["truncated"] for r in records)
    for counts in [plan.planned_skips] + [r["skipped"] for r in records]:
        for reason, n in counts.items():
            summary.skipped[reason] = summary.skipped.get(reason, 0) + n
    for record in records:
        for reason, where in record.get("examples", {}).items():
            shown = summary.examples.setdefault(reason, [])
            shown += where[:max(0, 3 - len(shown))]
    summary.examples = {reason: where for reason, where in summary.examples.items() if where}


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="item", desc="prep", disable=not enabled, file=sys.stderr,
                mininterval=0.5, smoothing=0.1)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
