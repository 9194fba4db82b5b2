"""Seeded, batched generation for evaluations: the text is encoded once, the noise is fixed.

Every sampler configuration of a sweep gets the same noise for image i (drawn once from the
seed), so differences between configurations come from the sampler, not from luck.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from emf_dist.generate import finite_uint8
from emf_dist.model import VelocityNet
from emf_dist.samplers import sample
from emf_dist.text_encoder import EncodedText


@dataclass(frozen=True)
class SamplerSpec:
    model: str  # which model of the evaluation ("meanflow", "flow_matching", or a user label)
    mean_flow: bool  # average-velocity steps (MeanFlow) or Euler steps (flow matching)
    steps: int
    guidance: float = 1.0  # CFG scale; 1 = one network evaluation per step

    @property
    def nfe(self) -> int:
        """Network evaluations per image: CFG runs the network twice per step."""
        return self.steps * (1 if self.guidance == 1.0 else 2)

    @property
    def label(self) -> str:
        cfg = "" if self.guidance == 1.0 else f"-cfg{self.guidance:g}"
        return f"{self.model}-{self.steps}step{cfg}"


def fixed_noise(count: int, model: VelocityNet, seed: int, start: int = 0) -> torch.Tensor:
    """[count, C, H, W] standard normal noise for images start..start+count-1; image i's noise depends
    only on (seed, i), so any chunking of a long prompt list gives the same images."""
    cfg = model.cfg
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    generator = torch.Generator()
    out = torch.empty(count, *shape)
    for k in range(count):
        # torch's CPU generator keeps only 32 bits of a seed: mix (seed, index) into 32 bits first.
        generator.manual_seed(int(np.random.SeedSequence([seed, start + k]).generate_state(1)[0]))
        out[k] = torch.randn(shape, generator=generator)
    return out


@torch.no_grad()
def generate(model: VelocityNet, text: EncodedText, noise: torch.Tensor, spec: SamplerSpec, *,
             batch_size: int = 64, progress: tqdm | None = None) -> np.ndarray:
    """Images [N, H, W, 3] uint8 for N encoded prompts and N noise tensors, in batches."""
    if model.cfg.in_channels != 3:
        raise ValueError(f"the model works in a {model.cfg.in_channels}-channel latent space; evaluation "
                         "needs a pixel-space model (decoding latents needs a VAE, not loaded here)")
    if len(noise) != len(text.tokens):
        raise ValueError(f"{len(noise)} noise tensors for {len(text.tokens)} prompts")
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(noise), batch_size):
        rows = slice(start, start + batch_size)
        images = sample(model, noise[rows].to(device), text.tokens[rows].to(device), text.mask[rows].to(device),
                        text.pooled[rows].to(device), steps=spec.steps, mean_flow=spec.mean_flow,
                        guidance_scale=spec.guidance)
        out.append(finite_uint8(images))
        if progress is not None:
            progress.update(images.shape[0])
    return np.concatenate(out) if out else np.zeros((0, model.cfg.input_size, model.cfg.input_size, 3), np.uint8)
