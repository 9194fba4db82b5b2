"""Turning a flow-matching model into a MeanFlow model, two ways.

EMF's adaptation (time_embedding "dual"). The flow-matching net has one time embedding phi(t).
The MeanFlow net has two, phi_cond(t, r) = phi_end(t) + phi_interval(t - r). Conversion copies phi
into the end-time path and keeps the interval path's zero-initialised output layer, so
phi_interval(.) = 0 and the converted model equals the original for every (r, t) at step 0;
fine-tuning with the MeanFlow loss then teaches the interval path.

Decoupled MeanFlow (time_embedding "decoupled", arXiv 2510.24474). The same weights, read as an
encoder (the first blocks, conditioned on phi(t)) and a decoder (the last ``decoder_depth`` blocks
and the final layer, conditioned on phi(r)): no new parameter, the original model at r = t, and
already a flow map of sorts for r < t, since the decoder is told where the step ends.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from emf_dist.model import ModelConfig, VelocityNet


def meanflow_from_flow_matching(fm_config: ModelConfig, fm_state: dict[str, torch.Tensor],
                                time_embedding: str = "dual", decoder_depth: int = 0) -> VelocityNet:
    """The MeanFlow model of the flow-matching model (``fm_config``, ``fm_state``) with the given time embedding."""
    if fm_config.time_embedding != "single":
        raise ValueError(f"expected a flow-matching model (time_embedding 'single'); this one is already "
                         f"{fm_config.time_embedding}")
    if time_embedding == "decoupled":
        model = VelocityNet(replace(fm_config, time_embedding="decoupled", decoder_depth=decoder_depth))
        model.load_state_dict(fm_state)
        return model
    if time_embedding != "dual":
        raise ValueError(f"a MeanFlow time embedding is dual or decoupled, not {time_embedding!r}")
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
    """EMF trains only the transformer blocks, the time embeddings (both, or the decoupled model's one)
    and the final modulation table; everything else (patch embedding, text projections, output linear,
    null text) stays frozen. Returns the names of the trainable parameters."""
    return train_only(model, ("blocks.", "t_embedder.", "t_end_embedder.", "t_interval_embedder.", "final.adaLN."))


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
