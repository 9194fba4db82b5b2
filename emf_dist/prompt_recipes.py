"""How a diffusers pipeline turns a prompt into its transformer's text states, for TextEncoder.

A pipeline folder (``model_index.json``) keeps its text encoder in ``text_encoder/`` and its
tokenizer in ``tokenizer/``; what it does around them lives in the pipeline's code. SANA's
pipelines (``SanaPipeline.encode_prompt``):

  * lowercase and strip the prompt;
  * prefix it with the "complex human instruction" (the lines of ``__call__``'s default
    ``complex_human_instruction``, joined by newlines), tokenize to
    ``n_instruction + max_length - 2`` tokens (right padding) and run the encoder;
  * keep the first state (BOS) and the last ``max_length - 1``: the instruction is context the
    caption attends to, not part of the stored states;
  * encode the unconditional prompt "" without the instruction, at ``max_length``.

The instruction is read from the installed diffusers, so it is the pipeline's own; its hash goes
into the encoder fingerprint.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass

# Pipelines whose prompt encoding is SANA's (their transformer is SanaTransformer2DModel).
SANA_PIPELINES = ("SanaPipeline", "SanaPAGPipeline")


@dataclass(frozen=True)
class PromptRecipe:
    pipeline: str
    instruction: str = ""  # prefixed to every caption (not to the unconditional prompt)
    lowercase: bool = False

    def prepare(self, caption: str) -> str:
        return caption.lower().strip() if self.lowercase else caption

    def fingerprint(self) -> dict:
        return {"pipeline": self.pipeline, "lowercase": self.lowercase,
                "instruction_sha256": hashlib.sha256(self.instruction.encode()).hexdigest()}


def pipeline_class(folder: str) -> str | None:
    """The ``_class_name`` of a diffusers pipeline folder; None for any other folder."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("_class_name", "<no _class_name>")


def recipe_for(pipeline: str) -> PromptRecipe:
    if pipeline in SANA_PIPELINES:
        import diffusers

        lines = inspect.signature(getattr(diffusers, pipeline).__call__).parameters["complex_human_instruction"].default
        return PromptRecipe(pipeline=pipeline, instruction="\n".join(lines), lowercase=True)
    raise ValueError(f"the text encoding of {pipeline} is not supported (supported pipelines: "
                     f"{', '.join(SANA_PIPELINES)}); name a plain transformers encoder folder instead, e.g. "
                     "encoder.name=<pipeline>/text_encoder, and check it is what the model was trained with")


def pipeline_parts(folder: str) -> tuple[str, str, PromptRecipe]:
    """(text encoder folder, tokenizer folder, recipe) of a pipeline folder."""
    recipe = recipe_for(pipeline_class(folder))
    model, tokenizer = os.path.join(folder, "text_encoder"), os.path.join(folder, "tokenizer")
    for part in (model, tokenizer):
        if not os.path.isdir(part):
            raise ValueError(f"{folder} is a {recipe.pipeline} folder without {os.path.basename(part)}/")
    return model, tokenizer, recipe
