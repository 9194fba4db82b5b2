"""Image handling: decode -> RGB -> resize the shorter side -> center crop; PNG bytes.

Decoding and resizing run in the loader actors (CPU); latents (emf_dist/vae.py) run in the
encoder actors, next to the text encoder, so the VAE also loads once per actor and uses its GPU.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from emf_dist.manifest import IMAGE_MEMBERS
from emf_dist.storage import is_remote


@dataclass
class ImageConfig:
    # "png" or "uint8" store pixels; "latent" stores VAE latents (needs vae).
    kind: Literal["png", "uint8", "latent"] = "png"
    # Images are resized (shorter side) and center-cropped to this square size.
    resolution: int = 32
    # latent: a folder, local or s3://..., holding a diffusers AutoencoderKL or AutoencoderDC
    # (config.json + weights), or a diffusers pipeline folder (its vae/ is used).
    vae: str | None = None
    # latent: multiply latents by this; None takes the VAE config's scaling_factor (its
    # shift_factor, if any, is always subtracted first).
    vae_scale_factor: float | None = None
    # latent: images per VAE forward pass.
    vae_batch_size: int = 32

    def validate(self) -> list[str]:
        problems = []
        if self.kind not in IMAGE_MEMBERS:
            problems.append(f"kind must be one of {sorted(IMAGE_MEMBERS)}, got {self.kind!r}")
        if self.resolution < 8:
            problems.append(f"resolution must be >= 8, got {self.resolution}")
        if self.kind == "latent" and not self.vae:
            problems.append("kind 'latent' needs vae: a folder holding a diffusers AutoencoderKL or "
                            "AutoencoderDC, or a diffusers pipeline folder")
        if self.kind == "latent" and self.vae and not is_remote(self.vae) \
                and not os.path.isdir(os.path.expanduser(self.vae)):
            problems.append(f"vae {self.vae!r} is not a folder (save one with the autoencoder's save_pretrained)")
        if self.kind != "latent" and self.vae:
            problems.append(f"vae is set but kind is {self.kind!r}: use kind=latent to store latents")
        if self.vae_batch_size < 1:
            problems.append("vae_batch_size must be >= 1")
        return problems


def decode(data: bytes | np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [resolution, resolution, 3]; raises ValueError when the data is not a usable image."""
    if isinstance(data, np.ndarray):
        return _fit_array(data, resolution)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":  # decode at reduced scale when much larger: several times faster
                img.draft("RGB", (resolution, resolution))
            rgb = to_rgb(img)  # forces the full decode: truncated files fail here
    except UnsupportedImage:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise ValueError(f"not a readable image: {type(e).__name__}: {e}") from None
    return _fit(rgb, resolution)


class UnsupportedImage(ValueError):
    """A readable image whose pixels have no agreed 8-bit meaning (32-bit or float channels)."""
    reason = "unsupported_image_mode"


# 16-bit grayscale (PNG, TIFF). Pillow's convert("RGB") clips these at 255 instead of scaling:
# a 16-bit PNG came out 99.8% white. 16-bit RGB(A) PNGs Pillow already reduces to 8 bits itself.
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, scaling high-depth grayscale to 0..255 rather than clipping it."""
    if img.mode in _SIXTEEN_BIT:
        scaled = np.round(np.asarray(img, dtype=np.float32) / 257.0)  # 65535 -> 255 exactly
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if img.mode in ("I", "F"):
        raise UnsupportedImage(f"{'32-bit integer' if img.mode == 'I' else 'floating-point'} pixels (mode "
                               f"{img.mode}) have no agreed 8-bit range")
    return img.convert("RGB")


def _fit(img: Image.Image, resolution: int) -> np.ndarray:
    if img.size != (resolution, resolution):
        img = ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    return np.asarray(img, dtype=np.uint8)


def _fit_array(array: np.ndarray, resolution: int) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"not an image array: dtype {array.dtype}, shape {list(array.shape)} "
                         "(expected uint8 [H, W, 1|3|4])")
    if array.shape == (resolution, resolution, 3):
        return array
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[2]]
    return _fit(Image.fromarray(array.squeeze(2) if mode == "L" else array, mode).convert("RGB"), resolution)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Level 1: small images compress nearly as well, and it is several times faster than 6.
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
