"""Few-step samplers: k-step MeanFlow and N-step Euler flow matching, with optional CFG.

Both walk t_0 = 1 > t_1 > ... > t_k = 0 with

    z_{t_{i+1}} = z_{t_i} - (t_i - t_{i+1}) u

MeanFlow evaluates the average velocity u(z, r = t_{i+1}, t = t_i), exact for a perfect
network whatever k; flow matching evaluates the instantaneous velocity u(z, t, t), which
is Euler's method on the probability-flow ODE. One step of MeanFlow: x = z_1 - u(z_1, 0, 1).
Classifier-free guidance at sampling costs a second evaluation per step:
u = u_uncond + scale (u_cond - u_uncond); a model trained with guidance folded into its
target (MeanFlowConfig.guidance_w) needs scale 1.

The text is the same at every step, so the steps evaluate ``conditioned``: for our DiT the text's
share of a forward (its projections, each block's cross-attention keys and values) is computed once
per batch instead of once per step; any other backbone is called whole at every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

# u = velocity_of(z, r, t): a network's prediction with its text bound
VelocityOf = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample(net: nn.Module, noise: torch.Tensor, text_tokens, text_mask, text_pooled, *, steps: int = 1,
           mean_flow: bool = True, guidance_scale: float = 1.0, drop_text: torch.Tensor | None = None) -> torch.Tensor:
    """Generate from ``noise`` [B, C, H, W] in ``steps`` network evaluations (twice that with CFG).
    ``drop_text`` [B] bool: rows sampled unconditionally (the model's null condition) and unguided; the
    other rows take ``guidance_scale``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    batch = noise.shape[0]
    times = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    velocity_of = conditioned(net, text_tokens, text_mask, text_pooled, guidance_scale, drop_text, noise.dtype)
    z = noise
    for t_now, t_next in zip(times[:-1], times[1:]):
        t = t_now.expand(batch)
        r = t_next.expand(batch) if mean_flow else t
        z = z - (t_now - t_next) * velocity_of(z, r, t)
    return z


def conditioned(net, text_tokens, text_mask, text_pooled, guidance_scale: float = 1.0,
                drop_text: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> VelocityOf:
    """The network's (guided) prediction as a function of (z, r, t), its text bound; rows in ``drop_text``
    take the null condition and no guidance. ``dtype``: the inputs' z. Our DiT's text share is computed
    here, once, reading every parameter directly: a ZeRO-3-partitioned model needs its weights gathered."""
    if guidance_scale == 1.0:
        return _text_bound(net, text_tokens, text_mask, text_pooled, drop_text, dtype)
    velocity_of = _text_bound(net, *_cond_and_uncond_text(text_tokens, text_mask, text_pooled), dtype)

    def guided_velocity(z, r, t):
        u_cond, u_uncond = velocity_of(_both(z), _both(r), _both(t)).chunk(2)
        guided = u_uncond + guidance_scale * (u_cond - u_uncond)
        return guided if drop_text is None else torch.where(drop_text.view(-1, 1, 1, 1), u_uncond, guided)
    return guided_velocity


def _text_bound(net, text_tokens, text_mask, text_pooled, drop_text, dtype) -> VelocityOf:
    if not hasattr(net, "text_context"):  # a backbone that takes its text whole at every call
        return lambda z, r, t: net(z, r, t, text_tokens, text_mask, text_pooled, drop_text)
    text = net.text_context(text_tokens, text_mask, text_pooled, drop_text, dtype)
    return lambda z, r, t: net.velocity(z, r, t, text)


def cond_and_uncond(net, z, r, t, text_tokens, text_mask, text_pooled) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's conditional and unconditional predictions, in one doubled batch."""
    u = net(_both(z), _both(r), _both(t), *_cond_and_uncond_text(text_tokens, text_mask, text_pooled))
    return u.chunk(2)


def _both(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x])


def _cond_and_uncond_text(text_tokens, text_mask, text_pooled) -> tuple[torch.Tensor, ...]:
    """The text twice over and the drop flags of the doubled batch: its second half takes the null condition."""
    batch = text_tokens.shape[0]
    drop = torch.arange(2 * batch, device=text_tokens.device) >= batch
    return _both(text_tokens), _both(text_mask), _both(text_pooled), drop
