"""A small text-conditioned critic for adversarial one-step distillation.

Regressing the 1-step query on a teacher's k-step samples (emf_dist/split_distill.py) leaves the
1-step map blurring where the teacher decides between two layouts or two colors: the mean of the
two is the regression's best guess. Adversarial Diffusion Distillation (Sauer et al., arXiv
2311.17042), and LADD in SANA-Sprint after it, add a discriminator that tells the student's 1-step
samples from real images, so that a blend costs the student even where it is close to both modes.

This critic is a projection discriminator (Miyato and Koyama, arXiv 1802.05637) over the images or
latents of the batch: three spectrally normalised convolutions (Miyato et al., arXiv 1802.05957), a
flattened layer (so that it sees where things are: position prompts), and an inner product with a
projection of the pooled text embedding, so it also judges whether the image matches its caption.
It is trained with the hinge loss on (image, caption) pairs from the data against the student's
samples and against the data's images paired with another row's caption (the matching-aware term
of Reed et al., arXiv 1605.05396). It is small next to the student and replicated on every rank.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

HIDDEN = 256
MISMATCHED_WEIGHT = 0.5  # the share of the (image, wrong caption) term in the critic's fake side


class SpectralNorm(nn.Module):
    """``layer`` (a Linear or Conv2d) with its weight divided by its largest singular value, estimated by
    power iteration. Unlike torch's parametrization, a forward has no side effect: the estimate advances
    in ``refine``, once per optimizer step, so every rank (and every simulated rank of the
    single-process loop, which scores more batches per step) holds the same critic."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        weight = layer.weight
        start = torch.randn(weight.shape[0], dtype=weight.dtype, device=weight.device)
        self.register_buffer("u", F.normalize(start, dim=0))
        for _ in range(15):  # as torch's spectral_norm starts: a settled estimate from the first step
            self.refine()

    def _matrix(self) -> torch.Tensor:
        return self.layer.weight.flatten(1)

    @torch.no_grad()
    def refine(self) -> None:
        """One power-iteration step of the top left singular vector."""
        weight = self._matrix()
        self.u.copy_(F.normalize(weight @ F.normalize(weight.t() @ self.u, dim=0), dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._matrix()
        v = F.normalize(weight.t() @ self.u, dim=0).detach()
        sigma = self.u @ weight @ v  # the gradient flows through the weight only, as Miyato et al. do
        normalised = {"weight": self.layer.weight / sigma, "bias": self.layer.bias}
        return torch.func.functional_call(self.layer, normalised, (x,))


class SceneCritic(nn.Module):
    def __init__(self, in_channels: int, input_size: int, text_dim: int, width: int = 16):
        super().__init__()
        if input_size % 4:
            raise ValueError(f"the critic halves the input twice; input_size {input_size} is not divisible by 4")
        self.features = nn.Sequential(
            SpectralNorm(nn.Conv2d(in_channels, width, 3, 1, 1)), nn.LeakyReLU(0.2),
            SpectralNorm(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.2),
            SpectralNorm(nn.Conv2d(2 * width, 4 * width, 4, 2, 1)), nn.LeakyReLU(0.2),
            nn.Flatten(),
            SpectralNorm(nn.Linear(4 * width * (input_size // 4) ** 2, HIDDEN)), nn.LeakyReLU(0.2))
        self.score = SpectralNorm(nn.Linear(HIDDEN, 1))
        self.text = SpectralNorm(nn.Linear(text_dim, HIDDEN))

    def forward(self, images: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """One realness score per row: high for a real image that matches its caption."""
        h = self.features(images)
        return self.score(h).squeeze(1) + (self.text(pooled) * h).sum(1)

    def refine_spectral_norms(self) -> None:
        """After each optimizer step of the critic."""
        for module in self.modules():
            if isinstance(module, SpectralNorm):
                module.refine()


def critic_loss(critic: SceneCritic, real: torch.Tensor, fake: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The critic's hinge loss: real (image, caption) pairs above +1, the student's samples and the real
    images under a neighbour's caption below -1. ``fake`` must carry no graph to the student."""
    rows = real.shape[0]
    wrong_text = torch.roll(pooled, 1, dims=0)  # another row's caption (a different prompt, almost always)
    scores = critic(torch.cat([real, fake, real]), torch.cat([pooled, pooled, wrong_text]))
    on_real, on_fake, on_mismatched = scores.split(rows)
    return (F.relu(1 - on_real).mean() + F.relu(1 + on_fake).mean()
            + MISMATCHED_WEIGHT * F.relu(1 + on_mismatched).mean())


def generator_loss(critic: SceneCritic, fake: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The student's hinge term, -score of its samples, through a critic held fixed (no gradient reaches
    its weights), so one backward of the sum of both losses gives each network only its own gradient."""
    critic.requires_grad_(False)
    try:
        return -critic(fake, pooled).mean()
    finally:
        critic.requires_grad_(True)
