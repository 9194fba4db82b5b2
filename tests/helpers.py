"""Small builders shared by the tests."""

from __future__ import annotations

import socket

import torch

from emf_dist.model import ModelConfig, VelocityNet


def tiny_config(**overrides) -> ModelConfig:
    base = dict(input_size=8, in_channels=3, patch_size=2, width=32, depth=2, heads=2, text_dim=12)
    base.update(overrides)
    return ModelConfig(**base)


def randomised(model: VelocityNet, scale: float = 0.1, seed: int = 0) -> VelocityNet:
    """Give the zero-initialised layers (adaLN-Zero, output, interval path) random values, so
    every path carries signal: a fresh DiT outputs exactly 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(scale * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return model


def random_text(batch: int, length: int, dim: int, seed: int = 0, dtype=torch.float32):
    """Token states, a padding mask with a different number of real tokens per row, and pooled vectors."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, length, dim, generator=gen, dtype=dtype)
    real = 1 + torch.arange(batch) % length
    mask = torch.arange(length)[None] < real[:, None]
    tokens = tokens * mask[..., None]
    pooled = torch.randn(batch, dim, generator=gen, dtype=dtype)
    return tokens, mask, pooled


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What Ray, Ray Data, Ray Train and the workers' libraries print, none of which the main job's
# terminal may show (emf_app/console.py sends it to the log file).
RAY_CHATTER = ("core_worker.cc", "pid=", "RayTrainWorker", "TrainController", "PlacementGroup", "wandb:",
               "Connecting to existing Ray cluster", "Connected to Ray cluster", "INFO worker.py",
               "Requesting resources", "Started training worker group", "Setting up process group",
               "Checkpoint successfully created", "[repeated", "FutureWarning", "Loading weights", "\x1b[")


def ray_chatter(text: str) -> list[str]:
    """The lines of ``text`` that hold one of RAY_CHATTER."""
    return [line for line in text.splitlines() if any(pattern in line for pattern in RAY_CHATTER)]


def export_tiny(out, encoder, *, nan: bool = False, **model_overrides):
    """A small randomised MeanFlow export on ``encoder`` (NaN weights with ``nan``), returned as a Path."""
    from emf_dist.export import ExportInfo, SamplingInfo, export_model

    torch.manual_seed(0)
    model = randomised(VelocityNet(tiny_config(text_dim=encoder.dim, input_size=8, **model_overrides)))
    if nan:
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(float("nan"))
    export_model(model, ExportInfo(model.cfg, encoder.cfg, encoder.fingerprint(), SamplingInfo(steps=1)), out)
    return out
