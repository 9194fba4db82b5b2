"""The exported model folder: what `emf generate` and the evaluation load.

    model.safetensors    the (EMA) weights; safetensors, so loading never unpickles code
    emf_model.json       model config, the text encoder's config and fingerprint, how to sample,
                         the weights' size, sha256 and tensor shapes ("weights"), and for a latent
                         model the VAE (where it is, its fingerprint)

A pretrained diffusers backbone's export also holds its transformer in diffusers' own format
(emf_dist/backbones/saving.py); model.safetensors then keeps only what that format has no place for.

The folder is written under a temporary name and renamed into place, so a reader never sees
a half-written export. Loading verifies the weights against "weights" first (emf_dist/weights.py):
a file damaged in a copy, even at the same length, fails with its name instead of sampling NaNs.
Exports written before the record existed are checked against the model config's shapes only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file

from emf_dist.backbones.adapter import BackboneConfig, DiffusersBackbone
from emf_dist.config import ConfigError, from_dict, to_dict
from emf_dist.errors import InputError
from emf_dist.model import ModelConfig, VelocityNet
from emf_dist.text_encoder import TextEncoderConfig
from emf_dist.vae import VaeInfo
from emf_dist.weights import WEIGHTS_KEY, verify_weights, weights_record

FORMAT = "emf-dist-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "emf_model.json"


@dataclass
class SamplingInfo:
    mean_flow: bool = True  # average-velocity model (k-step MeanFlow); False: flow matching (Euler)
    steps: int = 1  # default number of steps
    guidance_scale: float = 1.0  # default CFG scale at sampling (1 = a single evaluation per step)


@dataclass
class ExportInfo:
    model: ModelConfig | BackboneConfig  # our DiT, or a pretrained diffusers transformer
    text_encoder: TextEncoderConfig
    encoder_fingerprint: dict
    sampling: SamplingInfo = field(default_factory=SamplingInfo)
    training: dict = field(default_factory=dict)  # free-form provenance: run name, step, data manifest
    vae: VaeInfo | None = None  # latent models: the autoencoder that decodes their samples


def export_model(model: VelocityNet | DiffusersBackbone, info: ExportInfo, out_dir: str | os.PathLike,
                 scheduler_dir: str | None = None) -> str:
    """Write ``model``'s weights and ``info`` to ``out_dir`` atomically (an existing export is replaced).
    ``scheduler_dir``: a backbone parent's scheduler folder, copied along (its time convention)."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        if isinstance(model, DiffusersBackbone):
            from emf_dist.backbones.saving import save_backbone
            save_backbone(model, staging, scheduler_dir)
        else:
            weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
            save_file(weights, os.path.join(staging, WEIGHTS_FILE))
        weights_path = os.path.join(staging, WEIGHTS_FILE)
        payload = {"format": FORMAT, "version": FORMAT_VERSION, **to_dict(info),
                   WEIGHTS_KEY: weights_record(weights_path, load_file(weights_path))}
        with open(os.path.join(staging, INFO_FILE), "w") as f:
            json.dump(payload, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def read_export_info(model_dir: str | os.PathLike) -> ExportInfo:
    info, _ = read_export(model_dir)
    return info


def read_export(model_dir: str | os.PathLike) -> tuple[ExportInfo, dict | None]:
    """(the description, the weights record or None for an older export)."""
    info_path = os.path.join(model_dir, INFO_FILE)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model folder {model_dir} does not exist; pass the folder that training exported")
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"{model_dir} is not an exported emf-dist model: {INFO_FILE} is missing "
                                f"(a training run's export folder holds {INFO_FILE} and {WEIGHTS_FILE})")
    with open(info_path) as f:
        try:
            payload = json.load(f)
        except json.JSONDecodeError as err:
            raise InputError(f"{info_path} is not valid JSON: {err}") from None
    if payload.get("format") != FORMAT:
        raise InputError(f"{info_path} is not an emf-dist model description (format {payload.get('format')!r})")
    if payload.get("version") != FORMAT_VERSION:
        raise InputError(f"{info_path} has format version {payload.get('version')}; this emf-dist reads "
                         f"version {FORMAT_VERSION}")
    body = {k: v for k, v in payload.items() if k not in ("format", "version", WEIGHTS_KEY)}
    try:
        return from_dict(ExportInfo, body, validate=True), payload.get(WEIGHTS_KEY)
    except ConfigError as err:
        raise InputError(f"{info_path} is inconsistent:\n{err}") from None


def expected_shapes(cfg: ModelConfig | BackboneConfig) -> dict[str, list[int]] | None:
    """Tensor shapes of a model of this config, without allocating it (None for a diffusers backbone,
    whose model.safetensors holds only the parts diffusers' format has no place for)."""
    if isinstance(cfg, BackboneConfig):
        return None
    with torch.device("meta"):
        return {name: list(t.shape) for name, t in VelocityNet(cfg).state_dict().items()}


def verify_export(model_dir: str | os.PathLike) -> ExportInfo:
    """The description, once the weights file is whole (size, checksum) and fits it (tensor shapes):
    what a driver checks before it starts workers on an init_from export."""
    info, record = read_export(model_dir)
    weights_path = os.path.join(model_dir, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{model_dir} has no {WEIGHTS_FILE}; the export is incomplete")
    verify_weights(weights_path, record, expected_shapes(info.model), described_by=INFO_FILE)
    return info


def load_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu"
               ) -> tuple[VelocityNet | DiffusersBackbone, ExportInfo]:
    """Rebuild the network from an export folder, in eval mode."""
    info = verify_export(model_dir)
    weights_path = os.path.join(model_dir, WEIGHTS_FILE)
    if isinstance(info.model, BackboneConfig):
        from emf_dist.backbones.saving import load_backbone
        return load_backbone(str(model_dir), info.model).to(device), info
    model = VelocityNet(info.model)
    try:
        missing, unexpected = model.load_state_dict(load_file(weights_path), strict=False)
    except RuntimeError as err:  # shape mismatches
        raise InputError(f"{weights_path} does not match the model config in {INFO_FILE}: {err}") from None
    if missing or unexpected:
        raise InputError(f"{weights_path} does not match the model config in {INFO_FILE}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), info
