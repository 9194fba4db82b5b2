"""Text (and optional VAE) encoding: a Ray Data actor that loads its models once.

`ShardEncoder` is the callable class given to ``map_batches``: Ray Data creates a fixed pool
of them, each loads the text encoder (and the VAE for latents) in ``__init__`` and then
encodes shard after shard. With ``ray.encoder_gpus > 0`` each actor holds that share of a
GPU and runs on CUDA. `describe_models` loads the same models once before the pipeline
starts, to get what the plan and manifest record: the encoder fingerprint and every shape.
"""
from __future__ import annotations

import time

import numpy as np

from data_prep.config import PrepConfig
from data_prep.images import ImageConfig
from data_prep.shard import ShardBatch, pack, unpack
from emf_dist.manifest import ImageSpec
from emf_dist.text_encoder import TextEncoder, TextEncoderConfig
from emf_dist.vae import describe_vae, encode_images, load_vae


def _device(gpus: float) -> str:
    return "cuda" if gpus > 0 else "cpu"


class ShardEncoder:
    """Ray Data actor: captions -> token states, mask, pooled (+ images -> latents)."""

    def __init__(self, encoder: TextEncoderConfig, batch_size: int, image: ImageConfig, threads: int, gpus: float):
        import torch
        torch.set_num_threads(threads)  # Ray reserved `encoder_cpus`; more threads only contend
        device = _device(gpus)
        self.encoder = TextEncoder(encoder, device)
        self.batch_size, self.image = batch_size, image
        self.vae = load_vae(image.vae, device) if image.kind == "latent" else None
        self.vae_info = describe_vae(image.vae, self.vae, image.vae_scale_factor) if self.vae is not None else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return pack(self.encode(unpack(batch)))

    def encode(self, shard: ShardBatch) -> ShardBatch:
        if shard.error or not len(shard):
            return shard
        started = time.perf_counter()
        text = self.encoder.encode(shard.captions, batch_size=self.batch_size)
        shard.tokens, shard.mask, shard.pooled = text.tokens.numpy(), text.mask.numpy(), text.pooled.numpy()
        shard.truncated = int(text.truncated.sum())
        if self.vae is not None:
            shard.latents = encode_images(self.vae, self.vae_info, shard.images, self.image.vae_batch_size)
            shard.images = None  # latents replace pixels in the shard: do not ship them on
        shard.seconds["encode"] = time.perf_counter() - started
        return shard


def describe_models(cfg: PrepConfig) -> dict:
    """What the shards will hold, from the real models: {"encoder": fingerprint, "text_shapes",
    "dtypes", "image": ImageSpec as a dict}. Runs as a Ray task with an encoder actor's resources."""
    device = _device(cfg.ray.encoder_gpus)
    encoder = TextEncoder(cfg.encoder, device)
    L, D, P = encoder.length, encoder.dim, encoder.pooled_dim  # SD3: L and P are not max_length and D
    image = cfg.image
    spec = ImageSpec(kind=image.kind, resolution=image.resolution, shape=[3, image.resolution, image.resolution])
    dtypes = {"tokens": cfg.encoder.dtype, "mask": "bool", "pooled": cfg.encoder.dtype, "image": "uint8"}
    if image.kind == "latent":
        vae = load_vae(image.vae, device)
        info = describe_vae(image.vae, vae, image.vae_scale_factor)
        probe = np.zeros((1, image.resolution, image.resolution, 3), np.uint8)
        spec.shape = list(encode_images(vae, info, probe, 1).shape[1:])
        spec.scale_factor, spec.shift_factor = info.scaling_factor, info.shift_factor
        spec.vae, spec.vae_sha256, spec.vae_class = info.source, info.sha256, info.class_name
        dtypes["image"] = "float16"
    return {"encoder": encoder.fingerprint(), "text_shapes": {"tokens": [L, D], "mask": [L], "pooled": [P]},
            "dtypes": dtypes, "image": spec}
