"""A diffusers text-to-image transformer behind the project's network interface.

    u = net(z, r, t, text_tokens, text_mask, text_pooled, drop_text=None)

as ``emf_dist.model.VelocityNet``: z [B, C, H, W] latents; r, t [B] in [0, 1]; text_tokens
[B, L, D]; text_mask [B, L] bool; text_pooled [B, Dp] (ignored by families without pooled text);
drop_text [B] bool, rows given the null condition (classifier-free guidance). The transformer is
called at timestep = t * num_train_timesteps (``FlowTimeConvention``) and its prediction e - x is
our velocity as it is. Before ``convert_to_meanflow`` the model ignores r (flow matching:
u(z, r, t) = v(z, t)); after, it adds phi_interval(t - r) to its time embedding (dual_time.py).

The JVP-capable attention processors are installed at construction, so the same module serves the
gradient pass (fused SDPA) and the forward-mode JVP pass (exact tangents).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from emf_dist.backbones.attention_processors import install_jvp_processors
from emf_dist.backbones.dual_time import stack_timesteps
from emf_dist.backbones.families import Family
from emf_dist.backbones.time_convention import FlowTimeConvention


@dataclass
class BackboneConfig:
    """What the samplers, the evaluation and the trainer read from ``net.cfg`` (VelocityNet's names)."""

    family: str  # "sana", "sd3"
    class_name: str  # the diffusers transformer class
    input_size: int  # the config's sample_size: the latent side it was trained at
    in_channels: int
    patch_size: int
    text_dim: int  # size of the text token states the transformer takes
    pooled_dim: int  # size of the pooled text vector; 0: the family takes none
    use_text_mask: bool  # whether padded text keys are masked
    time_embedding: Literal["single", "dual"] = "single"  # "dual" after convert_to_meanflow
    checkpointing: bool = False  # diffusers' gradient checkpointing of the blocks, in the gradient pass only


def backbone_config(family: Family, config, use_text_mask: bool | None = None,
                    time_embedding: Literal["single", "dual"] = "single") -> BackboneConfig:
    """The BackboneConfig of a transformer config (its config.json), without loading any weights."""
    return BackboneConfig(
        family=family.name, class_name=family.class_name, input_size=config["sample_size"],
        in_channels=config["in_channels"], patch_size=config["patch_size"], text_dim=family.text_dim(config),
        pooled_dim=family.pooled_dim(config),
        use_text_mask=family.uses_text_mask if use_text_mask is None else use_text_mask,
        time_embedding=time_embedding)


class DiffusersBackbone(nn.Module):
    def __init__(self, transformer: nn.Module, family: Family, time: FlowTimeConvention,
                 use_text_mask: bool | None = None):
        super().__init__()
        config = transformer.config
        problems = family.problems(config)
        if problems:
            raise ValueError(f"{family.class_name} config not supported: " + "; ".join(problems))
        self.transformer, self.family, self.time = transformer, family, time
        # A transformer converted before (a copy of a converted backbone's) keeps its dual embedding.
        dual = hasattr(getattr(transformer, family.time_embedding_attr), "interval_embedder")
        self.cfg = backbone_config(family, config, use_text_mask, "dual" if dual else "single")
        self.processors = install_jvp_processors(transformer)
        # The null condition (CFG's unconditional input): one zero token, the only key kept, and a
        # zero pooled vector until ``set_null_text`` gives the family's encoding of "".
        self.register_buffer("null_tokens", torch.zeros(1, self.cfg.text_dim))
        self.register_buffer("null_mask", torch.ones(1, dtype=torch.bool))
        self.register_buffer("null_pooled", torch.zeros(self.cfg.pooled_dim))

    def forward(self, z, r, t, text_tokens, text_mask, text_pooled, drop_text=None):
        # Text is stored in float16; compute it in the input's precision (float32 in the JVP pass).
        tokens = text_tokens.to(z.dtype)
        if text_mask is None:  # every token real
            text_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        pooled = None if text_pooled is None or not self.cfg.pooled_dim else text_pooled.to(z.dtype)
        if drop_text is not None:
            tokens, text_mask, pooled = self.drop_text(tokens, text_mask, pooled, drop_text)
        self._sync_checkpointing()
        timestep = self.time.model_timestep(t)
        if self.cfg.time_embedding == "dual":
            timestep = stack_timesteps(timestep, self.time.model_timestep(t - r))
        mask = text_mask.bool() if self.cfg.use_text_mask else None
        return self.family.call(self.transformer, z, timestep, tokens, mask, pooled)

    def drop_text(self, tokens, mask, pooled, drop: torch.Tensor):
        """Replace the text of rows where ``drop`` is True by the null condition, padded or cut to length L.

        Done inside forward (like VelocityNet) so wrappers that gather state around forward see it."""
        length = tokens.shape[1]
        n = min(length, self.null_tokens.shape[0])
        null_tokens = tokens.new_zeros(tokens.shape[1:])
        null_tokens[:n] = self.null_tokens[:n].to(tokens.dtype)
        null_mask = mask.new_zeros(mask.shape[1:])
        null_mask[:n] = self.null_mask[:n].to(mask.dtype)
        keep = ~drop
        tokens = torch.where(keep[:, None, None], tokens, null_tokens)
        mask = torch.where(keep[:, None], mask, null_mask)
        if pooled is not None:
            pooled = torch.where(keep[:, None], pooled, self.null_pooled.to(pooled.dtype))
        return tokens, mask, pooled

    @torch.no_grad()
    def set_null_text(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None):
        """Set the null condition from the family's encoding of the empty prompt "" ([L, D], [L] bool, [Dp]),
        which is what diffusers pipelines feed as the unconditional input. Give it at the training text's
        padded length L (SD3 attends to every padded token, so a shorter null would not be the pipeline's)."""
        tokens = tokens.reshape(-1, self.cfg.text_dim)
        mask = torch.ones(tokens.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
        if mask.shape[0] != tokens.shape[0] or not mask.any():
            raise ValueError(f"the null mask needs one entry per null token ({tokens.shape[0]}) and one kept key")
        pooled = torch.zeros(self.cfg.pooled_dim) if pooled is None else pooled.reshape(-1)
        if pooled.shape[0] != self.cfg.pooled_dim:
            raise ValueError(f"null pooled vector has {pooled.shape[0]} values, the model takes {self.cfg.pooled_dim}")
        device = self.null_tokens.device
        self.null_tokens, self.null_mask = tokens.to(device, torch.float32), mask.to(device)
        self.null_pooled = pooled.to(device, torch.float32)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The null condition's length is the empty prompt's: take the saved shape.
        for name in ("null_tokens", "null_mask", "null_pooled"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _sync_checkpointing(self):
        """Follow ``cfg.checkpointing`` (the trainer sets it like VelocityNet's). diffusers checkpoints
        only when gradients are recorded, so the no-grad JVP pass never recomputes anything."""
        if self.transformer.gradient_checkpointing != self.cfg.checkpointing:
            if self.cfg.checkpointing:
                self.transformer.enable_gradient_checkpointing()
            else:
                self.transformer.disable_gradient_checkpointing()
