"""Pretrained diffusers text-to-image transformers (SANA, SD3) as MeanFlow backbones.

    loading.py               is_diffusers_folder, load_diffusers_backbone
    time_convention.py       our t -> the model's timestep, read and checked from the scheduler config
    adapter.py               DiffusersBackbone: net(z, r, t, tokens, mask, pooled, drop_text)
    families.py              per transformer class: call, time embedding, what EMF trains
    dual_time.py             phi_end(t) + phi_interval(t - r) on the diffusers time embeddings
    convert.py               convert_to_meanflow, freeze_for_emf_finetune
    attention_processors.py  processors whose attention has exact forward-mode tangents
    precision.py             float64-capable twins of diffusers' float32 islands (for oracles)
    saving.py                a trained backbone as an export folder diffusers also reads
"""

from emf_dist.backbones.adapter import BackboneConfig, DiffusersBackbone
from emf_dist.backbones.convert import convert_to_meanflow, freeze_for_emf_finetune
from emf_dist.backbones.loading import is_diffusers_folder, load_diffusers_backbone

__all__ = ["BackboneConfig", "DiffusersBackbone", "convert_to_meanflow", "freeze_for_emf_finetune",
           "is_diffusers_folder", "load_diffusers_backbone"]
