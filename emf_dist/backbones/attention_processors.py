"""Attention processors for diffusers transformers that work in both passes of the MeanFlow step.

diffusers' SDPA processors call ``F.scaled_dot_product_attention``, whose fused kernels have no
forward-mode derivative (the JVP pass fails, or falls back to N x N math attention under
``SDPBackend.MATH``). These twins compute the same projections and call
``emf_dist.attention.attention``: fused SDPA when no input carries a tangent, the exact blockwise
(or Triton) tangent when one does.

SANA's linear self-attention (SanaLinearAttnProcessor2_0) is plain matmuls and ReLUs, which forward
AD differentiates as they are; it is left in place.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from emf_dist.attention import attention


def _heads(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """[B, N, H * d] -> [B, H, N, d]"""
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, d] -> [B, N, H * d]"""
    return x.transpose(1, 2).flatten(2)


def key_mask_from_bias(mask: torch.Tensor | None, batch: int, keys: int) -> torch.Tensor | None:
    """A [B, keys] bool mask (True = attend) from what SanaTransformer2DModel hands its cross-attention.

    The model turns a [B, L] 0/1 or bool mask into an additive bias (1 - m) * -10000 of shape
    [B, 1, L]. Softmax weights exp(-10000) underflow to exactly 0 in float32 and float64, so keep
    (bias 0) / drop (bias -10000) is the same attention as the bias, as long as a row keeps a key.
    """
    if mask is None:
        return None
    if mask.numel() != batch * keys:
        raise ValueError(f"expected a key mask of {batch} x {keys} (one row per sample, not per query or head), "
                         f"got shape {tuple(mask.shape)}")
    mask = mask.reshape(batch, keys)
    return mask if mask.dtype == torch.bool else mask == 0


class JvpSanaAttnProcessor:
    """SanaAttnProcessor2_0 (SANA's cross-attention to the caption) through ``emf_dist.attention``."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        # SANA normalises across heads, before the split (as the original processor does).
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        key_mask = key_mask_from_bias(attention_mask, batch, context.shape[1])
        out = attention(_heads(query, batch, attn.heads), _heads(key, batch, attn.heads),
                        _heads(value, batch, attn.heads), key_mask)
        out = attn.to_out[1](attn.to_out[0](_merge(out).to(query.dtype)))
        return out / attn.rescale_output_factor


class JvpJointAttnProcessor:
    """JointAttnProcessor2_0 (SD3's MMDiT attention over image and text tokens) through ``emf_dist.attention``.

    ``text_mask`` [B, L] bool (passed through ``joint_attention_kwargs``) masks padded text keys. SD3
    itself is trained attending to every (padded) text token and its pipeline passes no mask, so the
    adapter passes one only when asked to.
    """

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("SD3's joint attention takes no attention_mask; pass text_mask [B, L] bool instead")
        batch, image_tokens = hidden_states.shape[:2]
        split = lambda x: _heads(x, batch, attn.heads)  # noqa: E731
        query, key, value = (split(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        # SD3 normalises per head, after the split.
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        key_mask = None
        if encoder_hidden_states is not None:
            text_q = split(attn.add_q_proj(encoder_hidden_states))
            text_k = split(attn.add_k_proj(encoder_hidden_states))
            text_v = split(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query, key, value = (torch.cat(pair, dim=2) for pair in ((query, text_q), (key, text_k), (value, text_v)))
            if text_mask is not None:
                image_keys = torch.ones(batch, image_tokens, dtype=torch.bool, device=text_mask.device)
                key_mask = torch.cat([image_keys, text_mask.bool()], dim=1)
        out = _merge(attention(query, key, value, key_mask)).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, text_out = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return attn.to_out[1](attn.to_out[0](out)), text_out


def _replacements() -> dict[type, type]:
    from diffusers.models.attention_processor import JointAttnProcessor2_0, SanaLinearAttnProcessor2_0
    from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

    return {
        SanaAttnProcessor2_0: JvpSanaAttnProcessor,
        JointAttnProcessor2_0: JvpJointAttnProcessor,
        SanaLinearAttnProcessor2_0: None,  # forward AD handles it: keep
    }


def install_jvp_processors(transformer: nn.Module) -> dict[str, str]:
    """Replace every SDPA processor of ``transformer`` by its JVP-capable twin, per attention module.

    An attention module with a processor not in the table is an error: it would fail (or fall back
    to N x N math attention) in the JVP pass. Returns {module name: processor class now installed}.
    """
    table = _replacements()
    ours = {JvpSanaAttnProcessor, JvpJointAttnProcessor}
    installed = {}
    for name, module in transformer.named_modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(module, "set_processor"):
            continue
        kind = type(processor)
        if kind not in table and kind not in ours:
            raise ValueError(f"attention {name!r} uses {kind.__name__}, which has no JVP-capable replacement; "
                             f"known: {', '.join(k.__name__ for k in table)}")
        if table.get(kind) is not None:
            module.set_processor(table[kind]())
        installed[name] = type(module.processor).__name__
    return installed
