"""Driver-side check that rerunning a run name resumes *the same* run.

Ray Train resumes a name from its latest checkpoint whatever the config says now; a changed
model width, mode, encoder or worker count then fails inside every worker, after the cluster
started, in a page of tracebacks. The latest checkpoint's train_config.json (worker.py writes
it beside every checkpoint) is compared here first, in a second.
"""
from __future__ import annotations

import json
import re

from emf_dist import storage
from emf_dist.config import to_dict
from emf_dist.train.config import TrainConfig

CHECKPOINT_DIR = re.compile(r"^step_\d{8}$")
CONFIG_FILE = "train_config.json"
# What a checkpoint cannot be loaded into when it changes (the rest may change between invocations).
MUST_MATCH = ("mode", "model", "encoder", "scaling.num_workers", "zero.stage")


def latest_checkpoint_config(cfg: TrainConfig) -> tuple[str, dict] | None:
    """(URL, saved config) of the run's latest checkpoint, None for a new run name."""
    run = storage.join(cfg.storage_path, cfg.name)
    fs, root = storage.filesystem(run)
    try:
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    except FileNotFoundError:
        return None
    for name in reversed([n for n in names if CHECKPOINT_DIR.match(n)]):
        path = f"{root.rstrip('/')}/{name}/{CONFIG_FILE}"
        if fs.exists(path):
            return storage.join(run, name), json.loads(fs.cat_file(path))
    return None


def _get(doc: dict, dotted: str):
    for part in dotted.split("."):
        doc = doc.get(part, {}) if isinstance(doc, dict) else None
    return doc


def _differences(saved: dict, now: dict, key: str) -> list[str]:
    old, new = _get(saved, key), _get(now, key)
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(saved, now, f"{key}.{k}")]
    return [] if old == new else [f"{key} {json.dumps(old)} -> {json.dumps(new)}"]


def check_resume(cfg: TrainConfig) -> None:
    found = latest_checkpoint_config(cfg)
    if found is None:
        return
    where, saved = found
    now = to_dict(cfg)
    changed = [d for key in MUST_MATCH for d in _differences(saved, now, key)]
    if changed:
        raise ValueError(f"run {cfg.name!r} already has a checkpoint ({where}) made with another config: "
                         f"{'; '.join(changed[:6])}. Rerunning a name resumes that run: set these back to "
                         "resume it, or start a new run with another name=...")
