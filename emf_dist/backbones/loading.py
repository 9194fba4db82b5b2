"""Loading a pretrained diffusers transformer from a local folder as a project backbone.

``init_from`` may be a diffusers pipeline folder (``model_index.json``, ``transformer/``,
``scheduler/``, maybe ``vae/``, ``text_encoder/``, ``tokenizer/``) or a bare transformer folder
(``config.json`` with ``_class_name``). Only the transformer and the scheduler config are read
here; the VAE and the text encoders are the data pipeline's business. A bare folder has no
scheduler: the time convention is diffusers' flow-matching default (num_train_timesteps 1000),
recorded in ``backbone.time.source``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from emf_dist.backbones.adapter import DiffusersBackbone
from emf_dist.backbones.convert import convert_to_meanflow
from emf_dist.backbones.families import FAMILIES, family_for
from emf_dist.backbones.time_convention import read_time_convention


def _read_json(path: Path) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def is_diffusers_folder(folder: str | Path) -> bool:
    """True for a diffusers pipeline folder or a diffusers model folder (the project's own exports
    hold ``emf_model.json`` and are neither)."""
    folder = Path(folder)
    return describes_diffusers((folder / "model_index.json").is_file(), _read_json(folder / "config.json"))


def describes_diffusers(has_model_index: bool, config: dict | None) -> bool:
    """The rule behind ``is_diffusers_folder``, for a folder read some other way (on object storage):
    a pipeline's model_index.json, or a config.json that diffusers wrote for a model class."""
    return has_model_index or (isinstance(config, dict) and "_class_name" in config and "_diffusers_version" in config)


def transformer_folder(folder: str | Path) -> tuple[Path, Path | None]:
    """(the transformer's folder, the scheduler's folder or None) of a pipeline or bare model folder."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        index = _read_json(folder / "model_index.json") or {}
        if "transformer" not in index:
            raise ValueError(f"{folder} is a diffusers pipeline without a transformer (a UNet pipeline?); "
                             f"supported transformers: {', '.join(FAMILIES)}")
        scheduler = folder / "scheduler"
        return folder / "transformer", scheduler if scheduler.is_dir() else None
    if is_diffusers_folder(folder):
        return folder, None
    raise ValueError(f"{folder} is not a diffusers folder (no model_index.json, no config.json with _class_name)")


def load_diffusers_backbone(folder: str | Path, *, meanflow: bool = True, dtype: torch.dtype = torch.float32,
                            use_text_mask: bool | None = None) -> DiffusersBackbone:
    """The transformer of ``folder`` behind the project's interface; with ``meanflow`` (the fine-tune's
    starting point) converted to the dual time embedding, else the flow-matching parent as it is
    (e.g. a teacher). ``use_text_mask`` overrides the family's default (SANA masks, SD3 does not)."""
    model_dir, scheduler_dir = transformer_folder(folder)
    config = _read_json(model_dir / "config.json")
    if not isinstance(config, dict) or "_class_name" not in config:
        raise ValueError(f"{model_dir / 'config.json'} is missing or names no _class_name")
    family = family_for(config["_class_name"])
    time = read_time_convention(scheduler_dir, timestep_scale=config.get("timestep_scale", 1.0))
    import diffusers

    transformer = getattr(diffusers, family.class_name).from_pretrained(model_dir, torch_dtype=dtype)
    # from_pretrained does not always honour torch_dtype (diffusers 0.42 leaves SD3 in float32 when
    # asked for float64); neither family keeps modules in float32 on purpose.
    if any(p.dtype != dtype for p in transformer.parameters()):
        transformer = transformer.to(dtype)
    backbone = DiffusersBackbone(transformer, family, time, use_text_mask=use_text_mask)
    return convert_to_meanflow(backbone) if meanflow else backbone
