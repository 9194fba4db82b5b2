"""`emf train`: check everything on the driver, then run Ray Train's TorchTrainer.

Before any worker starts: the config is typed and validated (emf_dist.config), the dataset's
manifest is read, its shard files are compared with it and its shapes are checked against the
model, the encoder named in the config is fingerprinted and compared with the one that encoded
the shards, an init_from export's weights are verified (size, checksum, shapes), and a rerun
of an existing run name must keep the config its checkpoints were made with (resume_check.py). Then Ray Train
runs emf_dist.train.worker on every rank; at the end the EMA weights of the last checkpoint
are exported (safetensors + emf_model.json) to ``<storage>/<name>/export``.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace

from emf_dist import storage
from emf_dist.backbones.adapter import BackboneConfig
from emf_dist.config import to_dict
from emf_dist.manifest import Manifest, check_compatible, check_shard_files, read_manifest
from emf_dist.ray_env import init_driver
from emf_dist.text_encoder import TextEncoder, check_fingerprint
from emf_dist.train.config import TrainConfig
from emf_dist.train.resume_check import check_resume


@dataclass
class TrainResult:
    checkpoint: str        # storage URL of the last checkpoint
    export: str            # storage URL of the exported EMA model
    metrics: dict          # the last report's, skipped_samples included

    @property
    def skipped_samples(self) -> int:
        """Samples the loaders could not read, over the whole run (all ranks)."""
        return int(self.metrics.get("skipped_samples", 0))

    def summary(self) -> str:
        skipped = self.skipped_samples
        warn = ": some shards are damaged; check them, or prepare the data again" if skipped else ""
        return (f"trained {self.metrics.get('step')} steps; skipped {skipped} unreadable samples{warn}; "
                f"last checkpoint {self.checkpoint}; exported model {self.export}")


def resolve_model(cfg: TrainConfig) -> TrainConfig:
    """A run from an export takes its architecture: the fine-tune converts a flow-matching parent to
    ``model.time_embedding`` (EMF's dual one, or the decoupled one), distillation keeps a MeanFlow
    model's as it is (our DiT's or a fine-tuned backbone's). A run from a diffusers folder, local or on
    object storage, takes its transformer's (emf_dist/train/pretrained.py)."""
    from emf_dist.train.pretrained import is_pretrained_folder, resolve_backbone, resolve_backbone_export
    if is_pretrained_folder(cfg.init_from):
        return resolve_backbone(cfg)
    if cfg.mode == "flow_matching" and cfg.init_from:
        raise ValueError(f"mode flow_matching continues pretraining from a diffusers pipeline or transformer folder; "
                         f"init_from {cfg.init_from} is none (a folder, local or s3://..., with model_index.json, or "
                         "config.json naming a diffusers class)")
    if not cfg.starts_from_export:
        return cfg
    from emf_dist.export import verify_export
    with storage.local_folder(cfg.init_from) as folder:  # the weights too: the workers must not find them damaged
        info = verify_export(folder)
    parent = info.model
    if cfg.mode == "meanflow_finetune" and parent.time_embedding != "single":
        raise ValueError(f"init_from {cfg.init_from} is already a MeanFlow model ({parent.time_embedding} time "
                         "embedding); fine-tune from a flow-matching export, or distil it with mode meanflow_distill")
    if isinstance(parent, BackboneConfig) and cfg.mode == "meanflow_finetune":
        raise ValueError(f"init_from {cfg.init_from} is an export of a pretrained {parent.class_name} trained by flow "
                         "matching: EMF's fine-tune starts from the diffusers folder itself (init_from=the pipeline)")
    if cfg.mode == "meanflow_distill" and parent.time_embedding == "single":
        raise ValueError(f"init_from {cfg.init_from} is a flow-matching model (single time embedding); "
                         "meanflow_distill needs a MeanFlow export: fine-tune it first (mode meanflow_finetune)")
    if isinstance(parent, BackboneConfig):
        return resolve_backbone_export(cfg, info)
    if cfg.mode == "meanflow_distill":
        return replace(cfg, model=replace(parent, checkpointing=cfg.model.checkpointing))
    # The fine-tune's time embedding is the conversion: EMF's dual one, or the decoupled one.
    model = replace(parent, time_embedding=cfg.model.time_embedding, decoder_depth=cfg.model.decoder_depth,
                    checkpointing=cfg.model.checkpointing)
    if problems := model.validate():
        raise ValueError(f"the fine-tune of {cfg.init_from} (depth {parent.depth}): " + "; ".join(problems))
    return replace(cfg, model=model)


def check_data(cfg: TrainConfig) -> tuple[Manifest, TextEncoder]:
    """Manifest shapes vs the model, shard encoder vs the configured encoder: clear errors, both sides named."""
    manifest = read_manifest(cfg.data.url, storage.storage_options(cfg.data.url))
    check_shard_files(manifest, cfg.data.url, storage.storage_options(cfg.data.url))
    # A backbone with pooled text (SD3) takes vectors of its own size; SANA takes none.
    pooled_dim = (cfg.model.pooled_dim or None) if isinstance(cfg.model, BackboneConfig) else None
    check_compatible(manifest, text_dim=cfg.model.text_dim, text_length=cfg.data.text_length,
                     in_channels=cfg.model.in_channels, input_size=cfg.model.input_size, where=cfg.data.url,
                     pooled_dim=pooled_dim)
    if isinstance(cfg.model, BackboneConfig):
        from emf_dist.train.pretrained import check_parent_parts
        check_parent_parts(cfg, manifest)
    encoder = TextEncoder(cfg.encoder)
    check_fingerprint(manifest.encoder, encoder.fingerprint(), what_expected=f"the shards ({cfg.data.url})",
                      what_actual="the training config's encoder")
    return manifest, encoder


def encode_sample_prompts(cfg: TrainConfig, encoder: TextEncoder) -> dict | None:
    if not cfg.logging.sample_every:
        return None
    encoded = encoder.encode(list(cfg.logging.sample_prompts))
    return {"tokens": encoded.tokens.float().tolist(), "mask": encoded.mask.tolist(),
            "pooled": encoded.pooled.float().tolist()}


def _trainer(cfg: TrainConfig, sample_text: dict | None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from emf_dist.train.worker import train_worker
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    storage_path, filesystem = storage.ray_storage(cfg.storage_path)
    # Ray Train's print patch sends a worker's print to its logger and, when anything has wrapped
    # sys.stdout, to the stream as well: every progress line would show twice.
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return TorchTrainer(
        train_worker,
        train_loop_config={"train": to_dict(cfg), "sample_text": sample_text},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.faults.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": env}),
    )


@contextlib.contextmanager
def _architecture(cfg: TrainConfig):
    """The module the EMA weights go into and, for a backbone, the scheduler folder its export copies.
    A backbone's comes from its parent, with the weights the run left frozen."""
    if not isinstance(cfg.model, BackboneConfig):
        from emf_dist.model import VelocityNet
        yield VelocityNet(cfg.model), None
        return
    from emf_dist.train.pretrained import export_parent
    from emf_dist.train.setup import build_model
    with export_parent(cfg) as (parent, scheduler_dir):
        yield build_model(cfg, parent), scheduler_dir


def export_checkpoint(cfg: TrainConfig, encoder: TextEncoder, checkpoint, manifest: Manifest) -> str:
    """EMA weights of ``checkpoint`` -> an export folder in the run's storage."""
    from emf_dist.ema import EMA
    from emf_dist.export import ExportInfo, SamplingInfo, export_model
    from emf_dist.train.checkpoint import load_ema
    mean_flow = cfg.mode != "flow_matching"
    info = ExportInfo(model=cfg.model, text_encoder=cfg.encoder, encoder_fingerprint=encoder.fingerprint(),
                      sampling=SamplingInfo(mean_flow=mean_flow, steps=1 if mean_flow else 32),
                      training={"run": cfg.name, "steps": cfg.steps, "mode": cfg.mode, "data": cfg.data.url,
                                "manifest_version": manifest.version, "init_from": cfg.init_from},
                      vae=manifest.image.vae_info() if manifest.image.kind == "latent" else None)
    target = storage.join(cfg.storage_path, cfg.name, "export")
    with _architecture(cfg) as (model, scheduler_dir):
        ema = EMA(model, cfg.ema_decay)
        with checkpoint.as_directory() as folder:
            load_ema(folder, ema)
        ema.copy_to(model)
        with storage.output_folder(target) as out:
            export_model(model, info, out, scheduler_dir=scheduler_dir)
    return target


def train(cfg: TrainConfig) -> TrainResult:
    import ray
    # Everything after this sees the architecture that trains: the workers (and so the checkpoints'
    # train_config.json and wandb's config) and the export. A pipeline step hands in a config it has
    # resolved already, for its run record; resolving again changes nothing.
    cfg = resolve_model(cfg)
    check_resume(cfg)
    manifest, encoder = check_data(cfg)
    sample_text = encode_sample_prompts(cfg, encoder)
    from emf_dist.train.pretrained import parent_is_diffusers_folder
    if parent_is_diffusers_folder(cfg):  # a backbone export holds its own null condition
        from emf_dist.train.pretrained import write_null_text
        write_null_text(cfg, encoder)
    if not ray.is_initialized():
        init_driver(os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    result = _trainer(cfg, sample_text).fit()
    if result.error is not None:
        raise result.error
    export = export_checkpoint(cfg, encoder, result.checkpoint, manifest)
    metrics = dict(result.metrics or {})
    metrics.setdefault("skipped_samples", 0)
    return TrainResult(checkpoint=result.checkpoint.path, export=export, metrics=metrics)
