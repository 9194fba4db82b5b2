"""A trained backbone as an export folder that diffusers reads as well.

    model_index.json                 names the transformer (and scheduler): a partial pipeline
    transformer/config.json          the transformer's diffusers config (the architecture)
    transformer/diffusion_pytorch_model.safetensors
                                     its weights under the plain class's names, with the dual
                                     embedding at r = t folded in (below)
    scheduler/scheduler_config.json  the parent's, when it had one: the time convention
    model.safetensors                what the plain class has no place for: the interval
                                     embedder of EMF's dual time embedding and the null condition,
                                     and the unfolded bias (below)

At r = t the dual embedding is phi_end(t) + phi_interval(0), and phi_interval(0) is a constant
vector once trained. Adding it to the bias of phi_end's output layer gives the plain class the
same embedding, so ``SanaTransformer2DModel.from_pretrained(export / "transformer")`` computes the
trained network at r = t: the instantaneous velocity a multi-step flow sampler (a diffusers
pipeline) uses. MeanFlow's average velocity over [r, t] (one-step sampling) needs the interval
embedder, which only ``load_backbone`` puts back, with the bias as trained.
The export reloads from its own files: neither the parent folder nor the training config is read.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from emf_dist.backbones.adapter import BackboneConfig, DiffusersBackbone
from emf_dist.backbones.loading import load_diffusers_backbone

EXTRAS_FILE = "model.safetensors"
TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"
PIPELINES = {"sana": "SanaPipeline", "sd3": "StableDiffusion3Pipeline"}


def _is_extra(backbone: DiffusersBackbone, transformer_key: str) -> bool:
    return transformer_key.startswith(f"{backbone.family.time_embedding_attr}.interval_embedder.")


def _end_bias(backbone: DiffusersBackbone) -> str:
    """Transformer key of the bias of phi_end's output layer (the model's own timestep MLP)."""
    dual = getattr(backbone.transformer, backbone.family.time_embedding_attr)
    names = [name for name, _ in dual.named_modules()
             if name.endswith("timestep_embedder") and not name.startswith("interval_embedder")]
    if len(names) != 1 or getattr(dual.get_submodule(names[0]).linear_2, "bias", None) is None:
        raise ValueError(f"cannot find the biased output layer of {backbone.family.class_name}'s timestep MLP")
    return f"{backbone.family.time_embedding_attr}.{names[0]}.linear_2.bias"


@torch.no_grad()
def _interval_at_zero(backbone: DiffusersBackbone) -> torch.Tensor:
    dual = getattr(backbone.transformer, backbone.family.time_embedding_attr)
    reference = next(dual.interval_embedder.parameters())
    return dual.interval_embedder(torch.zeros(1, device=reference.device), reference.dtype)[0]


def save_backbone(backbone: DiffusersBackbone, folder: str, scheduler_dir: str | None = None) -> None:
    """Write ``backbone`` into ``folder`` (which exists) in the layout above."""
    import diffusers

    transformer = backbone.transformer
    plain = {k: v.detach().cpu().contiguous() for k, v in transformer.state_dict().items()
             if not _is_extra(backbone, k)}
    extras = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()
              if not k.startswith("transformer.") or _is_extra(backbone, k[len("transformer."):])}
    if backbone.cfg.time_embedding == "dual":
        bias = _end_bias(backbone)
        extras["transformer." + bias] = plain[bias]
        plain[bias] = (plain[bias] + _interval_at_zero(backbone).cpu()).contiguous()
    os.makedirs(os.path.join(folder, "transformer"), exist_ok=True)
    transformer.save_config(os.path.join(folder, "transformer"))
    save_file(plain, os.path.join(folder, "transformer", TRANSFORMER_WEIGHTS), metadata={"format": "pt"})
    save_file(extras, os.path.join(folder, EXTRAS_FILE))
    index = {"_class_name": PIPELINES[backbone.family.name], "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", backbone.family.class_name]}
    if scheduler_dir is not None and os.path.isfile(os.path.join(scheduler_dir, "scheduler_config.json")):
        shutil.copytree(scheduler_dir, os.path.join(folder, "scheduler"), dirs_exist_ok=True)
        with open(os.path.join(scheduler_dir, "scheduler_config.json")) as f:
            index["scheduler"] = ["diffusers", json.load(f)["_class_name"]]
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def load_backbone(folder: str, cfg: BackboneConfig) -> DiffusersBackbone:
    """The backbone ``save_backbone`` wrote, as ``cfg`` (the export's model section) describes it."""
    backbone = load_diffusers_backbone(folder, meanflow=cfg.time_embedding == "dual", use_text_mask=cfg.use_text_mask)
    extras = load_file(os.path.join(folder, EXTRAS_FILE))
    missing, unexpected = backbone.load_state_dict(extras, strict=False)
    not_loaded = [k for k in missing if _is_extra(backbone, k[len("transformer."):]) or not k.startswith("transformer.")]
    if unexpected or not_loaded:
        raise ValueError(f"{folder}/{EXTRAS_FILE} does not match the model: unexpected {unexpected[:5]}, "
                         f"missing {not_loaded[:5]}")
    backbone.cfg.input_size = cfg.input_size  # the size it was trained at, which sampling draws
    return backbone.eval()
