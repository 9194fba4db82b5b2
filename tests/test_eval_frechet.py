"""Frechet distance against independent oracles, and on a real transformers vision model from a folder."""

import numpy as np
import pytest
import scipy.linalg
import torch

from emf_dist.eval.backbone import VisionBackbone
from emf_dist.eval.frechet import feature_stats, frechet_between, frechet_distance
from emf_dist.scenes.generator import SceneConfig, iter_scenes


def test_commuting_covariances_match_the_closed_form():
    # Diagonal covariances commute: tr((S_a S_b)^1/2) = sum sqrt(a_i b_i), so FD = |dmu|^2 + sum (sqrt a - sqrt b)^2.
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu_a, np.diag(a), mu_b, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_non_commuting_2x2_matches_the_closed_form():
    # For a 2x2 matrix M with positive eigenvalues, tr(M^1/2) = sqrt(tr M + 2 sqrt(det M)).
    s_a = np.array([[2.0, 0.7], [0.7, 1.0]])
    s_b = np.array([[1.0, -0.4], [-0.4, 3.0]])
    product = s_a @ s_b
    trace_root = np.sqrt(np.trace(product) + 2 * np.sqrt(np.linalg.det(product)))
    expected = np.trace(s_a) + np.trace(s_b) - 2 * trace_root
    assert frechet_distance(np.zeros(2), s_a, np.zeros(2), s_b) == pytest.approx(expected, rel=1e-10)


def test_random_features_match_scipy_sqrtm():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    y = rng.normal(size=(300, 16)) * 1.5 + 0.3
    (mu_x, s_x), (mu_y, s_y) = feature_stats(x), feature_stats(y)
    root = scipy.linalg.sqrtm(s_x @ s_y).real
    expected = ((mu_x - mu_y) ** 2).sum() + np.trace(s_x) + np.trace(s_y) - 2 * np.trace(root)
    assert frechet_distance(mu_x, s_x, mu_y, s_y) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu_x, s_x, mu_x, s_x) == pytest.approx(0.0, abs=1e-8)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A real transformers ViT (random weights: no pretrained vision model is available offline)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def test_backbone_distance_is_named_after_the_backbone_and_orders_sets(tiny_vit):
    backbone = VisionBackbone(tiny_vit)
    scenes = np.stack([s.image for s in iter_scenes(SceneConfig(seed=1), 0, 48)])
    other_scenes = np.stack([s.image for s in iter_scenes(SceneConfig(seed=2), 0, 48)])
    noise = np.random.default_rng(0).integers(0, 256, scenes.shape, dtype=np.uint8)
    same = frechet_between(backbone, scenes, other_scenes)
    far = frechet_between(backbone, scenes, noise)
    assert same["metric"] == "FD_vit" and "FID" not in same["metric"]
    assert same["feature_dim"] == 32 and same["images"] == [48, 48] and not same["rank_deficient"]
    assert 0 <= same["value"] < far["value"]


def test_backbone_refuses_a_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="nothing is downloaded"):
        VisionBackbone(str(tmp_path / "no-such-model"))
