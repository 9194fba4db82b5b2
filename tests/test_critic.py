"""The adversarial distillation critic: spectral normalisation against the exact largest singular value,
and the critic's shape rules."""

import pytest
import torch
import torch.nn as nn

from emf_dist.critic import SceneCritic, SpectralNorm


@pytest.mark.parametrize("layer", [nn.Linear(24, 10), nn.Conv2d(3, 6, 4, 2, 1)])
def test_spectral_norm_divides_by_the_largest_singular_value(layer):
    torch.manual_seed(0)
    normed = SpectralNorm(layer.double())
    for _ in range(200):
        normed.refine()
    weight = layer.weight.detach().flatten(1)
    exact = torch.linalg.matrix_norm(weight, ord=2)  # the oracle: an SVD
    x = torch.randn(5, 24, dtype=torch.float64) if isinstance(layer, nn.Linear) else \
        torch.randn(5, 3, 8, 8, dtype=torch.float64)
    scaled = layer(x) - layer.bias.view(1, -1, *([1] * (x.dim() - 2)))
    torch.testing.assert_close(normed(x) - layer.bias.view(1, -1, *([1] * (x.dim() - 2))), scaled / exact,
                               rtol=1e-8, atol=1e-10)


def test_a_forward_leaves_the_estimate_alone_and_refine_moves_it():
    torch.manual_seed(0)
    normed = SpectralNorm(nn.Linear(16, 16))
    before = normed.u.clone()
    normed(torch.randn(3, 16))
    assert torch.equal(normed.u, before)
    with torch.no_grad():
        normed.layer.weight.mul_(torch.randn(16, 16))
    normed.refine()
    assert not torch.equal(normed.u, before)


def test_critic_scores_each_row_and_names_a_bad_input_size():
    critic = SceneCritic(in_channels=4, input_size=8, text_dim=12, width=4)
    assert critic(torch.randn(5, 4, 8, 8), torch.randn(5, 12)).shape == (5,)
    with pytest.raises(ValueError, match="divisible by 4"):
        SceneCritic(in_channels=3, input_size=6, text_dim=12)
