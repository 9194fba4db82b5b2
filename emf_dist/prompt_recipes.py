"""How a diffusers pipeline turns a prompt into its transformer's text states, for TextEncoder.

One recipe per pipeline family; what a pipeline does around its encoders lives in its code, so
each recipe here follows one ``encode_prompt``.

SANA's pipelines (``SanaPipeline.encode_prompt``), one Gemma-2 in ``text_encoder/`` with its
tokenizer in ``tokenizer/`` (``PromptRecipe``):

  * lowercase and strip the prompt;
  * prefix it with the "complex human instruction" (the lines of ``__call__``'s default
    ``complex_human_instruction``, joined by newlines), tokenize to
    ``n_instruction + max_length - 2`` tokens (right padding) and run the encoder;
  * keep the first state (BOS) and the last ``max_length - 1``: the instruction is context the
    caption attends to, not part of the stored states;
  * encode the unconditional prompt "" without the instruction, at ``max_length``.

The instruction is read from the installed diffusers, so it is the pipeline's own; its hash goes
into the encoder fingerprint.

SD3's pipeline (``StableDiffusion3Pipeline.encode_prompt``), three encoders (``SD3Recipe``;
emf_dist/sd3_text_encoders.py encodes with them): CLIP-L and CLIP-G give their penultimate hidden
states (``clip_skip`` layers further back) and pooled text embeddings, T5 its last hidden states;
see that module for how they are joined.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass

# Pipelines whose prompt encoding is SANA's (their transformer is SanaTransformer2DModel).
SANA_PIPELINES = ("SanaPipeline", "SanaPAGPipeline")
# Pipelines whose prompt encoding is SD3's (their transformer is SD3Transformer2DModel).
SD3_PIPELINES = ("StableDiffusion3Pipeline",)


@dataclass(frozen=True)
class PromptRecipe:
    """A single-encoder pipeline's prompt handling (``text_encoder/`` + ``tokenizer/``)."""
    pipeline: str
    instruction: str = ""  # prefixed to every caption (not to the unconditional prompt)
    lowercase: bool = False

    def prepare(self, caption: str) -> str:
        return caption.lower().strip() if self.lowercase else caption

    def fingerprint(self) -> dict:
        return {"pipeline": self.pipeline, "lowercase": self.lowercase,
                "instruction_sha256": hashlib.sha256(self.instruction.encode()).hexdigest()}


@dataclass(frozen=True)
class SD3Recipe:
    """SD3's encoders by component name: (encoder, tokenizer) of CLIP-L, CLIP-G and T5 (the last may
    be left out of a pipeline folder, as diffusers allows: the pipeline then feeds zeros)."""
    pipeline: str
    clips: tuple[tuple[str, str], ...] = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    t5: tuple[str, str] = ("text_encoder_3", "tokenizer_3")
    # StableDiffusion3Pipeline.check_inputs refuses a longer max_sequence_length.
    t5_max_length: int = 512

    @property
    def encoders(self) -> tuple[str, ...]:
        return tuple(encoder for encoder, _ in self.clips) + (self.t5[0],)


def pipeline_class(folder: str) -> str | None:
    """The ``_class_name`` of a diffusers pipeline folder; None for any other folder."""
    index = model_index(folder)
    return None if index is None else index.get("_class_name", "<no _class_name>")


def model_index(folder: str) -> dict | None:
    """A pipeline folder's model_index.json; None for any other folder."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def recipe_for(pipeline: str) -> PromptRecipe | SD3Recipe:
    if pipeline in SANA_PIPELINES:
        import diffusers

        lines = inspect.signature(getattr(diffusers, pipeline).__call__).parameters["complex_human_instruction"].default
        return PromptRecipe(pipeline=pipeline, instruction="\n".join(lines), lowercase=True)
    if pipeline in SD3_PIPELINES:
        return SD3Recipe(pipeline=pipeline)
    raise ValueError(f"the text encoding of {pipeline} is not supported (supported pipelines: "
                     f"{', '.join(SANA_PIPELINES + SD3_PIPELINES)}); name a plain transformers encoder folder "
                     "instead, e.g. encoder.name=<pipeline>/text_encoder, and check it is what the model was "
                     "trained with")


def pipeline_parts(folder: str, recipe: PromptRecipe) -> tuple[str, str]:
    """(text encoder folder, tokenizer folder) of a single-encoder pipeline folder."""
    model, tokenizer = os.path.join(folder, "text_encoder"), os.path.join(folder, "tokenizer")
    for part in (model, tokenizer):
        if not os.path.isdir(part):
            raise ValueError(f"{folder} is a {recipe.pipeline} folder without {os.path.basename(part)}/")
    return model, tokenizer
