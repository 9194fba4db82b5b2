"""The hand-written JVP pass of our DiT, on its own and fused into the gradient pass, against
forward-mode AD through the same network (float64)."""

from dataclasses import replace

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from emf_dist.meanflow import MeanFlowConfig, MeanFlowLoss, fused_step_blockers, jvp_method, time_derivative
from emf_dist.model import VelocityNet
from emf_dist.model_jvp import velocity_and_tangent
from emf_dist.time_sampling import TimeSamplerConfig
from tests.helpers import random_text, randomised, tiny_config

pytestmark = pytest.mark.usefixtures("float64")


def _inputs(cfg, batch=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    z, dz = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    # One t below data prediction's clamp, one row with r = t, one with its text dropped.
    r = torch.tensor([0.1, 0.2, 0.0, 0.01])
    t = torch.tensor([0.6, 0.2, 0.9, 0.03])
    dt = torch.tensor([1.0, 1.0, 0.5, 1.0])
    drop = torch.tensor([False, True, False, False])
    return z, dz, r, t, dt, random_text(batch, 5, cfg.text_dim, seed=seed + 1, dtype=torch.float64), drop


def _forward_ad(net, z, dz, r, t, dt, text, drop):
    with torch.no_grad(), fwAD.dual_level():
        out = net(fwAD.make_dual(z, dz), r, fwAD.make_dual(t, dt), *text, drop)
        return tuple(fwAD.unpack_dual(out))


@pytest.mark.parametrize("time_embedding", ["dual", "single", "decoupled"])
@pytest.mark.parametrize("prediction", ["velocity", "data"])
def test_primal_and_tangent_equal_forward_mode_ad(prediction, time_embedding):
    cfg = tiny_config(prediction=prediction, time_embedding=time_embedding, depth=3,
                      decoder_depth=1 if time_embedding == "decoupled" else 0)
    net = randomised(VelocityNet(cfg).double(), scale=0.3)
    z, dz, r, t, dt, text, drop = _inputs(cfg)
    u, du = velocity_and_tangent(net, z, r, t, *text, drop, dz, dt)
    u_ref, du_ref = _forward_ad(net, z, dz, r, t, dt, text, drop)
    assert du_ref.abs().max() > 1e-2  # every path carries signal: the comparison is not trivial
    torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(du, du_ref, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(u, net(z, r, t, *text, drop), rtol=1e-12, atol=1e-12)


def test_the_text_mask_reaches_the_tangent():
    """Padded text keys change neither output: rewriting them must leave (u, du) unchanged."""
    cfg = tiny_config()
    net = randomised(VelocityNet(cfg).double(), scale=0.3)
    z, dz, r, t, dt, (tokens, mask, pooled), drop = _inputs(cfg)
    u, du = velocity_and_tangent(net, z, r, t, tokens, mask, pooled, drop, dz, dt)
    noisy = torch.where(mask[..., None], tokens, 100 * torch.randn(tokens.shape))
    u2, du2 = velocity_and_tangent(net, z, r, t, noisy, mask, pooled, drop, dz, dt)
    torch.testing.assert_close((u2, du2), (u, du), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("time_embedding", ["dual", "decoupled"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("prediction", ["velocity", "data"])
def test_the_fused_pass_is_the_forward_with_gradients_and_the_first_rows_tangent(prediction, checkpointing,
                                                                                  time_embedding):
    """With gradients on, the tangent of the first rows rides along the gradient pass: u and its
    gradients are the plain forward's, du is forward-mode AD's for those rows and has no graph."""
    cfg = tiny_config(prediction=prediction, checkpointing=checkpointing, time_embedding=time_embedding, depth=3,
                      decoder_depth=1 if time_embedding == "decoupled" else 0)
    net = randomised(VelocityNet(cfg).double(), scale=0.3)
    z, dz, r, t, dt, text, drop = _inputs(cfg)
    weights = torch.randn(z.shape, generator=torch.Generator().manual_seed(9))
    rows = 2
    u, du = net(z, r, t, *text, drop, tangent=(dz[:rows], dt[:rows]))
    (u * weights).sum().backward()
    fused_grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    net.zero_grad()
    (net(z, r, t, *text, drop) * weights).sum().backward()

    assert du.shape[0] == rows and not du.requires_grad
    _, du_ref = _forward_ad(net, z, dz, r, t, dt, text, drop)
    torch.testing.assert_close(du, du_ref[:rows], rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(u.detach(), net(z, r, t, *text, drop).detach(), rtol=1e-12, atol=1e-12)
    for name, p in net.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("guided", [False, True])
def test_meanflow_loss_and_gradients_equal_the_forward_ad_step(guided, checkpointing):
    cfg = tiny_config(prediction="data", checkpointing=checkpointing)
    net = randomised(VelocityNet(cfg).double(), scale=0.3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    text = random_text(6, 5, cfg.text_dim, seed=4, dtype=torch.float64)
    base = MeanFlowConfig(time=TimeSamplerConfig(r_neq_t=0.75), text_drop=0.3, guidance_w=2.0 if guided else 1.0,
                          jvp_float32=False)
    results = {}
    for method in ("fused", "explicit", "forward_ad"):
        net.zero_grad()
        loss, stats = MeanFlowLoss(replace(base, jvp=method))(net, x, *text, generator=torch.Generator().manual_seed(5))
        loss.backward()
        assert stats["fused"] == (method == "fused")
        results[method] = (loss.detach(), [p.grad.clone() for p in net.parameters()], stats["jvp_rows"])
    loss_ref, grads_ref, rows = results.pop("forward_ad")
    assert 0 < rows < 6  # rows with r = t too: the fused pass's row order is exercised
    for loss, grads, _ in results.values():
        torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_auto_fuses_where_it_can_and_fused_says_why_it_cannot():
    torch.set_default_dtype(torch.float32)
    net = VelocityNet(tiny_config())
    z = torch.zeros(2, 3, 8, 8)
    assert fused_step_blockers(net, z, MeanFlowConfig(), partitioned=False) == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "below float32" in " ".join(fused_step_blockers(net, z, MeanFlowConfig(), partitioned=False))
        assert fused_step_blockers(net, z, MeanFlowConfig(jvp_float32=False), partitioned=False) == []
    assert "ZeRO-3" in " ".join(fused_step_blockers(net, z, MeanFlowConfig(), partitioned=True))
    assert "our DiT" in " ".join(fused_step_blockers(torch.nn.Linear(2, 2), z, MeanFlowConfig(), partitioned=False))

    x, text = torch.randn(4, 3, 8, 8), random_text(4, 5, net.cfg.text_dim)
    cfg = MeanFlowConfig(time=TimeSamplerConfig(r_neq_t=1.0))
    _, stats = MeanFlowLoss(cfg)(net, x, *text, generator=torch.Generator().manual_seed(0))
    assert stats["fused"] and stats["jvp_rows"] == 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, stats = MeanFlowLoss(cfg)(net, x, *text, generator=torch.Generator().manual_seed(0))
        assert not stats["fused"] and stats["jvp_rows"] == 4  # auto: the two-pass step, its JVP in float32
        with pytest.raises(ValueError, match="fused cannot run here: the gradient pass runs below float32"):
            MeanFlowLoss(replace(cfg, jvp="fused"))(net, x, *text, generator=torch.Generator().manual_seed(0))
    assert "jvp_chunk" in " ".join(MeanFlowConfig(jvp="fused", jvp_chunk=2).validate())


def test_auto_picks_the_explicit_pass_for_our_dit_only():
    net = VelocityNet(tiny_config())
    assert jvp_method(net, MeanFlowConfig()) == "explicit"
    assert jvp_method(torch.nn.Linear(2, 2), MeanFlowConfig()) == "forward_ad"
    with pytest.raises(ValueError, match="explicit is written for our DiT"):
        time_derivative(torch.nn.Linear(2, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1), torch.zeros(1, 2),
                        (), None, MeanFlowConfig(jvp="explicit"))


@pytest.mark.parametrize("time_embedding", ["dual", "decoupled"])
def test_the_tangent_under_bf16_autocast_is_the_float64_tangent_to_bf16_precision(time_embedding):
    """`jvp_float32: false` runs the JVP pass under the step's autocast: bf16 activations meet
    float32 statistics and residuals, and every rule must take both."""
    cfg = tiny_config(time_embedding=time_embedding, depth=3, decoder_depth=1 if time_embedding == "decoupled" else 0)
    net = randomised(VelocityNet(cfg).double(), scale=0.3)
    z, dz, r, t, dt, text, drop = _inputs(cfg)
    _, du_ref = velocity_and_tangent(net, z, r, t, *text, drop, dz, dt)
    torch.set_default_dtype(torch.float32)
    net = net.float()
    low = [x.float() if x.is_floating_point() else x for x in (z, dz, r, t, dt, *text)]
    z, dz, r, t, dt, text = low[0], low[1], low[2], low[3], low[4], low[5:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, du = velocity_and_tangent(net, z, r, t, *text, drop, dz, dt)
    assert du.dtype == torch.bfloat16
    assert ((du.double() - du_ref).norm() / du_ref.norm()).item() < 2e-2
