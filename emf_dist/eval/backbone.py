"""A `transformers` vision model from a local folder, used as an image feature extractor.

Used for Frechet distances and, on real data, for the image similarity behind encoder
discriminability. Nothing is downloaded: the folder (config.json, weights and the image
processor's preprocessor_config.json) must already be on disk, e.g. a DINOv2/DINOv3, CLIP or
ViT checkpoint copied from a machine with network access. No such model ships in a PyPI
package we can depend on, so there is no default backbone.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image


class VisionBackbone:
    def __init__(self, path: str, device: str | torch.device = "cpu"):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        folder = os.path.expanduser(path)
        if not os.path.isdir(folder):
            raise ValueError(f"vision backbone {path!r} is not a folder; pass a local copy of a transformers "
                             "vision model (config.json, weights, preprocessor_config.json); nothing is downloaded")
        self.path, self.device = os.path.abspath(folder), torch.device(device)
        try:
            self.config = AutoConfig.from_pretrained(folder, local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"could not load a vision model from {folder}: {err}") from err
        self.model.to(self.device, dtype=torch.float32).eval()

    @property
    def name(self) -> str:
        """What the metric is named after: the architecture, plus the folder for the exact weights."""
        return f"{self.config.model_type}:{os.path.basename(self.path.rstrip(os.sep))}"

    @property
    def is_inception(self) -> bool:
        return "inception" in self.config.model_type.lower()

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # CLIP-like models hold a text tower too: ask for the image side only.
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=pixel_values)
        else:
            out = self.model(pixel_values=pixel_values)
        if isinstance(out, torch.Tensor):
            return out.flatten(1)
        # The pooled output where the model defines one (DINOv2's normed CLS token, ResNet's
        # global pool), else the mean over the last layer's tokens.
        pooled = getattr(out, "image_embeds", None)
        if pooled is None:
            pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state.mean(1)
        return pooled.flatten(1)

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """[N, H, W, 3] uint8 -> [N, D] float64 features (the processor resizes and normalises)."""
        out = []
        for start in range(0, len(images), batch_size):
            batch = [Image.fromarray(im) for im in images[start:start + batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(self._embed(pixels.float()).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))
