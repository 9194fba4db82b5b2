"""What differs between the supported diffusers transformers: how to call them, where their time
embedding lives, what EMF trains. One ``Family`` per transformer class.

    SanaTransformer2DModel   text tokens + padding mask (cross-attention), no pooled text
    SD3Transformer2DModel    text tokens (joint attention, no mask) + pooled text
"""

from __future__ import annotations

import torch
import torch.nn as nn

from emf_dist.backbones.dual_time import DualAdaLayerNormSingle, DualTimestepTextProjEmbeddings


class Family:
    name: str
    class_name: str
    time_embedding_attr: str  # the transformer attribute holding the timestep embedding
    # EMF's fine-tune trains these (transformer parameter-name prefixes); everything else is frozen.
    trainable_prefixes: tuple[str, ...]
    uses_text_mask: bool  # whether the pretrained model masks padded text keys

    def problems(self, config) -> list[str]:
        out_channels = config.get("out_channels") or config["in_channels"]
        if out_channels != config["in_channels"]:
            return [f"out_channels {out_channels} != in_channels {config['in_channels']} (a learned-variance "
                    "output); the adapter needs the velocity alone"]
        return []

    def text_dim(self, config) -> int:
        raise NotImplementedError

    def pooled_dim(self, config) -> int:
        return 0

    def dual(self, time_embedding: nn.Module) -> nn.Module:
        raise NotImplementedError

    def call(self, transformer, z, timestep, tokens, mask, pooled) -> torch.Tensor:
        """The velocity e - x; ``mask`` is None when the text keys are not to be masked."""
        raise NotImplementedError


class Sana(Family):
    name, class_name, time_embedding_attr = "sana", "SanaTransformer2DModel", "time_embed"
    trainable_prefixes = ("transformer_blocks.", "time_embed.", "scale_shift_table")
    uses_text_mask = True  # SANA's pipelines pass the Gemma padding mask

    def problems(self, config):
        problems = super().problems(config)
        if config.get("guidance_embeds", False):
            problems.append("guidance_embeds=True (SANA-Sprint's guidance embedding) is not supported")
        return problems

    def text_dim(self, config):
        return config["caption_channels"]

    def dual(self, time_embedding):
        from diffusers.models.normalization import AdaLayerNormSingle

        if not isinstance(time_embedding, AdaLayerNormSingle):
            raise ValueError("expected SANA's time_embed to be an AdaLayerNormSingle, "
                             f"got {type(time_embedding).__name__}")
        return DualAdaLayerNormSingle(time_embedding)

    def call(self, transformer, z, timestep, tokens, mask, pooled):
        # A [B, L] bool mask: the model turns it into the additive bias its cross-attention takes.
        return transformer(hidden_states=z, encoder_hidden_states=tokens, timestep=timestep,
                           encoder_attention_mask=mask, return_dict=False)[0]


class SD3(Family):
    name, class_name, time_embedding_attr = "sd3", "SD3Transformer2DModel", "time_text_embed"
    trainable_prefixes = ("transformer_blocks.", "time_text_embed.timestep_embedder.",
                          "time_text_embed.interval_embedder.", "norm_out.")
    uses_text_mask = False  # SD3 attends to every padded token; its pipeline passes no mask

    def text_dim(self, config):
        return config["joint_attention_dim"]

    def pooled_dim(self, config):
        return config["pooled_projection_dim"]

    def dual(self, time_embedding):
        from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings

        if not isinstance(time_embedding, CombinedTimestepTextProjEmbeddings):
            raise ValueError("expected SD3's time_text_embed to be a CombinedTimestepTextProjEmbeddings, "
                             f"got {type(time_embedding).__name__}")
        return DualTimestepTextProjEmbeddings(time_embedding)

    def call(self, transformer, z, timestep, tokens, mask, pooled):
        # The mask reaches JvpJointAttnProcessor through joint_attention_kwargs (the stock processor
        # would ignore it silently; the adapter always installs ours).
        kwargs = None if mask is None else {"text_mask": mask}
        return transformer(hidden_states=z, encoder_hidden_states=tokens, pooled_projections=pooled,
                           timestep=timestep, joint_attention_kwargs=kwargs, return_dict=False)[0]


FAMILIES: dict[str, Family] = {family.class_name: family for family in (Sana(), SD3())}


def family_for(class_name: str) -> Family:
    if class_name not in FAMILIES:
        raise ValueError(f"unsupported diffusers transformer {class_name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[class_name]
