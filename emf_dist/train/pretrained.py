"""Training from a pretrained diffusers model: ``init_from`` names a pipeline folder (SANA, SD3)
or a bare transformer folder, local or on object storage (s3://bucket/prefix/pipeline).

    mode: meanflow_finetune   EMF's conversion to the dual time embedding (equal to the parent at
                              step 0), then EMF's freezing unless ``emf_freeze: false``; the
                              unconverted parent is the teacher of ``objective.velocity: teacher``
    mode: flow_matching       continued pretraining of the transformer as it is

On the driver, before any worker starts: ``resolve_backbone`` reads only the transformer's
config.json, refuses an unsupported class or mode, and makes the run's ``model`` section the
backbone's BackboneConfig (so checkpoints' train_config.json and the export describe what
trains); ``check_parent_parts`` compares the shards' text encoders and VAE with the pipeline's
own (or with those a backbone export records); ``write_null_text`` stores the family's encoding of the
empty prompt (the CFG null
condition) in the run's folder, where every worker's ``load_backbone_parent`` reads it.

A folder on object storage is copied once per node into a cache keyed by its listing
(emf_dist/folder_cache.py): by the driver when it resolves the run, by the workers when they load
the parent (a worker on the driver's node finds the driver's copy). The run's config keeps the URL
(``init_from``, and ``encoder.name`` when it defaults to the pipeline's), so checkpoints and the
export name what any machine with the credentials can read, not one node's cache.

A backbone's own export (a fine-tuned MeanFlow SANA) starts ``mode: meanflow_distill``: the
export is the teacher and the student starts as its copy, every parameter trainable, as for our
DiT (emf_dist/split_distill.py). A diffusers folder does not: it is a flow-matching model, and
distillation needs a MeanFlow one (fine-tune it first).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
from dataclasses import replace
from typing import Iterator

from emf_dist import storage
from emf_dist.backbones import BackboneConfig, DiffusersBackbone, is_diffusers_folder, load_diffusers_backbone
from emf_dist.backbones.adapter import backbone_config
from emf_dist.backbones.convert import convert_to_meanflow, freeze_for_emf_finetune
from emf_dist.backbones.families import family_for
from emf_dist.backbones.loading import describes_diffusers, transformer_folder
from emf_dist.export import INFO_FILE, ExportInfo, load_model, read_export_info
from emf_dist.folder_cache import local_copy
from emf_dist.manifest import Manifest, read_manifest
from emf_dist.model import ModelConfig
from emf_dist.text_encoder import PACKAGED_NAME, TextEncoder, check_fingerprint, pipeline_text_weights
from emf_dist.train.config import TrainConfig
from emf_dist.weight_hash import combined_sha256

NULL_TEXT_FILE = "null_text.safetensors"


def is_pretrained_folder(url: str) -> bool:
    """A diffusers pipeline or model folder, local or on object storage (not one of our exports, which
    hold emf_model.json). A remote folder is told by its small JSON files, without copying it."""
    if not url:
        return False
    if storage.is_remote(url):
        store = storage.Store(url)
        if store.exists(INFO_FILE):
            return False
        try:
            config = store.read_json("config.json")
        except ValueError:  # not JSON: not a diffusers model config
            config = None
        return describes_diffusers(store.exists("model_index.json"), config)
    folder = storage.local_path(url)
    return os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, INFO_FILE)) \
        and is_diffusers_folder(folder)


def parent_folder(cfg: TrainConfig) -> str:
    """This node's local folder of a diffusers init_from (its cached copy, for one on object storage)."""
    return local_copy(cfg.init_from)


def parent_is_diffusers_folder(cfg: TrainConfig) -> bool:
    """A backbone run starts from a diffusers folder (meanflow_finetune, flow_matching) or from a
    backbone export (meanflow_distill): resolve_model admits nothing else."""
    return isinstance(cfg.model, BackboneConfig) and cfg.mode != "meanflow_distill"


def transformer_config(folder: str) -> dict:
    """The transformer's config.json with the class's defaults for keys it leaves out; its class is
    checked first, so an unsupported one fails here, naming the supported ones."""
    model_dir, _ = transformer_folder(folder)
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    family = family_for(config.get("_class_name", "<no _class_name>"))
    import diffusers

    signature = inspect.signature(getattr(diffusers, family.class_name).__init__).parameters.values()
    defaults = {p.name: p.default for p in signature if p.default is not inspect.Parameter.empty}
    return {**defaults, **config}


def resolve_backbone(cfg: TrainConfig) -> TrainConfig:
    """The run's config with ``model`` = the backbone that trains (and the pipeline's text encoder
    when ``encoder.name`` is left at the default)."""
    if cfg.mode not in ("meanflow_finetune", "flow_matching"):  # before a copy of a remote folder is made
        hint = (": it is a flow-matching model and distillation needs a MeanFlow one; fine-tune it first (mode "
                "meanflow_finetune) and distil that run's export (init_from=<storage_path>/<name>/export)"
                if cfg.mode == "meanflow_distill" else "")
        raise ValueError(f"init_from {storage.redact(cfg.init_from)} is a diffusers folder: it starts mode "
                         f"meanflow_finetune (EMF's conversion) or flow_matching (continued pretraining), not "
                         f"{cfg.mode}{hint}")
    if isinstance(cfg.model, ModelConfig) and cfg.model.time_embedding == "decoupled":
        raise ValueError(f"init_from {storage.redact(cfg.init_from)} is a diffusers folder: its fine-tune takes "
                         "EMF's conversion (a dual time embedding); the decoupled one is written for our DiT: "
                         "leave model.time_embedding at dual")
    folder = parent_folder(cfg)
    # The config names the folder as every machine reads it: the URL of a remote one, not this node's copy.
    source = cfg.init_from.rstrip("/") if storage.is_remote(cfg.init_from) else os.path.abspath(folder)
    config = transformer_config(folder)
    family = family_for(config["_class_name"])
    problems = family.problems(config)
    if problems:
        raise ValueError(f"{family.class_name} in {folder} is not supported: " + "; ".join(problems))
    time_embedding = "dual" if cfg.mode == "meanflow_finetune" else "single"
    model = replace(backbone_config(family, config, time_embedding=time_embedding),
                    checkpointing=cfg.model.checkpointing, input_size=_trained_size(cfg, config))
    encoder = cfg.encoder
    if encoder.name == PACKAGED_NAME and os.path.isdir(os.path.join(folder, "text_encoder")):
        encoder = replace(encoder, name=source)
    return replace(cfg, model=model, encoder=encoder, init_from=source)


def resolve_backbone_export(cfg: TrainConfig, parent: ExportInfo) -> TrainConfig:
    """meanflow_distill from a backbone export: ``model`` = the export's backbone (its MeanFlow dual
    time embedding, the size it was trained at), and its text encoder when ``encoder.name`` is left
    at the default."""
    encoder = cfg.encoder
    if encoder.name == PACKAGED_NAME:
        encoder = replace(encoder, name=parent.text_encoder.name)
    return replace(cfg, model=replace(parent.model, checkpointing=cfg.model.checkpointing), encoder=encoder)


def _trained_size(cfg: TrainConfig, config: dict) -> int:
    """The latent side of the dataset: the diffusers transformers take any multiple of their patch
    size (a 1024 px SANA fine-tunes on 512 px latents); else the config's sample_size."""
    try:
        shape = read_manifest(cfg.data.url, storage.storage_options(cfg.data.url)).image.shape
    except FileNotFoundError:
        return config["sample_size"]
    if len(shape) == 3 and shape[1] == shape[2] and shape[1] % config["patch_size"] == 0:
        return shape[1]
    return config["sample_size"]


def check_parent_parts(cfg: TrainConfig, manifest: Manifest) -> None:
    """The shards against what the parent was trained with: a pipeline's own text encoder and VAE,
    or the text encoder and VAE a backbone export records."""
    if parent_is_diffusers_folder(cfg):
        check_pipeline_parts(cfg, manifest)
    else:
        check_export_parts(cfg, manifest)


def check_export_parts(cfg: TrainConfig, manifest: Manifest) -> None:
    """Distillation feeds the shards' text states to the export (the teacher), and the distilled
    export records the shards' VAE: both must be the export's own."""
    with storage.local_folder(cfg.init_from, only=(INFO_FILE,)) as folder:
        parent = read_export_info(folder)
    teacher, shards = f"the teacher at {cfg.init_from}", f"the shards at {cfg.data.url}"
    check_fingerprint(parent.encoder_fingerprint, manifest.encoder, what_expected=teacher, what_actual=shards)
    if parent.vae is not None:
        from emf_dist.vae import check_vae
        if manifest.image.kind != "latent":
            raise ValueError(f"the shards at {cfg.data.url} hold {manifest.image.kind} images; {cfg.init_from} works "
                             f"on latents of {parent.vae.source}: prepare them with image.kind=latent "
                             f"image.vae={parent.vae.source}")
        check_vae(parent.vae, manifest.image.vae_info(), what_expected=teacher, what_actual=shards)


def check_pipeline_parts(cfg: TrainConfig, manifest: Manifest) -> None:
    """The shards must be encoded by the pipeline's own text encoders and VAE (when it has them):
    clear errors naming both sides."""
    folder = parent_folder(cfg)
    check_text_weights(folder, manifest, cfg.data.url, name=cfg.init_from)
    vae = os.path.join(folder, "vae")
    if os.path.isdir(vae):
        if manifest.image.kind != "latent":
            raise ValueError(f"the shards at {cfg.data.url} hold {manifest.image.kind} images; {cfg.init_from} works "
                             f"on latents of its VAE: prepare them with image.kind=latent image.vae={cfg.init_from}")
        from emf_dist.vae import check_vae, describe_vae, load_vae
        check_vae(manifest.image.vae_info(), describe_vae(vae, load_vae(vae)),
                  what_expected=f"the shards ({cfg.data.url})", what_actual=f"the model ({folder})")


def check_text_weights(folder: str, manifest: Manifest, data_url: str, name: str | None = None) -> None:
    """The shards' encoder weights (all of SD3's three) must be the pipeline folder's own; the error
    names the parts that differ. ``name``: the folder as the user gave it (a URL), if not ``folder``."""
    own = pipeline_text_weights(folder)
    if not own:
        return
    want, got = combined_sha256(own), manifest.encoder.get("weights_sha256")
    if want == got:
        return
    recorded = manifest.encoder.get("text_encoders") or {}  # per part, in shards of a multi-encoder pipeline
    differ = [name for name, sha in own.items() if name not in recorded or recorded[name] != sha]
    parts = ", ".join(os.path.join(folder, name) for name in differ)
    raise ValueError(f"the shards at {data_url} were encoded by text encoder {manifest.encoder.get('path')} "
                     f"(weights {str(got)[:12]}..), not by the model's ({parts}, weights {want[:12]}..): "
                     f"prepare the data with encoder.name={name or folder}")


def null_text_url(cfg: TrainConfig) -> str:
    return storage.join(cfg.storage_path, cfg.name, NULL_TEXT_FILE)


def write_null_text(cfg: TrainConfig, encoder: TextEncoder) -> str:
    """The family's encoding of "" at the training text length, for every worker's parent."""
    from safetensors.torch import save

    null = encoder.encode_null()
    payload = save({"tokens": null.tokens[0].float(), "mask": null.mask[0], "pooled": null.pooled[0].float()})
    url = null_text_url(cfg)
    fs, path = storage.filesystem(url)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    fs.pipe(path, payload)
    return url


def read_null_text(cfg: TrainConfig) -> dict:
    from safetensors.torch import load

    url = null_text_url(cfg)
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"{url} is missing: the training driver writes the null condition there before "
                                "the workers start (emf_dist.train.pretrained.write_null_text)")
    return load(fs.cat_file(path))


def load_backbone_parent(cfg: TrainConfig) -> DiffusersBackbone:
    """The pretrained transformer as it is (the flow-matching parent), with the run's null condition."""
    parent = load_diffusers_backbone(parent_folder(cfg), meanflow=False, use_text_mask=cfg.model.use_text_mask)
    null = read_null_text(cfg)
    parent.set_null_text(null["tokens"], null["mask"], null["pooled"] if cfg.model.pooled_dim else None)
    return parent


def build_backbone_model(cfg: TrainConfig, parent: DiffusersBackbone) -> DiffusersBackbone:
    """meanflow_finetune: EMF's conversion (of a copy when the parent stays on as the teacher) and,
    with ``emf_freeze``, EMF's freezing; flow_matching: the parent itself, every parameter trainable;
    meanflow_distill: a copy of the export (which stays on as the teacher), every parameter trainable."""
    if not isinstance(cfg.model, BackboneConfig):
        raise TypeError("build_backbone_model needs a config resolved by resolve_backbone")
    keeps_parent = cfg.objective.velocity == "teacher" or cfg.mode == "meanflow_distill"
    model = copy.deepcopy(parent) if keeps_parent else parent
    if cfg.mode == "meanflow_finetune":
        convert_to_meanflow(model)
        if cfg.emf_freeze:
            freeze_for_emf_finetune(model)
    elif cfg.mode == "meanflow_distill":
        model.requires_grad_(True)
    model.cfg.checkpointing, model.cfg.input_size = cfg.model.checkpointing, cfg.model.input_size
    return model


@contextlib.contextmanager
def export_parent(cfg: TrainConfig) -> Iterator[tuple[DiffusersBackbone, str | None]]:
    """What a backbone run's export is assembled on: the parent (the architecture and the weights EMF
    leaves frozen; the EMA weights go over it) and the scheduler folder the export copies (the time
    convention), from the diffusers folder or from the backbone export the run started from."""
    if parent_is_diffusers_folder(cfg):
        scheduler = transformer_folder(parent_folder(cfg))[1]
        yield load_backbone_parent(cfg), None if scheduler is None else str(scheduler)
        return
    with storage.local_folder(cfg.init_from) as folder:
        scheduler = transformer_folder(folder)[1]  # an export is a partial pipeline: model_index.json, scheduler/
        yield load_model(folder)[0], None if scheduler is None else str(scheduler)
