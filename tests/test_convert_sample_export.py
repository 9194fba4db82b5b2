"""Conversion, samplers, EMA, export and `emf generate`, on real components."""

import json
import os

import numpy as np
import pytest
import torch

from emf_app.cli import main as emf
from emf_dist.convert import freeze_for_emf_finetune, meanflow_from_flow_matching
from emf_dist.ema import EMA
from emf_dist.export import ExportInfo, SamplingInfo, export_model, load_model
from emf_dist.model import VelocityNet
from emf_dist.samplers import sample
from emf_dist.text_encoder import TextEncoder, TextEncoderConfig
from tests.helpers import random_text, randomised, tiny_config


@pytest.mark.parametrize("prediction", ["velocity", "data"])
def test_conversion_keeps_outputs_of_the_flow_matching_model(prediction):
    torch.manual_seed(0)
    fm_cfg = tiny_config(time_embedding="single", prediction=prediction)
    fm = randomised(VelocityNet(fm_cfg))
    mf = meanflow_from_flow_matching(fm_cfg, fm.state_dict())
    assert mf.cfg.time_embedding == "dual"
    z = torch.randn(3, 3, 8, 8)
    t = torch.tensor([0.9, 0.5, 0.1])
    text = random_text(3, 5, fm_cfg.text_dim)
    with torch.no_grad():
        reference = fm(z, t, t, *text)
        torch.testing.assert_close(mf(z, t, t, *text), reference, rtol=0, atol=0)
        # The interval path starts as a no-op, so even r != t gives the parent's output.
        torch.testing.assert_close(mf(z, torch.zeros(3), t, *text), reference, rtol=0, atol=0)
    # ... and it is trainable: its output layer gets a gradient.
    mf(z, torch.zeros(3), t, *text).square().sum().backward()
    assert mf.t_interval_embedder.mlp[2].weight.grad.abs().sum() > 0


def test_data_prediction_returns_the_velocity_of_its_clean_image_and_one_step_gives_that_image():
    """prediction: data is the velocity network's last layer read as x: u = (z - x) / max(t, data_min_t)."""
    torch.manual_seed(0)
    velocity_net = randomised(VelocityNet(tiny_config()))
    data_net = VelocityNet(tiny_config(prediction="data", data_min_t=0.05))
    data_net.load_state_dict(velocity_net.state_dict())
    z = torch.randn(4, 3, 8, 8)
    r, t = torch.tensor([0.0, 0.2, 0.0, 0.01]), torch.tensor([1.0, 0.7, 0.3, 0.02])
    text = random_text(4, 5, 12)
    with torch.no_grad():
        x = velocity_net(z, r, t, *text)  # the shared last layer's output, read as a clean image
        u = data_net(z, r, t, *text)
        torch.testing.assert_close(u, (z - x) / torch.tensor([1.0, 0.7, 0.3, 0.05]).view(-1, 1, 1, 1))
        one_step = velocity_net(z, torch.zeros(4), torch.ones(4), *text)
        torch.testing.assert_close(sample(data_net, z, *text, steps=1), one_step)
    assert tiny_config(prediction="data", data_min_t=0.0).validate()


@pytest.mark.parametrize("prediction", ["velocity", "data"])
def test_the_decoupled_conversion_is_the_parent_read_as_encoder_and_decoder(prediction):
    """Decoupled MeanFlow: the parent's weights as they are; at r = t its output; with every block in
    the decoder, velocity prediction gives the parent at time r for any t (each block and the final layer
    see only phi(r)); with one decoder block the output moves with r, and only that block sees it."""
    torch.manual_seed(0)
    fm_cfg = tiny_config(time_embedding="single", prediction=prediction, depth=3)
    fm = randomised(VelocityNet(fm_cfg))
    one = meanflow_from_flow_matching(fm_cfg, fm.state_dict(), "decoupled", decoder_depth=1)
    assert (one.cfg.time_embedding, one.cfg.decoder_depth, one.first_decoder_block) == ("decoupled", 1, 2)
    assert set(one.state_dict()) == set(fm.state_dict())  # no new parameter
    z = torch.randn(3, 3, 8, 8)
    r, t = torch.tensor([0.0, 0.3, 0.05]), torch.tensor([0.9, 0.5, 0.1])
    text = random_text(3, 5, fm_cfg.text_dim)
    with torch.no_grad():
        torch.testing.assert_close(one(z, t, t, *text), fm(z, t, t, *text), rtol=0, atol=0)
        assert (one(z, r, t, *text) - fm(z, t, t, *text)).abs().max() > 1e-3
        seen = []
        hooks = [block.register_forward_hook(lambda m, args, out: seen.append(args[1].clone())) for block in one.blocks]
        one(z, r, t, *text)
        for hook in hooks:
            hook.remove()
        c_t, c_r = one.condition(r, t, one.text_context(*text).pooled)
        assert [torch.equal(c, c_t) for c in seen] == [True, True, False] and torch.equal(seen[2], c_r)
    if prediction == "velocity":
        whole = meanflow_from_flow_matching(fm_cfg, fm.state_dict(), "decoupled", decoder_depth=3)
        with torch.no_grad():
            torch.testing.assert_close(whole(z, r, t, *text), fm(z, r, r, *text), rtol=0, atol=0)
    assert tiny_config(time_embedding="decoupled", decoder_depth=0).validate()
    assert tiny_config(time_embedding="decoupled", decoder_depth=3).validate()  # depth 2
    assert tiny_config(time_embedding="dual", decoder_depth=1).validate()


def test_conversion_refuses_a_meanflow_model():
    cfg = tiny_config(time_embedding="dual")
    with pytest.raises(ValueError, match="already dual"):
        meanflow_from_flow_matching(cfg, VelocityNet(cfg).state_dict())


def test_emf_finetune_freezes_all_but_blocks_time_embeddings_and_final_modulation():
    model = VelocityNet(tiny_config())
    names = freeze_for_emf_finetune(model)
    assert any(n.startswith("blocks.") for n in names)
    assert any(n.startswith("t_interval_embedder.") for n in names)
    assert "final.adaLN.1.weight" in names
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {"patch_embed.weight", "final.linear.weight", "null_token", "text_proj.1.weight"} <= frozen


class _ConstantVelocity(torch.nn.Module):
    """u = z - target: both samplers must land on ``target`` exactly in one step."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, z, r, t, *text):
        return z - self.target


def test_one_step_sampler_is_x_equals_z1_minus_u():
    target = torch.randn(2, 3, 4, 4)
    noise = torch.randn(2, 3, 4, 4)
    text = random_text(2, 3, 4)
    out = sample(_ConstantVelocity(target), noise, *text, steps=1)
    torch.testing.assert_close(out, target)


def test_k_step_meanflow_sampler_is_exact_for_the_true_average_velocity():
    """For the linear path from a fixed x, the average velocity over any [r, t] is e - x = (z_t - x)/t."""
    x = torch.randn(2, 3, 4, 4)

    class TrueAverage(torch.nn.Module):
        def forward(self, z, r, t, *text):
            return (z - x) / t.view(-1, 1, 1, 1)

    text = random_text(2, 3, 4)
    for steps in (1, 2, 4, 7):
        torch.testing.assert_close(sample(TrueAverage(), torch.randn(2, 3, 4, 4), *text, steps=steps), x)


def test_cfg_sampling_combines_conditional_and_unconditional():
    torch.manual_seed(0)
    cfg = tiny_config()
    net = randomised(VelocityNet(cfg))
    noise = torch.randn(2, 3, 8, 8)
    text = random_text(2, 5, cfg.text_dim)
    with torch.no_grad():
        one = torch.ones(2)
        cond = net(noise, 0 * one, one, *text)
        uncond = net(noise, 0 * one, one, *text, torch.ones(2, dtype=torch.bool))
    out = sample(net, noise, *text, steps=1, guidance_scale=3.0)
    torch.testing.assert_close(out, noise - (uncond + 3.0 * (cond - uncond)), rtol=1e-5, atol=1e-5)

    # A row whose text is dropped is sampled unconditionally, unguided; the other keeps its guidance.
    mixed = sample(net, noise, *text, steps=1, guidance_scale=3.0, drop_text=torch.tensor([True, False]))
    torch.testing.assert_close(mixed[0], noise[0] - uncond[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], out[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("time_embedding", ["dual", "decoupled"])
def test_samplers_with_the_text_projected_once_equal_whole_forwards_at_every_step(time_embedding):
    """sample() computes the DiT's text share once per batch; each step must still be the whole
    forward's u, with dropped rows, for every time embedding: to the bit unguided, to rounding guided."""
    cfg = tiny_config(time_embedding=time_embedding, decoder_depth=1 if time_embedding == "decoupled" else 0)
    net = randomised(VelocityNet(cfg))
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    text = random_text(3, 5, cfg.text_dim, dtype=torch.float16)  # stored text is float16
    drop = torch.tensor([False, True, False])

    def whole_forwards(steps, scale):
        z, times = noise, torch.linspace(1.0, 0.0, steps + 1)
        with torch.no_grad():
            for t_now, t_next in zip(times[:-1], times[1:]):
                t, r = t_now.expand(3), t_next.expand(3)
                u_cond, u_drop = net(z, r, t, *text), net(z, r, t, *text, torch.ones(3, dtype=torch.bool))
                u = u_cond if scale == 1.0 else u_drop + scale * (u_cond - u_drop)
                z = z - (t_now - t_next) * torch.where(drop.view(-1, 1, 1, 1), u_drop, u)
        return z

    for steps in (1, 4):
        assert torch.equal(sample(net, noise, *text, steps=steps, drop_text=drop), whole_forwards(steps, 1.0))
    # Guided, the sampler runs both halves in one doubled batch: equal up to the batch's summation order.
    torch.testing.assert_close(sample(net, noise, *text, steps=3, guidance_scale=2.5, drop_text=drop),
                               whole_forwards(3, 2.5), rtol=1e-6, atol=1e-6)


def test_ema_tracks_and_round_trips():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(50):
        ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], torch.ones(2, 3))
    other = EMA(torch.nn.Linear(3, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 50 and other.decay == 0.5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small MeanFlow model on the real packaged encoder, exported."""
    torch.manual_seed(0)
    enc_cfg = TextEncoderConfig(max_length=8)
    encoder = TextEncoder(enc_cfg)
    model = randomised(VelocityNet(tiny_config(text_dim=encoder.dim, input_size=16)))
    out = tmp_path_factory.mktemp("export") / "model"
    export_model(model, ExportInfo(model.cfg, enc_cfg, encoder.fingerprint(), SamplingInfo(steps=2)), out)
    return out, model


def test_export_round_trip_gives_the_same_network(exported):
    folder, model = exported
    assert sorted(os.listdir(folder)) == ["emf_model.json", "model.safetensors"]
    loaded, info = load_model(folder)
    assert info.sampling.steps == 2 and info.model == model.cfg
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)


def test_generate_writes_a_deterministic_png(exported, tmp_path):
    from PIL import Image

    folder, _ = exported
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert emf(["generate", "--model", str(folder), "--steps", "1", "--seed", "3", "--out", str(a), "a red circle"]) == 0
    assert emf(["generate", "--model", str(folder), "--steps", "1", "--seed", "3", "--out", str(b), "a red circle"]) == 0
    image = np.asarray(Image.open(a))
    assert image.shape == (16, 16, 3) and image.std() > 0
    assert np.array_equal(image, np.asarray(Image.open(b)))


def test_generate_reports_a_missing_or_wrong_model_folder(tmp_path, capsys):
    assert emf(["generate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png"), "hi"]) == 3
    assert "does not exist" in capsys.readouterr().err
    assert emf(["generate", "--model", str(tmp_path), "--out", str(tmp_path / "x.png"), "hi"]) == 3
    assert "emf_model.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_generate_refuses_a_model_trained_with_another_encoder(exported, tmp_path, capsys):
    folder, _ = exported
    copy = tmp_path / "model"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    info = json.loads((folder / "emf_model.json").read_text())
    info["encoder_fingerprint"]["weights_sha256"] = "0" * 64
    (copy / "emf_model.json").write_text(json.dumps(info))
    assert emf(["generate", "--model", str(copy), "--out", str(tmp_path / "x.png"), "hi"]) == 2
    assert "weights_sha256" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        emf(["--help"])
    out = capsys.readouterr().out
    assert "generate" in out and "demo" in out
