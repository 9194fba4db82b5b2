"""Seeded, batched generation for evaluations: the text is encoded once, the noise is fixed.

Every sampler configuration of a sweep gets the same noise for image i (drawn once from the
seed), so differences between configurations come from the sampler, not from luck. A latent
model (a fine-tuned diffusers backbone, or our DiT trained on VAE latents) is sampled in its
latent space and decoded by the VAE its export records, as `emf generate` decodes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from emf_dist.backbones.adapter import DiffusersBackbone
from emf_dist.export import ExportInfo, load_model
from emf_dist.generate import check_decodable, decoded_uint8, load_encoder_for, load_vae_for
from emf_dist.model import VelocityNet
from emf_dist.samplers import sample
from emf_dist.text_encoder import EncodedText, TextEncoder
from emf_dist.vae import VaeInfo, spatial_compression

DECODE_BATCH = 8  # latents per VAE decode


@dataclass
class EvalModel:
    """An exported model as the evaluation samples it: the network, the export's description, the text
    encoder the export records, and for a latent model the (autoencoder, VaeInfo) it records."""

    net: VelocityNet | DiffusersBackbone
    info: ExportInfo
    encoder: TextEncoder
    vae: tuple[torch.nn.Module, VaeInfo] | None = None

    def __post_init__(self):
        check_decodable(self.net.cfg, self.vae)

    @property
    def image_size(self) -> int:
        """The side of the images it makes: its input size, times the VAE's compression for a latent model."""
        side = self.net.cfg.input_size
        return side if self.vae is None else side * spatial_compression(self.vae[0])


def load_eval_model(model_dir: str, device: str = "cpu", encoders: dict | None = None) -> EvalModel:
    """An export with its own text encoder and VAE, each checked against the fingerprint it records.
    ``encoders``: fingerprint -> encoder already loaded (models that share one load it once)."""
    net, info = load_model(model_dir, device)
    key = json.dumps(info.encoder_fingerprint, sort_keys=True)
    cache = {} if encoders is None else encoders
    if key not in cache:
        cache[key] = load_encoder_for(info, model_dir, device)
    return EvalModel(net, info, cache[key], load_vae_for(info, model_dir, device))


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


def fixed_noise(count: int, model: VelocityNet | DiffusersBackbone, seed: int, start: int = 0) -> torch.Tensor:
    """[count, C, H, W] standard normal noise for images start..start+count-1 (in the model's latent
    space for a latent model); image i's noise depends only on (seed, i), so any chunking of a long
    prompt list gives the same images."""
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
def generate(model: EvalModel, text: EncodedText, noise: torch.Tensor, spec: SamplerSpec, *,
             batch_size: int = 64, decode_batch: int = DECODE_BATCH, progress: tqdm | None = None) -> np.ndarray:
    """Images [N, H, W, 3] uint8 for N encoded prompts and N noise tensors, ``batch_size`` per network
    call and (latent models) ``decode_batch`` per VAE decode."""
    if len(noise) != len(text.tokens):
        raise ValueError(f"{len(noise)} noise tensors for {len(text.tokens)} prompts")
    net = model.net
    device = next(net.parameters()).device
    out = []
    for start in range(0, len(noise), batch_size):
        rows = slice(start, start + batch_size)
        samples = sample(net, noise[rows].to(device), text.tokens[rows].to(device), text.mask[rows].to(device),
                         text.pooled[rows].to(device), steps=spec.steps, mean_flow=spec.mean_flow,
                         guidance_scale=spec.guidance)
        out.append(decoded_uint8(samples, model.vae, decode_batch))
        if progress is not None:
            progress.update(samples.shape[0])
    return np.concatenate(out) if out else np.zeros((0, model.image_size, model.image_size, 3), np.uint8)
