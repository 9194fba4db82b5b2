"""Frechet distance between two image sets on a backbone's features, named after the backbone.

    FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))

the 2-Wasserstein distance between Gaussians fitted to the features. "FID" means exactly
this on InceptionV3 pool features; on any other backbone the number is not comparable with
published FIDs, so the metric is called `FD_<model type>` (as in "FD_dinov2") unless the
backbone is an Inception model.

The trace term uses tr((S_a S_b)^(1/2)) = tr((A S_b A)^(1/2)) with A = S_a^(1/2): A S_b A is
symmetric positive semi-definite, so both square roots come from symmetric eigen-decompositions
(stable, real) instead of scipy's general sqrtm on a non-symmetric product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emf_dist.eval.backbone import VisionBackbone


@dataclass
class FrechetConfig:
    # A local folder with a transformers vision model (DINOv2/v3, CLIP, ViT, Inception...). None: no
    # Frechet distance, since no pretrained vision backbone is available offline by default.
    backbone: str | None = None
    real_images: int = 512  # held-out ground-truth scenes the generated images are compared with
    real_seed: int = 2000  # scene seed of those real images (different from training and prompts)
    batch_size: int = 32


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.atleast_2d(sigma_a).astype(np.float64), np.atleast_2d(sigma_b).astype(np.float64)
    root_a = _sqrtm_psd(sigma_a)
    cross = np.linalg.eigvalsh(root_a @ sigma_b @ root_a)
    trace_root = np.sqrt(np.clip(cross, 0, None)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_root)
    return max(value, 0.0)  # rounding can leave -1e-12 for identical sets


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, np.float64)
    if len(features) < 2:
        raise ValueError("a Frechet distance needs at least 2 images per set")
    return features.mean(0), np.cov(features, rowvar=False)


def metric_name(backbone: VisionBackbone) -> str:
    return "FID" if backbone.is_inception else f"FD_{backbone.config.model_type}"


def frechet_between(backbone: VisionBackbone, images_a: np.ndarray, images_b: np.ndarray,
                    batch_size: int = 32) -> dict:
    """The distance between two uint8 image sets [N, H, W, 3], with what it was computed on."""
    feats_a = backbone.features(images_a, batch_size)
    feats_b = backbone.features(images_b, batch_size)
    value = frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b))
    dim = feats_a.shape[1]
    return {"metric": metric_name(backbone), "value": value, "backbone": backbone.name, "path": backbone.path,
            "images": [len(images_a), len(images_b)], "feature_dim": dim,
            # With fewer images than feature dimensions the covariances are rank-deficient and the
            # estimate is biased upwards: compare such numbers only at equal image counts.
            "rank_deficient": min(len(images_a), len(images_b)) <= dim}
