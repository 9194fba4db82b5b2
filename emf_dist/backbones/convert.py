"""EMF's adaptation of a diffusers flow-matching transformer into a MeanFlow model, and its freezing.

As ``emf_dist.convert`` does for VelocityNet: the time embedding becomes phi_end(t) + phi_interval(t - r)
with phi_interval's output zeroed (dual_time.py), so the converted model equals the original at
step 0 for every (r, t); fine-tuning trains the blocks, both time embeddings and the final
modulation, the rest stays frozen.
"""

from __future__ import annotations

from emf_dist.backbones.adapter import DiffusersBackbone
from emf_dist.convert import train_only


def convert_to_meanflow(backbone: DiffusersBackbone) -> DiffusersBackbone:
    """In place: give the transformer the dual time embedding; the adapter then feeds it t - r."""
    if backbone.cfg.time_embedding == "dual":
        raise ValueError("this backbone already has the dual time embedding")
    transformer, attr = backbone.transformer, backbone.family.time_embedding_attr
    original = getattr(transformer, attr)
    dual = backbone.family.dual(original)
    reference = next(original.parameters())
    setattr(transformer, attr, dual.to(device=reference.device, dtype=reference.dtype))
    backbone.cfg.time_embedding = "dual"
    return backbone


def freeze_for_emf_finetune(backbone: DiffusersBackbone) -> list[str]:
    """Train only the transformer blocks, both time embeddings and the final modulation (SANA's
    scale_shift_table, SD3's norm_out); freeze the patch embedding, the text projections and the
    output linear. Returns the trainable parameter names."""
    if backbone.cfg.time_embedding != "dual":
        raise ValueError("freeze after convert_to_meanflow: the interval embedding must exist to be trained")
    return train_only(backbone, tuple("transformer." + prefix for prefix in backbone.family.trainable_prefixes))
