"""SD3's prompt encoding with its three text encoders, as ``StableDiffusion3Pipeline.encode_prompt``:

    clip_i = CLIP_i(ids_i).hidden_states[-(clip_skip + 2)]      [B, N, H_i]  (clip_skip None: -2)
    pooled = cat(CLIP-L text_embeds, CLIP-G text_embeds)        [B, P_L + P_G]
    clip   = pad(cat(clip_L, clip_G, feature axis), to T5's D)  [B, N, D]
    t5     = T5(ids_3).last_hidden_state                        [B, max_length, D]
    states = cat(clip, t5, sequence axis)                       [B, N + max_length, D]

N is the first CLIP tokenizer's ``model_max_length`` (77), used for both CLIPs as the pipeline
does; ``max_length`` (``encoder.max_length``) is T5's ``max_sequence_length``. Every prompt is
padded to those lengths and no attention mask reaches any encoder (CLIP's causal mask keeps the
padding out of the real tokens; T5 attends to its padding), and SD3's transformer attends to
every position: the states at padded positions are stored as they come out, and the mask is all
True. A pipeline folder saved without ``text_encoder_3`` gets the pipeline's own fallback, zeros of
the transformer's ``joint_attention_dim`` in place of T5's states.

The unconditional prompt "" is the pipeline's negative prompt: ``encode_prompt`` encodes it with
``clip_skip=None`` whatever ``clip_skip`` the captions get, so it is always the penultimate layer
(docs/findings.md §15).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from emf_dist.prompt_recipes import SD3Recipe, model_index
from emf_dist.weight_hash import combined_sha256, weights_sha256


@dataclass
class _Encoder:
    name: str        # the pipeline component: text_encoder, text_encoder_2, text_encoder_3
    model: Any       # CLIPTextModelWithProjection or T5EncoderModel, float32, eval mode
    tokenizer: Any


def present_encoders(folder: str, recipe: SD3Recipe) -> dict[str, bool]:
    """Which of the recipe's encoders the pipeline folder holds. The CLIPs are required; T5 may be
    left out as diffusers saves it (``[null, null]`` in model_index.json, no folder)."""
    index = model_index(folder) or {}
    present = {}
    for name in recipe.encoders:
        entry = index.get(name)
        listed = isinstance(entry, list) and bool(entry) and entry[0] is not None
        if listed and not os.path.isdir(os.path.join(folder, name)):
            raise ValueError(f"{folder}/model_index.json lists {name} but the folder has no {name}/: copy the "
                             "pipeline folder again")
        present[name] = listed
    missing = [encoder for encoder, _ in recipe.clips if not present[encoder]]
    if missing:
        raise ValueError(f"{folder} is a {recipe.pipeline} folder without {', '.join(missing)}: SD3's text states "
                         "need both CLIP encoders (only text_encoder_3, T5, may be left out)")
    return present


def encoder_hashes(folder: str, recipe: SD3Recipe) -> dict[str, str | None]:
    """weights_sha256 of each encoder of the folder, None for a T5 it leaves out."""
    present = present_encoders(folder, recipe)
    return {name: weights_sha256(os.path.join(folder, name)) if present[name] else None for name in recipe.encoders}


class SD3TextEncoders:
    """CLIP-L, CLIP-G and (when the folder has it) T5 of an SD3 pipeline folder; see the module docstring."""

    def __init__(self, folder: str, recipe: SD3Recipe, max_length: int, clip_skip: int | None,
                 device: torch.device):
        if not 1 <= max_length <= recipe.t5_max_length:
            raise ValueError(f"max_length={max_length} is T5's max_sequence_length for {recipe.pipeline}, which "
                             f"takes 1 to {recipe.t5_max_length} tokens (it uses 256 by default)")
        self.folder, self.recipe, self.clip_skip, self.device = folder, recipe, clip_skip, device
        present = present_encoders(folder, recipe)
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        self.clips = [self._load(name, tokenizer, CLIPTextModelWithProjection) for name, tokenizer in recipe.clips]
        self.t5 = self._load(*recipe.t5, T5EncoderModel) if present[recipe.t5[0]] else None
        self.clip_length = self._clip_length()
        self._check_clip_skip()
        self.dim = self.t5.model.config.d_model if self.t5 is not None else self._joint_attention_dim()
        self.clip_width = sum(clip.model.config.hidden_size for clip in self.clips)
        if self.clip_width > self.dim:  # the pipeline's F.pad would silently cut the CLIP states
            raise ValueError(f"the CLIP states of {folder} are {self.clip_width} wide, more than T5's {self.dim}: "
                             "not an SD3 pipeline folder the pipeline itself could use")
        self.pooled_dim = sum(clip.model.config.projection_dim for clip in self.clips)
        self.max_length = max_length
        self.length = self.clip_length + max_length

    def _load(self, name: str, tokenizer: str, model_class) -> _Encoder:
        from transformers import AutoTokenizer

        model_dir, tokenizer_dir = os.path.join(self.folder, name), os.path.join(self.folder, tokenizer)
        if not os.path.isdir(tokenizer_dir):
            raise ValueError(f"{self.folder} is a {self.recipe.pipeline} folder with {name}/ but without {tokenizer}/")
        try:
            model = model_class.from_pretrained(model_dir, local_files_only=True)
            tokens = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"could not load {self.recipe.pipeline}'s {name} ({model_class.__name__}) from "
                             f"{model_dir}: {e}") from e
        # float32 always: T5 overflows in fp16, and shards must not depend on the device used.
        return _Encoder(name, model.to(device=self.device, dtype=torch.float32).eval(), tokens)

    def _clip_length(self) -> int:
        length = self.clips[0].tokenizer.model_max_length  # the pipeline's tokenizer_max_length, for both CLIPs
        for clip in self.clips:
            positions = clip.model.config.max_position_embeddings
            if length > positions:
                raise ValueError(f"{self.folder}/tokenizer pads CLIP prompts to {length} tokens (its model_max_length) "
                                 f"but {clip.name} has {positions} positions: set model_max_length in "
                                 "tokenizer/tokenizer_config.json (SD3 uses 77)")
        return length

    def _check_clip_skip(self) -> None:
        if self.clip_skip is None:
            return
        layers = min(clip.model.config.num_hidden_layers for clip in self.clips)
        if not 0 <= self.clip_skip <= layers - 1:
            raise ValueError(f"clip_skip={self.clip_skip} is out of range for {self.folder}: its CLIP encoders have "
                             f"{layers} layers, so clip_skip takes 0 to {layers - 1} (None: the penultimate layer)")

    def _joint_attention_dim(self) -> int:
        """The width of the zeros the pipeline feeds without T5: its transformer's joint_attention_dim."""
        path = os.path.join(self.folder, "transformer", "config.json")
        try:
            with open(path) as f:
                return int(json.load(f)["joint_attention_dim"])
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{self.folder} has no text_encoder_3: its T5 states are zeros of the transformer's "
                             f"joint_attention_dim, which needs {path} ({e})") from None

    def _ids(self, encoder: _Encoder, prompts: list[str], length: int) -> torch.Tensor:
        ids = encoder.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                                return_tensors="pt").input_ids
        if ids.shape[1] != length:  # tokenizers silently skip truncation below their special-token count
            raise ValueError(f"the {encoder.name} tokenizer of {self.folder} produced {ids.shape[1]} tokens, not "
                             f"{length}: raise max_length")
        return ids.to(self.device)

    def _clip(self, encoder: _Encoder, prompts: list[str], clip_skip: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        out = encoder.model(self._ids(encoder, prompts, self.clip_length), output_hidden_states=True)
        layer = -2 if clip_skip is None else -(clip_skip + 2)
        return out.hidden_states[layer], out.text_embeds

    def _t5(self, prompts: list[str]) -> torch.Tensor:
        if self.t5 is None:
            return torch.zeros(len(prompts), self.max_length, self.dim, device=self.device)
        return self.t5.model(self._ids(self.t5, prompts, self.max_length)).last_hidden_state

    def truncated(self, prompts: list[str]) -> torch.Tensor:
        """True where a prompt is longer than T5's max_length (CLIP's without T5): tokenizing to
        length + 1 without padding tells, cheaply even for very long captions."""
        encoder, length = (self.t5, self.max_length) if self.t5 is not None else (self.clips[0], self.clip_length)
        ids = encoder.tokenizer(prompts, truncation=True, max_length=length + 1)["input_ids"]
        return torch.tensor([len(x) > length for x in ids], dtype=torch.bool)

    def encode(self, prompts: list[str], null: bool = False) -> tuple[torch.Tensor, ...]:
        """float32 (states [B, L, D], mask [B, L] all True, pooled [B, P], truncated [B]) on the device;
        ``null``: as the pipeline's negative prompt (the penultimate CLIP layer)."""
        clip_skip = None if null else self.clip_skip
        clip_states, pooled = zip(*(self._clip(clip, prompts, clip_skip) for clip in self.clips))
        clip = F.pad(torch.cat(clip_states, dim=-1), (0, self.dim - self.clip_width))
        states = torch.cat([clip, self._t5(prompts)], dim=-2)
        mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        return states, mask, torch.cat(pooled, dim=-1), self.truncated(prompts)

    def fingerprint(self) -> dict:
        """What identifies these states: every encoder's weights (and one hash over them) and the recipe."""
        hashes = encoder_hashes(self.folder, self.recipe)
        return {"weights_sha256": combined_sha256(hashes), "text_encoders": hashes,
                "dim": self.dim, "pooled_dim": self.pooled_dim, "length": self.length,
                "prompt": {"pipeline": self.recipe.pipeline, "clip_skip": self.clip_skip,
                           "clip_max_length": self.clip_length, "t5_max_length": self.max_length}}
