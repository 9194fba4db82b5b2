"""A tiny StableDiffusion3Pipeline folder for the SD3 tests: random CLIP-L and CLIP-G
(CLIPTextModelWithProjection), a random T5EncoderModel, their tokenizers built offline from a
printable-ASCII vocabulary, a random SD3Transformer2DModel whose joint_attention_dim and
pooled_projection_dim fit those encoders, a random AutoencoderKL and SD3's flow-matching Euler
scheduler, each written with save_pretrained, so every path loads the real classes from disk."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from tests.helpers import randomised

CLIP_LENGTH = 8  # the CLIP tokenizers' model_max_length (SD3's is 77)
T5_LENGTH = 6  # encoder.max_length of the tests: T5's max_sequence_length (SD3's pipeline uses 256)
CLIP_L, CLIP_G = (8, 6), (12, 10)  # (hidden_size, projection_dim): the states and the pooled vector
T5_DIM = 24  # T5's d_model = SD3's joint_attention_dim; wider than the two CLIPs' 20, so the pad shows
TEXT_LENGTH = CLIP_LENGTH + T5_LENGTH
POOLED_DIM = CLIP_L[1] + CLIP_G[1]
LATENT_CHANNELS, LATENT_SIDE, RESOLUTION = 4, 8, 32  # the KL autoencoder below compresses 4x
SD3 = dict(sample_size=LATENT_SIDE, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
           num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM,
           caption_projection_dim=16, pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16)
_CHARS = [c for c in string.printable if not c.isspace()]


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A byte-level BPE CLIPTokenizer over single printable characters and two merges."""
    from transformers import CLIPTokenizer

    pieces = ["<|startoftext|>", "<|endoftext|>"] + _CHARS + [c + "</w>" for c in _CHARS] + ["re", "red</w>"]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    return CLIPTokenizer(vocab=vocab, merges=[("r", "e"), ("re", "d</w>")], pad_token=pad_token,
                         model_max_length=CLIP_LENGTH)


def t5_tokenizer():
    """A unigram T5Tokenizer over printable characters and two words (no sentinel tokens)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), ("▁a", -1.0), ("▁red", -1.0)]
    return T5Tokenizer(vocab=vocab + [(c, -5.0) for c in _CHARS], extra_ids=0)


def tiny_clip(tokenizer, hidden_size: int, projection_dim: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=CLIP_LENGTH,
                            projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config).eval()


def tiny_t5(tokenizer, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=T5_DIM, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config).eval()


def tiny_kl(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), latent_channels=4,
                         norm_num_groups=4, sample_size=RESOLUTION, scaling_factor=1.5, shift_factor=0.1).eval()


def tiny_sd3(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return randomised(SD3Transformer2DModel(**SD3), seed=seed)


def write_sd3_pipeline(folder: Path, seed: int = 0, *, t5: bool = True, encoder_seeds: dict | None = None) -> Path:
    """A StableDiffusion3Pipeline folder. ``encoder_seeds`` ({"text_encoder_3": 5}) gives one encoder
    other weights (the others, the transformer and the VAE stay those of ``seed``); ``t5=False``
    leaves T5 out as diffusers saves a pipeline without it ([null, null] in model_index.json)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder, seeds = Path(folder), {"text_encoder": seed, "text_encoder_2": seed + 1, "text_encoder_3": seed + 2,
                                   **(encoder_seeds or {})}
    clip_l, clip_g = clip_tokenizer(), clip_tokenizer(pad_token="!")  # SD3's CLIP-G tokenizer pads with "!"
    clip_l.save_pretrained(folder / "tokenizer")
    clip_g.save_pretrained(folder / "tokenizer_2")
    tiny_clip(clip_l, *CLIP_L, seeds["text_encoder"]).save_pretrained(folder / "text_encoder")
    tiny_clip(clip_g, *CLIP_G, seeds["text_encoder_2"]).save_pretrained(folder / "text_encoder_2")
    if t5:
        tokenizer = t5_tokenizer()
        tokenizer.save_pretrained(folder / "tokenizer_3")
        tiny_t5(tokenizer, seeds["text_encoder_3"]).save_pretrained(folder / "text_encoder_3")
    tiny_sd3(seed).save_pretrained(folder / "transformer")
    tiny_kl(seed).save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    clip = ["transformers", "CLIPTextModelWithProjection"]
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "tokenizer_3": ["transformers", "T5Tokenizer"] if t5 else [None, None],
             "text_encoder": clip, "text_encoder_2": clip,
             "text_encoder_3": ["transformers", "T5EncoderModel"] if t5 else [None, None],
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def pipeline_encoding(folder: Path, captions: list[str], clip_skip: int | None = None):
    """The oracle: StableDiffusion3Pipeline.encode_prompt on the folder, with "" as the negative prompt:
    (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)."""
    from diffusers import StableDiffusion3Pipeline

    # Without T5 diffusers wants it passed as None (the documented way to drop it).
    without_t5 = {} if (Path(folder) / "text_encoder_3").is_dir() else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **without_t5)
    with torch.no_grad():
        return pipe.encode_prompt(captions, None, None, device="cpu", do_classifier_free_guidance=True,
                                  negative_prompt="", clip_skip=clip_skip, max_sequence_length=T5_LENGTH)
