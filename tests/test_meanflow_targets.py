"""The MeanFlow objective's targets against independent references, in float64: the interval-splitting
rows (MeanFlowConfig.split_share), the JVP's tangent (MeanFlowConfig.tangent) and AlphaFlow's
consistency-step target (MeanFlowConfig.alpha) on an exact flow map with a closed form, the loss and
gradients written out row by row, and split_share 0 and alpha 0 as the plain objective, draw for draw."""

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from emf_dist.alpha_flow import AlphaCurriculum, alpha_flow_target
from emf_dist.meanflow import (
    MeanFlowConfig,
    MeanFlowLoss,
    end_time_derivative,
    jvp_target,
    lagrangian_target,
    split_target,
)
from emf_dist.model import VelocityNet
from emf_dist.time_sampling import TimeSamplerConfig, sample_times
from tests.helpers import random_text, randomised, tiny_config


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class GaussianFlowMap(torch.nn.Module):
    """The exact average velocity of the flow z_t = (1 - t) x + t e for x ~ N(0, sigma^2 I), e ~ N(0, I).

    The marginal of z_t is N(0, a_t^2 I), a_t^2 = (1 - t)^2 sigma^2 + t^2, and its probability-flow ODE
    is linear, dz/dt = (a_t' / a_t) z, so the flow map is z_r = (a_r / a_t) z_t and
    u(z_t, r, t) = z_t (1 - a_r / a_t) / (t - r), and at r = t the velocity z_t a_t' / a_t. The velocity
    changes along the path, so the split's two sub-interval velocities differ and only the right weights
    recover u. sigma depends on the condition (2 with text, 0.5 dropped), so every evaluation must take
    the row's own condition."""

    @staticmethod
    def sigma(drop, t):
        kept = torch.ones_like(t, dtype=torch.bool) if drop is None else ~drop
        return torch.where(kept, 2.0, 0.5)

    def scale(self, r, t, drop=None):
        """a_r / a_t."""
        sigma = self.sigma(drop, t)
        a = lambda s: ((1 - s) ** 2 * sigma ** 2 + s ** 2).sqrt()  # noqa: E731
        return a(r) / a(t)

    def forward(self, z, r, t, tokens, mask, pooled, drop=None):
        sigma, gap = self.sigma(drop, t), t - r
        average = (1 - self.scale(r, t, drop)) / torch.where(gap == 0, 1.0, gap)
        velocity = (t - (1 - t) * sigma ** 2) / ((1 - t) ** 2 * sigma ** 2 + t ** 2)  # a_t a_t' / a_t^2
        return z * torch.where(gap == 0, velocity, average).view(-1, 1, 1, 1)


def _gaussian_rows(seed: int):
    """A generator and six rows (z, r, t, text, drop) of intervals from short to the whole of [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(6, 3, 4, 4, generator=gen)
    r = torch.tensor([0.0, 0.0, 0.1, 0.3, 0.05, 0.6])
    t = torch.tensor([1.0, 0.5, 0.9, 0.35, 1.0, 0.95])
    drop = torch.tensor([False, True, False, True, True, False])
    return gen, (z, r, t, random_text(6, 5, 12, dtype=torch.float64), drop)


def test_the_split_target_of_an_exact_flow_map_is_its_own_prediction_for_any_split():
    net, gen, (z, r, t, text, drop) = GaussianFlowMap(), *_gaussian_rows(seed=0)
    batch = z.shape[0]
    exact = net(z, r, t, *text, drop)
    splits = (torch.full((batch, 1), 0.5), torch.full((batch, 1), 0.01), torch.rand(batch, 1, generator=gen),
              torch.rand(batch, 3, generator=gen), torch.tensor([[0.9, 0.2, 0.5]]).expand(batch, -1))
    for split_points in splits:
        torch.testing.assert_close(split_target(net, z, r, t, split_points, text, drop), exact, rtol=0, atol=1e-10)
    # Not a vacuous identity: the two halves' velocities differ, and a swapped weighting misses.
    s = t - 0.5 * (t - r)
    late = net(z, s, t, *text, drop)
    early = net(z - (t - s).view(-1, 1, 1, 1) * late, r, s, *text, drop)
    assert (early - late).abs().max() > 0.1
    swapped_point = torch.full((batch, 1), 0.25)
    s = t - 0.25 * (t - r)
    late = net(z, s, t, *text, drop)
    early = net(z - (t - s).view(-1, 1, 1, 1) * late, r, s, *text, drop)
    swapped = (0.25 * early + 0.75 * late)  # the weights of s = t - 0.75 (t - r), not of this split
    assert (swapped - split_target(net, z, r, t, swapped_point, text, drop)).abs().max() > 1e-3


def test_along_the_network_own_velocity_only_the_error_of_v_reaches_the_target():
    """tangent: model (iMF). For the exact flow map, du/dt along its own velocity v* satisfies the MeanFlow
    identity, so with a velocity v = v* + d the target is exactly u* + d; along v itself (MeanFlow's tangent)
    d enters the derivative too and the target is u* + d a_r / a_t (here J_z u* = (1 - a_r / a_t) / (t - r))."""
    net, gen, (z, r, t, text, drop) = GaussianFlowMap(), *_gaussian_rows(seed=3)
    exact, exact_velocity = net(z, r, t, *text, drop), net(z, t, t, *text, drop)
    error = 0.3 * torch.randn(z.shape, generator=gen)
    v = exact_velocity + error

    along_model = jvp_target(net, z, r, t, v, text, drop, MeanFlowConfig(jvp_float32=False, tangent="model"))
    torch.testing.assert_close(along_model, exact + error, rtol=0, atol=1e-10)
    along_v = jvp_target(net, z, r, t, v, text, drop, MeanFlowConfig(jvp_float32=False))
    torch.testing.assert_close(along_v, exact + error * net.scale(r, t, drop).view(-1, 1, 1, 1), rtol=0, atol=1e-10)
    # With the exact velocity both tangents agree: the exact flow map is a fixed point of either target.
    for tangent in ("velocity", "model"):
        target = jvp_target(net, z, r, t, exact_velocity, text, drop, MeanFlowConfig(jvp_float32=False, tangent=tangent))
        torch.testing.assert_close(target, exact, rtol=0, atol=1e-10)


def test_the_lagrangian_target_of_an_exact_flow_map_is_its_own_prediction():
    """identity: lagrangian. The exact flow map's end point moves with its own velocity, so u = v(x_r, r) +
    (t - r) du/dr holds whether v at the end point is a teacher's (here the same exact flow) or the network's."""
    net, _, (z, r, t, text, drop) = GaussianFlowMap(), *_gaussian_rows(seed=5)
    exact = net(z, r, t, *text, drop)
    cfg = MeanFlowConfig(jvp_float32=False, identity="lagrangian")
    for teacher in (None, GaussianFlowMap()):
        torch.testing.assert_close(lagrangian_target(net, teacher, z, r, t, text, drop, cfg), exact, rtol=0, atol=1e-10)
    # Not vacuous: the derivative term carries most of it, and the velocity at the start point instead misses.
    _, du_dr = end_time_derivative(net, z, r, t, text, drop, cfg)
    assert ((t - r).view(-1, 1, 1, 1) * du_dr).abs().max() > 0.5
    at_start = net(z, t, t, *text, drop) + (t - r).view(-1, 1, 1, 1) * du_dr
    assert (at_start - exact).abs().max() > 0.1


def test_alpha_flow_target_is_flow_matching_at_one_and_tends_to_the_exact_flow_map_as_alpha_shrinks():
    """AlphaFlow's target with the exact velocity: v itself at alpha = 1; below, an Euler step over alpha of the
    interval, then the exact map from where it lands. Its first-order error is the residual of the MeanFlow
    identity, zero for the exact map, so the target misses u by O(alpha^2): a hundredfold less per tenfold
    smaller alpha."""
    net, _, (z, r, t, text, drop) = GaussianFlowMap(), *_gaussian_rows(seed=8)
    exact, exact_velocity = net(z, r, t, *text, drop), net(z, t, t, *text, drop)
    torch.testing.assert_close(alpha_flow_target(net, z, r, t, exact_velocity, 1.0, text, drop), exact_velocity,
                               rtol=0, atol=0)
    errors = [float((alpha_flow_target(net, z, r, t, exact_velocity, alpha, text, drop) - exact).abs().max())
              for alpha in (1e-2, 1e-3, 1e-4)]
    assert errors[0] > 1e-4  # not exact at a finite alpha: the Euler step's error is there
    for coarse, fine in zip(errors[:-1], errors[1:]):
        assert 70 < coarse / fine < 130, errors
    # The rest of the interval must start where the Euler step lands: from z_t itself (at the same s) the
    # first-order term J_z u . v is left over, a hundred times the error at this alpha.
    alpha = 1e-4
    from_start = alpha * exact_velocity + (1 - alpha) * net(z, r, t - alpha * (t - r), *text, drop)
    assert float((from_start - exact).abs().max()) > 100 * errors[-1]


def test_the_alpha_curriculum_is_alphaflow_s_clamped_sigmoid():
    curriculum = AlphaCurriculum(start=1.0, end=0.0)  # AlphaFlow's: 1 -> 0 over the whole run, sharpness 25
    for progress in (0.3, 0.45, 0.5, 0.55, 0.7):
        expected = 1 - 1 / (1 + math.exp(-25 * (progress - 0.5)))
        assert curriculum.at(progress) == pytest.approx(expected, rel=1e-12)
    assert curriculum.at(0.0) == 1.0 and curriculum.at(0.1) == 1.0  # above 1 - clamp: flow matching exactly
    assert curriculum.at(0.95) == 0.0 and curriculum.at(1.0) == 0.0  # below the clamp: MeanFlow's target
    late = AlphaCurriculum(start=0.5, end=0.0, window_start=0.2, window_end=0.6)
    assert late.at(0.1) == 0.5 and late.at(0.7) == 0.0
    assert late.at(0.4) == pytest.approx(0.25, rel=1e-12)
    constant = AlphaCurriculum(start=0.3, end=0.3)
    assert {constant.at(p) for p in (0.0, 0.5, 1.0)} == {0.3}
    assert not AlphaCurriculum().enabled and AlphaCurriculum().at(0.5) == 0.0


def test_the_end_time_derivative_equals_a_central_difference_on_our_dit():
    cfg = tiny_config()
    torch.manual_seed(6)
    net = randomised(VelocityNet(cfg).double(), seed=6)
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen, dtype=torch.float64)
    r = torch.tensor([0.0, 0.2, 0.5, 0.1], dtype=torch.float64)
    t = torch.tensor([1.0, 0.9, 0.6, 0.3], dtype=torch.float64)
    text, drop = random_text(4, 5, cfg.text_dim, seed=7, dtype=torch.float64), torch.tensor([False, True, False, False])
    u, du_dr = end_time_derivative(net, z, r, t, text, drop, MeanFlowConfig(jvp_float32=False))
    eps = 1e-7  # the time features' frequencies make the difference's truncation error the larger one
    difference = (net(z, r + eps, t, *text, drop) - net(z, r - eps, t, *text, drop)) / (2 * eps)
    torch.testing.assert_close(du_dr, difference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(u, net(z, r, t, *text, drop), rtol=0, atol=1e-12)


def _setup(batch, seed=0):
    cfg = tiny_config()
    torch.manual_seed(seed)
    net = randomised(VelocityNet(cfg).double(), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    return net, x, random_text(batch, 5, cfg.text_dim, seed=seed + 2, dtype=torch.float64)


def _reference_loss(net, x, text, cfg: MeanFlowConfig, gen: torch.Generator):
    """The objective written out row by row (v = e - x, no folded guidance): the draws in their documented
    order (times, text drop, noise, then the split points only if split_share > 0); split rows are the
    longest r != t intervals, each target the length-weighted mean of the network's own MeanFlow steps
    from t down to r through the row's sorted cut points;
    the other r != t rows take the MeanFlow target by forward-mode AD, along v or (tangent: model) the
    network's own u(z_t, t, t), or (identity: lagrangian) du/dr by forward-mode AD and the network's own
    velocity at the step's end point, or (alpha > 0) alpha v plus 1 - alpha times the network's own average
    velocity from the Euler step's end, weighted alpha^(2p - 1) more; r = t rows take v."""
    batch = x.shape[0]
    r, t = sample_times(cfg.time, batch, 0.0, generator=gen)
    drop = torch.rand(batch, generator=gen) < cfg.text_drop
    noise = torch.randn(x.shape, generator=gen)
    split_points = torch.rand(batch, cfg.split_steps - 1, generator=gen) if cfg.split_share > 0 else None
    intervals = [i for i in range(batch) if r[i] != t[i]]
    longest = sorted(intervals, key=lambda i: (-float(t[i] - r[i]), i))
    split = set(longest[:round(cfg.split_share * len(intervals))])

    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    v = noise - x
    alpha = cfg.alpha.at(0.0)
    targets, row_factor = [], torch.ones(batch)
    for i in range(batch):
        one = lambda a: a[i:i + 1]  # noqa: E731
        row_text = tuple(map(one, text))
        if i in split:
            cuts = [float(t[i] - f * (t[i] - r[i])) for f in sorted(split_points[i].tolist())]
            times, z_now, displacement = [float(t[i]), *cuts, float(r[i])], one(z), 0.0
            with torch.no_grad():
                for start, end in zip(times[:-1], times[1:]):
                    u_step = net(z_now, torch.tensor([end]), torch.tensor([start]), *row_text, one(drop))
                    z_now = z_now - (start - end) * u_step
                    displacement = displacement + (start - end) * u_step
            targets.append(displacement / (t[i] - r[i]))
        elif r[i] != t[i] and alpha > 0:
            s_i = t[i] - alpha * (t[i] - r[i])
            with torch.no_grad():
                u_rest = net(one(z) - alpha * (t[i] - r[i]) * one(v), one(r), s_i.view(1), *row_text, one(drop))
            targets.append(alpha * one(v) + (1 - alpha) * u_rest)
            row_factor[i] = alpha ** (2 * cfg.adaptive_p - 1)
        elif r[i] != t[i] and cfg.identity == "lagrangian":
            with fwAD.dual_level():
                out = net(one(z), fwAD.make_dual(one(r), torch.ones(1)), one(t), *row_text, one(drop))
                u_row, du_dr = fwAD.unpack_dual(out)
            with torch.no_grad():  # the network's own velocity where the step lands
                v_end = net(one(z) - (t[i] - r[i]) * u_row, one(r), one(r), *row_text, one(drop))
            targets.append((v_end + (t[i] - r[i]) * du_dr).detach())
        elif r[i] != t[i]:
            with torch.no_grad():  # iMF: along the network's own velocity at the row's condition
                tangent = net(one(z), one(t), one(t), *row_text, one(drop)) if cfg.tangent == "model" else one(v)
            with fwAD.dual_level():
                out = net(fwAD.make_dual(one(z), tangent), one(r), fwAD.make_dual(one(t), torch.ones(1)),
                          *row_text, one(drop))
                du_dt = fwAD.unpack_dual(out).tangent
            targets.append((one(v) - (t[i] - r[i]) * du_dt).detach())
        else:
            targets.append(one(v))
    u = net(z, r, t, *text, drop)
    err = (u - torch.cat(targets)).pow(2).flatten(1).mean(1)
    weight = (err.detach() + cfg.adaptive_c).pow(-cfg.adaptive_p) * row_factor
    return (weight * err).mean(), len(split), 0 if alpha > 0 else len(intervals) - len(split)


def _loss_and_grads(loss, net):
    return loss, torch.autograd.grad(loss, list(net.parameters()))


@pytest.mark.parametrize("split_share, split_steps, tangent, identity, alpha, adaptive_p, expected_split, expected_jvp",
                         [(0.5, 2, "velocity", "eulerian", 0.0, 0.5, 3, 3), (1.0, 2, "velocity", "eulerian", 0.0, 0.5, 6, 0),
                          (0.0, 2, "velocity", "eulerian", 0.0, 0.5, 0, 6), (0.0, 2, "model", "eulerian", 0.0, 0.5, 0, 6),
                          (0.5, 2, "model", "eulerian", 0.0, 0.5, 3, 3), (0.5, 4, "velocity", "eulerian", 0.0, 0.5, 3, 3),
                          (0.0, 2, "velocity", "lagrangian", 0.0, 0.5, 0, 6),
                          (0.5, 2, "velocity", "lagrangian", 0.0, 0.5, 3, 3),
                          (0.0, 2, "velocity", "eulerian", 0.3, 1.0, 0, 0), (0.5, 2, "velocity", "eulerian", 0.3, 0.0, 3, 0),
                          (0.5, 2, "velocity", "eulerian", 1.0, 0.5, 3, 0)])
def test_loss_and_gradients_equal_a_row_by_row_float64_reference(split_share, split_steps, tangent, identity, alpha,
                                                                 adaptive_p, expected_split, expected_jvp):
    # 8 rows, 6 of them r != t, 2 of those at (0, 1): with split_share 0.5 the split rows are the two
    # full intervals and the longest of the other four. A constant alpha > 0 takes every other r != t row.
    cfg = MeanFlowConfig(time=TimeSamplerConfig(r_neq_t=0.75, full_interval=0.34), text_drop=0.3,
                         adaptive_p=adaptive_p, jvp_float32=False, split_share=split_share, split_steps=split_steps,
                         tangent=tangent, identity=identity, alpha=AlphaCurriculum(start=alpha, end=alpha))
    net, x, text = _setup(batch=8)
    gen = torch.Generator().manual_seed(11)
    loss, grads = _loss_and_grads(MeanFlowLoss(cfg)(net, x, *text, generator=gen)[0], net)
    _, stats = MeanFlowLoss(cfg)(net, x, *text, generator=torch.Generator().manual_seed(11))
    reference_gen = torch.Generator().manual_seed(11)
    reference, split_count, jvp_count = _reference_loss(net, x, text, cfg, reference_gen)
    reference, reference_grads = _loss_and_grads(reference, net)

    assert (stats["split_rows"], stats["jvp_rows"]) == (split_count, jvp_count) == (expected_split, expected_jvp)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # The same random draws, no more: the generators end in the same state.
    assert torch.equal(gen.get_state(), reference_gen.get_state())


def test_split_share_zero_is_the_plain_objective_draw_for_draw():
    """The default config and split_share 0 draw the same numbers and give the same loss and gradients;
    a split share changes only the split rows' targets, and draws one number per row more."""
    time_cfg = TimeSamplerConfig(r_neq_t=0.75)
    net, x, text = _setup(batch=8, seed=4)
    results = {}
    for name, cfg in {"default": MeanFlowConfig(time=time_cfg, jvp_float32=False),
                      "zero": MeanFlowConfig(time=time_cfg, jvp_float32=False, split_share=0.0),
                      "alpha_zero": MeanFlowConfig(time=time_cfg, jvp_float32=False,
                                                   alpha=AlphaCurriculum(start=0.004, end=0.0)),
                      "split": MeanFlowConfig(time=time_cfg, jvp_float32=False, split_share=0.5)}.items():
        gen = torch.Generator().manual_seed(2)
        loss, stats = MeanFlowLoss(cfg)(net, x, *text, generator=gen)
        results[name] = (*_loss_and_grads(loss, net), gen.get_state(), stats)
    default, zero, split = results["default"], results["zero"], results["split"]
    for same in (zero, results["alpha_zero"]):  # an alpha under the clamp is MeanFlow's own target
        assert torch.equal(default[0], same[0]) and torch.equal(default[2], same[2])
        assert all(torch.equal(a, b) for a, b in zip(default[1], same[1]))
    assert zero[3]["split_rows"] == 0 and zero[3]["jvp_rows"] == 6
    assert split[3]["split_rows"] == 3 and split[3]["jvp_rows"] == 3
    assert not torch.equal(split[0], zero[0]) and not torch.equal(split[2], zero[2])


def test_the_alpha_curriculum_hands_the_rows_to_the_jvp_when_it_reaches_zero():
    cfg = MeanFlowConfig(time=TimeSamplerConfig(r_neq_t=0.75), jvp_float32=False, split_share=0.5,
                         alpha=AlphaCurriculum(start=1.0, end=0.0))
    net, x, text = _setup(batch=8, seed=9)
    seen = {}
    for progress in (0.0, 0.5, 1.0):
        _, stats = MeanFlowLoss(cfg)(net, x, *text, progress, generator=torch.Generator().manual_seed(3))
        seen[progress] = (stats["alpha"], stats["split_rows"], stats["jvp_rows"])
    assert seen == {0.0: (1.0, 3, 0), 0.5: (0.5, 3, 0), 1.0: (0.0, 3, 3)}


def test_the_alpha_curriculum_is_validated():
    assert not MeanFlowConfig(alpha=AlphaCurriculum(start=1.0, end=0.0)).validate()
    for refused in (dict(start=1.5), dict(end=-0.1), dict(start=1.0, window_start=0.6, window_end=0.4),
                    dict(start=1.0, sharpness=0.0), dict(start=1.0, clamp=0.5)):
        assert any("alpha" in p for p in MeanFlowConfig(alpha=AlphaCurriculum(**refused)).validate()), refused
    curriculum = AlphaCurriculum(start=1.0, end=0.0)
    for refused in (dict(mode="flow_matching"), dict(identity="lagrangian"), dict(tangent="model")):
        assert any("alpha" in p for p in MeanFlowConfig(alpha=curriculum, **refused).validate()), refused


def test_split_share_is_validated():
    assert any("split_share" in p for p in MeanFlowConfig(split_share=1.5).validate())
    assert any("split_share" in p for p in MeanFlowConfig(split_share=-0.1).validate())
    assert any("flow matching" in p for p in MeanFlowConfig(mode="flow_matching", split_share=0.25).validate())
    assert not MeanFlowConfig(split_share=0.5).validate()
    assert any("split_steps" in p for p in MeanFlowConfig(split_share=0.5, split_steps=1).validate())
    assert not MeanFlowConfig(split_share=0.5, split_steps=4).validate()
    assert not MeanFlowConfig(identity="lagrangian", velocity="teacher", guidance_w=1.5).validate()
    for refused in (dict(mode="flow_matching"), dict(tangent="model"), dict(jvp="fused"), dict(guidance_w=1.5)):
        assert MeanFlowConfig(identity="lagrangian", **refused).validate(), refused
    assert any("tangent" in p for p in MeanFlowConfig(mode="flow_matching", tangent="model").validate())
    assert not MeanFlowConfig(tangent="model").validate()
