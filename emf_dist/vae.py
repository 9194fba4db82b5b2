"""The image autoencoder of a latent dataset: load it, encode pixels to latents, decode them back.

Shards of ``image.kind: latent`` hold (mean - shift_factor) * scaling_factor, which is what
diffusers' flow pipelines feed their transformer: SD3 and FLUX (AutoencoderKL with a
shift_factor), SANA (AutoencoderDC, deterministic encoder, no shift), SD 1/2/XL (AutoencoderKL,
no shift). Decoding inverts it. ``VaeInfo`` is what a manifest and an export record so that
data, training and generation can insist on the same autoencoder.

A VAE is named by its folder (config.json + weights) or by a diffusers pipeline folder, whose
``vae/`` is taken, local or on object storage (copied once per node, emf_dist/folder_cache.py;
the record keeps the URL, which every machine can read). Nothing touches the hub.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from emf_dist import storage
from emf_dist.folder_cache import local_copy

SUPPORTED = ("AutoencoderKL", "AutoencoderDC")


@dataclass
class VaeInfo:
    source: str                 # the folder the weights were read from (a pipeline's vae/), or its URL
    class_name: str             # the diffusers class
    sha256: str                 # hash of the weight files: the identity that is compared
    scaling_factor: float
    shift_factor: float | None = None  # subtracted before scaling (SD3, FLUX); None: no shift


def vae_source(path: str) -> str:
    """The VAE's own folder as a record names it: ``path`` itself, or a pipeline folder's vae/ (a URL
    for one on object storage)."""
    if storage.is_remote(path):  # told by its small files: the pipeline's other parts are not copied
        store = storage.Store(path)
        pipeline, has_vae = store.exists("model_index.json"), store.exists("vae", "config.json")
        url = path.rstrip("/")
        folder = f"{url}/vae" if pipeline else url
    else:
        url = os.path.abspath(os.path.expanduser(path))
        pipeline = os.path.isfile(os.path.join(url, "model_index.json"))
        has_vae = os.path.isfile(os.path.join(url, "vae", "config.json"))
        folder = os.path.join(url, "vae") if pipeline else url
    if pipeline and not has_vae:
        raise ValueError(f"{url} is a diffusers pipeline without a vae/ folder")
    return folder


def vae_folder(path: str) -> str:
    """The local folder holding the VAE's config.json: ``path`` itself, or a pipeline folder's vae/."""
    return local_copy(vae_source(path))


def vae_class_name(folder: str) -> str:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            name = json.load(f).get("_class_name")
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"no readable diffusers VAE config at {path}: {err}") from None
    if name not in SUPPORTED:
        raise ValueError(f"{folder} holds a {name!r}; supported autoencoders: {', '.join(SUPPORTED)}")
    return name


def load_vae(path: str, device: str = "cpu") -> Any:
    """The diffusers autoencoder of ``path`` (a VAE or pipeline folder), in float32, eval mode."""
    import diffusers
    import torch

    folder = vae_folder(path)
    name = vae_class_name(folder)
    try:
        vae = getattr(diffusers, name).from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load a diffusers {name} from {folder}: {e}") from e
    return vae.to(device=device, dtype=torch.float32).eval()


def describe_vae(path: str, vae: Any, scale_override: float | None = None) -> VaeInfo:
    """What identifies the loaded ``vae`` of ``path`` and how latents are normalised."""
    from emf_dist.weight_hash import weights_sha256

    folder = vae_folder(path)
    scale = scale_override if scale_override is not None else getattr(vae.config, "scaling_factor", None)
    if scale is None:
        raise ValueError("the VAE config has no scaling_factor: set image.vae_scale_factor")
    shift = getattr(vae.config, "shift_factor", None)
    return VaeInfo(source=vae_source(path), class_name=type(vae).__name__, sha256=weights_sha256(folder),
                   scaling_factor=float(scale), shift_factor=None if shift is None else float(shift))


def _posterior(vae: Any, x):
    encoded = vae.encode(x)
    # AutoencoderKL's posterior mean: deterministic, so reruns of a shard give the same bytes.
    return encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latent


def encode_images(vae: Any, info: VaeInfo, images: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float16 [N, C, h, w] normalised latents."""
    import torch

    device = next(vae.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            latent = (_posterior(vae, x) - (info.shift_factor or 0.0)) * info.scaling_factor
            out.append(latent.to(torch.float16).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,), np.float16)


def decode_latents(vae: Any, info: VaeInfo, latents):
    """Normalised latents [N, C, h, w] -> images [N, 3, H, W] in [-1, 1] (float32, on the VAE's device)."""
    import torch

    reference = next(vae.parameters())
    with torch.inference_mode():
        z = latents.to(reference.device, reference.dtype) / info.scaling_factor + (info.shift_factor or 0.0)
        return vae.decode(z).sample.float().clamp(-1, 1)


def spatial_compression(vae: Any) -> int:
    """Pixels per latent cell along a side, as diffusers' pipelines compute it (their vae_scale_factor):
    one halving per encoder stage after the first."""
    config = vae.config
    stages = config.get("encoder_block_out_channels") or config.get("block_out_channels")  # DC-AE, KL
    if not stages:
        raise ValueError(f"cannot tell the compression of a {type(vae).__name__}: its config names no block "
                         "output channels")
    return 2 ** (len(stages) - 1)


def check_vae(expected: VaeInfo | dict, actual: VaeInfo | dict, *, what_expected: str, what_actual: str) -> None:
    """Raise ValueError naming both autoencoders (folder, class, hash) when their weights or
    normalisation differ; the folders may differ (a copy on another machine)."""
    want = expected if isinstance(expected, dict) else vars(expected)
    got = actual if isinstance(actual, dict) else vars(actual)
    fields = ("sha256", "class_name", "scaling_factor", "shift_factor")
    diffs = [f"{k} {_short(want.get(k))} != {_short(got.get(k))}" for k in fields if want.get(k) != got.get(k)]
    if diffs:
        raise ValueError(f"VAE mismatch between {what_expected} ({want.get('source')}) and {what_actual} "
                         f"({got.get('source')}): " + "; ".join(diffs))


def _short(value) -> str:
    return value[:12] + ".." if isinstance(value, str) and len(value) == 64 else repr(value)
