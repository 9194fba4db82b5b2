"""Text to image with an exported model: encode the prompts, sample (decode latents with the
model's VAE), write PNGs."""

from __future__ import annotations

import errno
import math
import os

import numpy as np
import torch
from PIL import Image

from emf_dist.errors import InputError
from emf_dist.export import ExportInfo, load_model
from emf_dist.samplers import sample
from emf_dist.text_encoder import TextEncoder, check_fingerprint
from emf_dist.vae import VaeInfo, check_vae, decode_latents, describe_vae, load_vae


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def finite_uint8(images: torch.Tensor) -> np.ndarray:
    """``to_uint8`` for generated images, refusing NaN/inf: clamping would turn them into black or
    white pictures that look like a (bad) result instead of an error."""
    bad = (~torch.isfinite(images)).flatten(1).any(1)
    if bad.any():
        raise InputError(f"the model's output is not finite (NaN or inf) for {int(bad.sum())} of {len(images)} "
                         "images: its weights are damaged or its training diverged; re-export it, or train again "
                         "from the last good checkpoint")
    return to_uint8(images)


def check_sampling(steps: int | None, guidance_scale: float | None) -> None:
    """Sampler options from a user: None means the model's own default; anything else must be usable."""
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1 (network evaluations per image), got {steps}; leave it out for the "
                         "model's own default")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise ValueError(f"guidance must be a finite number (1 = no guidance), got {guidance_scale}")


def check_output_file(path: str | os.PathLike) -> None:
    """Before any work: an output PNG path that is a folder, or lies below a file, fails now, not
    after sampling."""
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), parent)


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile [N, H, W, 3] images into one [rows*(H+pad), columns*(W+pad), 3] picture."""
    count, height, width, _ = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, 3), 40, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (height + pad), pad + (i % columns) * (width + pad)
        grid[top:top + height, left:left + width] = image
    return grid


def save_png(image: np.ndarray, path: str | os.PathLike, upscale: int = 1) -> None:
    """Write atomically; ``upscale`` enlarges tiny images with nearest-neighbour for viewing."""
    picture = Image.fromarray(image)
    if upscale > 1:
        picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial"
    try:
        picture.save(partial, format="PNG")
        os.replace(partial, path)
    except BaseException:
        if os.path.isfile(partial):  # never leave a half-written or unpublished file behind
            os.remove(partial)
        raise


def load_encoder_for(info: ExportInfo, model_dir: str, device="cpu") -> TextEncoder:
    """The text encoder the model was trained with, checked against the recorded fingerprint."""
    encoder = TextEncoder(info.text_encoder, device=device)
    check_fingerprint(info.encoder_fingerprint, encoder.fingerprint(),
                      what_expected=f"the model ({model_dir})", what_actual="the text encoder loaded here")
    return encoder


def load_vae_for(info: ExportInfo, model_dir: str, device="cpu") -> tuple | None:
    """(the autoencoder, its VaeInfo) of a latent model, checked against the recorded fingerprint."""
    if info.vae is None:
        return None
    vae = load_vae(info.vae.source, device)
    check_vae(info.vae, describe_vae(info.vae.source, vae, info.vae.scaling_factor),
              what_expected=f"the model ({model_dir})", what_actual="the VAE loaded here")
    return vae, info.vae


def check_decodable(cfg, vae: tuple | None) -> None:
    """A latent model's samples are pictures only once its VAE decodes them."""
    if cfg.in_channels != 3 and vae is None:
        raise ValueError(f"this model works in a {cfg.in_channels}-channel latent space; decoding its samples "
                         "needs the VAE it was trained with (an export records it as vae)")


def decoded_uint8(samples: torch.Tensor, vae: tuple[torch.nn.Module, VaeInfo] | None,
                  batch_size: int | None = None) -> np.ndarray:
    """A model's samples [N, C, h, w] as images [N, H, W, 3] uint8: a latent model's decoded by ``vae``
    (module, VaeInfo) first, ``batch_size`` latents per decode (a VAE decode at full resolution holds
    far more memory than the transformer's step); non-finite images are refused."""
    if vae is None or len(samples) == 0:
        return finite_uint8(samples)
    step = batch_size or len(samples)
    return np.concatenate([finite_uint8(decode_latents(vae[0], vae[1], samples[i:i + step]))
                           for i in range(0, len(samples), step)])


@torch.no_grad()
def generate_images(model: torch.nn.Module, encoder: TextEncoder, prompts: list[str], *, steps: int, seed: int,
                    mean_flow: bool = True, guidance_scale: float = 1.0,
                    vae: tuple[torch.nn.Module, VaeInfo] | None = None) -> np.ndarray:
    """One image per prompt, [N, H, W, 3] uint8; image i depends only on (seed, i, prompt i).
    ``vae`` (module, VaeInfo) decodes a latent model's samples."""
    cfg = model.cfg
    check_decodable(cfg, vae)
    device = next(model.parameters()).device
    text = encoder.encode(prompts)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), cfg.in_channels, cfg.input_size, cfg.input_size, generator=generator)
    images = sample(model, noise.to(device), text.tokens.to(device), text.mask.to(device), text.pooled.to(device),
                    steps=steps, mean_flow=mean_flow, guidance_scale=guidance_scale)
    return decoded_uint8(images, vae)


def generate_to_file(model_dir: str, prompts: list[str], out: str, *, steps: int | None = None, seed: int = 0,
                     guidance_scale: float | None = None, upscale: int = 1, device: str = "cpu") -> str:
    """What ``emf generate`` does: one PNG (a grid when several prompts are given)."""
    if not prompts:
        raise ValueError("give at least one prompt")
    check_sampling(steps, guidance_scale)
    check_output_file(out)
    model, info = load_model(model_dir, device)
    encoder = load_encoder_for(info, model_dir, device)
    images = generate_images(model, encoder, prompts, steps=info.sampling.steps if steps is None else steps, seed=seed,
                             mean_flow=info.sampling.mean_flow,
                             guidance_scale=info.sampling.guidance_scale if guidance_scale is None else guidance_scale,
                             vae=load_vae_for(info, model_dir, device))
    save_png(images[0] if len(prompts) == 1 else image_grid(images), out, upscale=upscale)
    return out
