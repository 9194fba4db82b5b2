"""The two-pass MeanFlow step against independent references (float64)."""

from dataclasses import replace

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from emf_dist.meanflow import MeanFlowConfig, MeanFlowLoss, time_derivative
from emf_dist.model import VelocityNet
from emf_dist.time_sampling import TimeSamplerConfig
from tests.helpers import random_text, randomised, tiny_config

pytestmark = pytest.mark.usefixtures("float64")


def _setup(batch=4, seed=0, **model_overrides):
    cfg = tiny_config(**model_overrides)
    torch.manual_seed(seed)
    net = randomised(VelocityNet(cfg).double(), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    text = random_text(batch, 5, cfg.text_dim, seed=seed + 2, dtype=torch.float64)
    return net, x, text


@pytest.mark.parametrize("prediction", ["velocity", "data"])
def test_network_jvp_equals_central_finite_difference(prediction):
    net, z, text = _setup(prediction=prediction)
    gen = torch.Generator().manual_seed(7)
    v = torch.randn(z.shape, generator=gen)
    r = torch.tensor([0.1, 0.2, 0.0, 0.5])
    t = torch.tensor([0.6, 0.3, 0.9, 0.5])
    drop = torch.tensor([False, True, False, False])
    cfg = MeanFlowConfig(jvp_float32=False)
    du_dt = time_derivative(net, z, r, t, v, text, drop, cfg)
    # The time embedding has frequencies up to 1000 rad per unit t, so the central difference's
    # O(eps^2) error is large unless eps is tiny; Richardson extrapolation cancels it to O(eps^4).
    central = lambda eps: time_derivative(net, z, r, t, v, text, drop, replace(cfg, jvp="finite_difference", fd_eps=eps))  # noqa: E731
    fd = (4 * central(1e-6) - central(2e-6)) / 3
    rel = (du_dt - fd).norm() / fd.norm()
    assert fd.norm() > 1e-3  # the randomised net has a real time dependence
    assert rel < 1e-8, f"JVP vs central difference: relative error {rel:.2e}"


def _single_pass_reference(net, x, text, cfg, seed, velocity=None):
    """MeanFlow as the papers write it: one forward under forward-mode AD, gradients through it.
    ``velocity(z, t, drop)`` replaces e - x (distillation from a teacher)."""
    gen = torch.Generator().manual_seed(seed)
    from emf_dist.time_sampling import sample_times

    batch = x.shape[0]
    r, t = sample_times(cfg.time, batch, 0.0, generator=gen)
    drop = torch.rand(batch, generator=gen) < cfg.text_drop
    noise = torch.randn(x.shape, generator=gen)
    e = lambda s: s.view(-1, 1, 1, 1)  # noqa: E731
    z = (1 - e(t)) * x + e(t) * noise
    v = noise - x if velocity is None else velocity(z, t, drop)
    with fwAD.dual_level():
        out = net(fwAD.make_dual(z, v), r, fwAD.make_dual(t, torch.ones_like(t)), *text, drop)
        u, du_dt = fwAD.unpack_dual(out)
    target = (v - e(t - r) * du_dt).detach()
    err = (u - target).pow(2).flatten(1).mean(1)
    weight = (err.detach() + cfg.adaptive_c).pow(-cfg.adaptive_p)
    return (weight * err).mean()


def _grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_two_pass_loss_and_gradients_equal_single_pass_forward_ad():
    cfg = MeanFlowConfig(time=TimeSamplerConfig(r_neq_t=0.5), text_drop=0.3, jvp_float32=False)
    net, x, text = _setup(batch=6)
    reference = _single_pass_reference(net, x, text, cfg, seed=11)
    reference.backward()
    ref_grads = _grads(net)
    net.zero_grad()
    loss, stats = MeanFlowLoss(cfg)(net, x, *text, generator=torch.Generator().manual_seed(11))
    loss.backward()
    assert stats["jvp_rows"] == 3
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
    for name, grad in _grads(net).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("guided", [False, True])
def test_checkpointing_keeps_loss_and_gradients(guided):
    extra = dict(guidance_w=1.5, guidance_k=0.3) if guided else {}
    cfg = MeanFlowConfig(time=TimeSamplerConfig(r_neq_t=0.75), text_drop=0.25, jvp_float32=False, **extra)
    results = []
    for checkpointing in (False, True):
        net, x, text = _setup(batch=4, checkpointing=checkpointing)
        loss, stats = MeanFlowLoss(cfg)(net, x, *text, generator=torch.Generator().manual_seed(5))
        loss.backward()
        results.append((stats["mse"], _grads(net)))
    (mse_off, grads_off), (mse_on, grads_on) = results
    torch.testing.assert_close(mse_on, mse_off, rtol=1e-12, atol=0)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-10, atol=1e-13, msg=name)


def test_flow_matching_mode_regresses_on_velocity_without_jvp():
    net, x, text = _setup(batch=4)
    cfg = MeanFlowConfig(mode="flow_matching", time=TimeSamplerConfig(r_neq_t=1.0), text_drop=0.0, adaptive_p=0.0)
    loss, stats = MeanFlowLoss(cfg)(net, x, *text, generator=torch.Generator().manual_seed(3))
    assert stats["jvp_rows"] == 0
    # Recompute by hand with the same random draws.
    gen = torch.Generator().manual_seed(3)
    from emf_dist.time_sampling import sample_times
    _, t = sample_times(cfg.time, 4, 0.0, generator=gen)
    torch.rand(4, generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    e = t.view(-1, 1, 1, 1)
    z = (1 - e) * x + e * noise
    expected = (net(z, t, t, *text) - (noise - x)).pow(2).mean()
    torch.testing.assert_close(loss, expected)


def test_folded_guidance_uses_the_networks_own_predictions():
    """v_g = w v + (1 - w - k) u_uncond + k u_cond on kept rows, v on dropped rows (MeanFlow's CFG)."""
    from emf_dist.meanflow import guided_velocity

    net, z, text = _setup(batch=4)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    drop = torch.tensor([False, True, False, True])
    cfg = MeanFlowConfig(guidance_w=2.0, guidance_k=0.25)
    v_g = guided_velocity(net, z, t, v, text, drop, cfg)
    u_cond = net(z, t, t, *text)
    u_uncond = net(z, t, t, *text, torch.ones(4, dtype=torch.bool))
    expected = 2.0 * v + (1 - 2.0 - 0.25) * u_uncond + 0.25 * u_cond
    torch.testing.assert_close(v_g[~drop], expected[~drop].detach())
    torch.testing.assert_close(v_g[drop], v[drop])


def test_jvp_pass_runs_in_float32_under_bf16_autocast():
    torch.set_default_dtype(torch.float32)
    cfg_model = tiny_config()
    net = randomised(VelocityNet(cfg_model))
    z = torch.randn(2, 3, 8, 8)
    v = torch.randn_like(z)
    text = random_text(2, 5, cfg_model.text_dim)
    r, t = torch.tensor([0.1, 0.2]), torch.tensor([0.7, 0.9])
    drop = torch.zeros(2, dtype=torch.bool)
    cfg = MeanFlowConfig()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        du_dt = time_derivative(net, z, r, t, v, text, drop, cfg)
    assert du_dt.dtype == torch.float32
    exact = time_derivative(net, z, r, t, v, text, drop, cfg)
    torch.testing.assert_close(du_dt, exact)


@pytest.mark.parametrize("guidance_w", [1.0, 1.5])
def test_teacher_velocity_loss_and_gradients_equal_single_pass_reference(guidance_w):
    """velocity: teacher regresses on the identity with the teacher's (guided) velocity as v and tangent."""
    cfg = MeanFlowConfig(time=TimeSamplerConfig(r_neq_t=0.5), text_drop=0.3, jvp_float32=False,
                         velocity="teacher", guidance_w=guidance_w)
    net, x, text = _setup(batch=6)
    teacher, _, _ = _setup(batch=6, seed=3)
    teacher.requires_grad_(False)
    all_rows = torch.ones(6, dtype=torch.bool)

    def teacher_v(z, t, drop):  # two plain forwards, not the loss's doubled batch
        v_cond, v_uncond = teacher(z, t, t, *text), teacher(z, t, t, *text, all_rows)
        return torch.where(drop[:, None, None, None], v_uncond, guidance_w * v_cond + (1 - guidance_w) * v_uncond)

    reference = _single_pass_reference(net, x, text, cfg, seed=11, velocity=teacher_v)
    reference.backward()
    ref_grads = _grads(net)
    net.zero_grad()
    loss, stats = MeanFlowLoss(cfg, teacher=teacher)(net, x, *text, generator=torch.Generator().manual_seed(11))
    loss.backward()
    assert stats["jvp_rows"] == 3
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
    for name, grad in _grads(net).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_velocity_needs_a_teacher_and_no_student_guidance_weight():
    net, _, _ = _setup()
    with pytest.raises(ValueError, match="needs a teacher"):
        MeanFlowLoss(MeanFlowConfig(velocity="teacher"))
    with pytest.raises(ValueError, match="takes no teacher"):
        MeanFlowLoss(MeanFlowConfig(), teacher=net)
    assert any("guidance_k" in p for p in MeanFlowConfig(velocity="teacher", guidance_k=0.5).validate())
