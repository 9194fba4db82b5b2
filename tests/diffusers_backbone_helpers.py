"""Tiny random diffusers transformers written as pipeline folders, and their inputs, for the backbone tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers import randomised

TEXT_LEN, TEXT_DIM, POOLED_DIM, CHANNELS, SIDE = 5, 12, 10, 4, 8

SANA_CONFIG = dict(in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=2, attention_head_dim=8,
                   num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                   caption_channels=TEXT_DIM, mlp_ratio=2.0, sample_size=SIDE, patch_size=2)
SD3_CONFIG = dict(sample_size=SIDE, patch_size=2, in_channels=CHANNELS, out_channels=CHANNELS, num_layers=2,
                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                  caption_projection_dim=16, pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16)

FAMILIES = {"sana": ("SanaTransformer2DModel", "SanaPipeline", SANA_CONFIG),
            "sd3": ("SD3Transformer2DModel", "StableDiffusion3Pipeline", SD3_CONFIG)}


def tiny_transformer(family: str, seed: int = 0, **overrides):
    import diffusers

    class_name, _, config = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(diffusers, class_name)(**{**config, **overrides})
    # Any zero-initialised output would make a comparison 0 == 0; diffusers' tiny inits have none
    # today, this keeps it so.
    return randomised(model, seed=seed)


def flow_scheduler(family: str):
    """The scheduler each family's pipelines ship: SANA a flow DPM-Solver, SD3 flow-matching Euler."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if family == "sana":
        return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def write_pipeline(folder: Path, family: str, scheduler=None, seed: int = 0, **overrides) -> Path:
    """A pipeline-like folder: model_index.json, transformer/, scheduler/ (no VAE, no text encoders)."""
    import diffusers

    class_name, pipeline, _ = FAMILIES[family]
    tiny_transformer(family, seed, **overrides).save_pretrained(folder / "transformer")
    scheduler = flow_scheduler(family) if scheduler is None else scheduler
    scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", class_name], "scheduler": ["diffusers", type(scheduler).__name__]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def inputs(batch: int = 3, seed: int = 0, dtype=torch.float64):
    """z, r, t, text tokens, a mask keeping a different number of tokens per row, pooled text."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, CHANNELS, SIDE, SIDE, generator=gen, dtype=dtype)
    t = torch.rand(batch, generator=gen, dtype=dtype) * 0.8 + 0.1
    r = t * torch.rand(batch, generator=gen, dtype=dtype)
    tokens = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen, dtype=dtype)
    mask = torch.arange(TEXT_LEN)[None] < (1 + torch.arange(batch) % TEXT_LEN)[:, None]
    pooled = torch.randn(batch, POOLED_DIM, generator=gen, dtype=dtype)
    return z, r, t, tokens, mask, pooled


def call_original(model, family: str, z, t, tokens, mask, pooled):
    """The diffusers model called directly, as its pipeline does: timestep = t * 1000."""
    if family == "sana":
        return model(z, encoder_hidden_states=tokens, timestep=t * 1000, encoder_attention_mask=mask).sample
    return model(z, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=t * 1000).sample
