"""Turning a flow-matching model into a MeanFlow model (EMF's adaptation).

The flow-matching net has one time embedding phi(t). The MeanFlow net has two,
phi_cond(t, r) = phi_end(t) + phi_interval(t - r). Conversion copies phi into the end-time
path and keeps the interval path's zero-initialised output layer, so phi_interval(.) = 0
and the converted model equals the original for every (r, t) at step 0; fine-tuning with
the MeanFlow loss then teaches the interval path.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from emf_dist.model import ModelConfig, VelocityNet


def meanflow_from_flow_matching(fm_config: ModelConfig, fm_state: dict[str, torch.Tensor]) -> VelocityNet:
    if fm_config.time_embedding != "single":
        raise ValueError("expected a flow-matching model (time_embedding 'single'); this one is already dual")
    model = VelocityNet(replace(fm_config, time_embedding="dual"))
    renamed = {name.replace("t_embedder.", "t_end_embedder.", 1) if name.startswith("t_embedder.") else name: value
               for name, value in fm_state.items()}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    still_missing = [name for name in missing if not name.startswith("t_interval_embedder.")]
    if still_missing or unexpected:
        raise ValueError(f"flow-matching checkpoint does not fit the model config: missing {still_missing}, "
                         f"unexpected {unexpected}")
    return model


def freeze_for_emf_finetune(model: VelocityNet) -> list[str]:
    """EMF trains only the transformer blocks, both time embeddings and the final modulation
    table; everything else (patch embedding, text projections, output linear, null text) stays
    frozen. Returns the names of the trainable parameters."""
    return train_only(model, ("blocks.", "t_end_embedder.", "t_interval_embedder.", "final.adaLN."))


def train_only(model: nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """Freeze every parameter whose name starts with none of ``prefixes``; returns the trainable names."""
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
        if param.requires_grad:
            names.append(name)
    return names


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
