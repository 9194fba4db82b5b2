"""objective.jvp_chunk: the JVP pass over chunks of rows gives the tangents of the pass over all rows."""

import pytest
import torch

from emf_dist.backbones import load_diffusers_backbone
from emf_dist.meanflow import MeanFlowConfig, MeanFlowLoss, time_derivative
from emf_dist.model import VelocityNet, preset
from emf_dist.time_sampling import TimeSamplerConfig
from tests.diffusers_backbone_helpers import inputs, write_pipeline
from tests.helpers import random_text, randomised

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROWS = 5


def dit_case():
    torch.manual_seed(0)
    cfg = preset("test", input_size=8, in_channels=3, patch_size=2, text_dim=12, time_embedding="dual")
    net = randomised(VelocityNet(cfg).double())
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(ROWS, 3, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.rand(ROWS, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    r = t * torch.rand(ROWS, generator=gen, dtype=torch.float64)
    return net, z, r, t, random_text(ROWS, 5, 12, seed=2, dtype=torch.float64)


def sana_case(tmp_path):
    net = randomised(load_diffusers_backbone(write_pipeline(tmp_path / "sana", "sana"), dtype=torch.float64))
    z, r, t, tokens, mask, _ = inputs(batch=ROWS)
    return net, z, r, t, (tokens, mask, None)  # SANA takes no pooled text


@pytest.mark.parametrize("model", ["dit", "sana"])
def test_chunked_jvp_equals_the_jvp_over_all_rows(tmp_path, model):
    net, z, r, t, text = dit_case() if model == "dit" else sana_case(tmp_path)
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=z.dtype)
    drop = torch.tensor([False, True, False, False, True])
    whole = time_derivative(net, z, r, t, v, text, drop, MeanFlowConfig(jvp_float32=False))
    assert whole.abs().mean() > 1e-2  # a real time dependence, not 0 == 0
    for chunk in (1, 2, ROWS, ROWS + 3):  # one row, a remainder chunk, exactly all, more than all
        chunked = time_derivative(net, z, r, t, v, text, drop, MeanFlowConfig(jvp_float32=False, jvp_chunk=chunk))
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12, msg=f"jvp_chunk={chunk}")


def test_chunked_jvp_leaves_the_loss_and_its_gradients_unchanged():
    net, x, _, _, text = dit_case()
    losses, grads = [], []
    for chunk in (0, 2):  # both the two-pass step: chunks split its JVP pass (the fused step has none)
        cfg = MeanFlowConfig(time=TimeSamplerConfig(r_neq_t=1.0), jvp_float32=False, jvp_chunk=chunk, jvp="explicit")
        loss, stats = MeanFlowLoss(cfg)(net, x, *text, generator=torch.Generator().manual_seed(4))
        net.zero_grad()
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert stats["jvp_rows"] == ROWS  # three chunks of 2, 2 and 1 rows
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def test_negative_jvp_chunk_is_refused():
    problems = MeanFlowConfig(jvp_chunk=-1).validate()
    assert any("jvp_chunk must be >= 0" in p for p in problems)
    assert MeanFlowConfig(jvp_chunk=4).validate() == []
