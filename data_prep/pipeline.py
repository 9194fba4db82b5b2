"""The Ray side of a prep job: connecting, describing the models, and the streaming pipeline.

    from_items(one row per shard)
      -> map_batches(ShardLoader)   actor pool, `ray.loaders`:  read, check, decode, resize
      -> map_batches(ShardEncoder)  actor pool, `ray.encoders`: text embeddings (+ latents);
                                    each actor loads its models once, GPUs if configured
      -> map_batches(write_shard_batch) tasks, `ray.writers`:   tar -> atomic publish -> record

Loaders are actors rather than tasks on purpose: Ray Data fuses a task stage into the
actor stage after it when their resources match, which would run loading inside the encoder
actor, one shard after the other. Two actor pools are never fused, whatever the settings.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
from dataclasses import asdict
from typing import Iterator

from data_prep.config import PrepConfig, RayConfig
from data_prep.encode import ShardEncoder, describe_models
from data_prep.items import BadInputError, PrepError
from data_prep.shard import ShardLoader, ShardWork, to_row
from data_prep.writer import write_shard_batch
from emf_dist.config import to_dict
from emf_dist.ray_env import init_driver
from emf_dist.storage import Store

log = logging.getLogger(__name__)


def connect(cfg: RayConfig) -> bool:
    """Join the configured cluster, or start a private local instance; True if we started Ray
    (and so must shut it down). An already initialised Ray (tests, notebooks) is reused."""
    import ray

    if ray.is_initialized():
        return False
    common = dict(include_dashboard=False, log_to_driver=cfg.worker_logs, logging_level=logging.ERROR)
    if cfg.address:
        init_driver(cfg.address, **common)
    else:
        # "local" always starts a new instance: never attach to a `ray start` head on this machine.
        ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(), **common)
    return True


def check_resources(cfg: RayConfig) -> None:
    """Actor pools that cannot be placed make Ray Data wait forever: say so instead. On a cluster
    (which may still be scaling up) it is a warning, on a local instance an error."""
    import ray

    have = ray.cluster_resources()
    short = [f"{need:g} {kind} (the cluster has {have.get(kind, 0):g})"
             for kind, need in cfg.needs().items() if need > have.get(kind, 0)]
    if not short:
        return
    message = ("the prep stages need " + " and ".join(short) + ": lower ray.encoders / encoder_cpus / "
               "encoder_gpus / loaders / loader_cpus / writer_cpus")
    if cfg.address is None:
        raise PrepError(message)
    log.warning("%s; waiting for the cluster to provide them", message)


def _quiet_ray_data() -> None:
    """Our own progress bar and summary replace Ray Data's per-operator bars and plan logs."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


_DESCRIBED: dict[str, dict] = {}  # per process: a notebook or pipeline running several jobs loads once


def describe(cfg: PrepConfig) -> dict:
    """describe_models() in a Ray task with an encoder actor's resources (its GPU, if any), so the
    driver never loads a model; the image spec comes back as a plain dict. Remembered per
    process for the same settings and unchanged weight files."""
    import ray

    key = _models_key(cfg)
    if key not in _DESCRIBED:
        task = ray.remote(describe_models).options(num_cpus=cfg.ray.encoder_cpus, num_gpus=cfg.ray.encoder_gpus)
        try:
            info = ray.get(task.remote(cfg))
        except Exception as e:
            raise PrepError(f"could not load the models: {root_cause(e)}") from None
        _DESCRIBED[key] = dict(info, image=asdict(info["image"]))
    return copy.deepcopy(_DESCRIBED[key])


def _models_key(cfg: PrepConfig) -> str:
    from emf_dist.text_encoder import resolve_encoder_path

    folders = [resolve_encoder_path(cfg.encoder.name)] + ([os.path.expanduser(cfg.image.vae)] if cfg.image.vae else [])
    return json.dumps({"encoder": to_dict(cfg.encoder), "image": to_dict(cfg.image), "gpus": cfg.ray.encoder_gpus,
                       "files": [_folder_stats(f) for f in folders]}, sort_keys=True)


def _folder_stats(folder: str) -> list:
    """(path, size, mtime) of every file under a model folder: any change to the weights shows."""
    if not os.path.isdir(folder):
        return [folder]  # a hub id resolved from the local cache
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.stat(os.path.join(root, name))
            found.append([os.path.relpath(os.path.join(root, name), folder), st.st_size, st.st_mtime_ns])
    return sorted(found)


def run_shards(cfg: PrepConfig, store: Store, work: list[ShardWork], run_id: str) -> Iterator[dict]:
    """Run the pipeline over ``work`` and yield each shard's record as its writer finishes
    (in completion order). Raises BadInputError (strict) or PrepError, never a Ray traceback."""
    import ray.data

    _quiet_ray_data()
    ds = ray.data.from_items([to_row(w) for w in work], override_num_blocks=len(work))
    ds = ds.map_batches(
        ShardLoader, batch_size=1, batch_format="numpy",
        fn_constructor_kwargs=dict(source_cfg=cfg.source, image_cfg=cfg.image,
                                   max_caption_chars=cfg.max_caption_chars, strict=cfg.strict),
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.loaders), num_cpus=cfg.ray.loader_cpus)
    ds = ds.map_batches(
        ShardEncoder, batch_size=1, batch_format="numpy",
        fn_constructor_kwargs=dict(encoder=cfg.encoder, batch_size=cfg.encode_batch_size, image=cfg.image,
                                   threads=cfg.ray.threads(), gpus=cfg.ray.encoder_gpus),
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.encoders),
        num_cpus=cfg.ray.encoder_cpus, num_gpus=cfg.ray.encoder_gpus or None)
    ds = ds.map_batches(
        write_shard_batch, batch_size=1, batch_format="numpy",
        fn_kwargs=dict(store=store, image_kind=cfg.image.kind, run_id=run_id, crash_after=cfg.crash_after_shards),
        compute=ray.data.TaskPoolStrategy(size=cfg.ray.writers), num_cpus=cfg.ray.writer_cpus)
    try:
        for row in ds.iter_rows():
            record = json.loads(row["record"])
            if "error" in record:
                raise BadInputError(record["error"])
            yield record
    except PrepError:
        raise
    except Exception as e:
        raise PrepError(f"the pipeline stopped: {root_cause(e)}") from e


# "SomeError: message" lines of a remote traceback (Ray ships the original error as text).
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Crash|Interrupt)): (.*)$")


def root_cause(exc: BaseException) -> str:
    """'Type: message' of the original error inside Ray's wrappers: the first error line of the
    remote traceback that is not Ray's own, else the exception's first line."""
    for line in str(exc).splitlines():
        match = _ERROR_LINE.match(line.strip())
        if match and not match.group(1).startswith("ray."):
            return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
