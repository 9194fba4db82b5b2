"""The diffusers backbones (emf_dist/backbones): loading, time convention, the adapter, EMF's
conversion, JVP-capable attention, freezing, checkpointing, and one MeanFlow step.

Every model is a tiny random-initialised config of the real diffusers class, written with
save_pretrained into a pipeline-like folder and loaded back through ``load_diffusers_backbone``.
"""

import copy
import json

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from emf_dist.backbones import (
    DiffusersBackbone,
    convert_to_meanflow,
    freeze_for_emf_finetune,
    is_diffusers_folder,
    load_diffusers_backbone,
)
from emf_dist.backbones.attention_processors import JvpJointAttnProcessor, JvpSanaAttnProcessor
from emf_dist.backbones.precision import promote_float64
from emf_dist.backbones.time_convention import convention_from_scheduler_config, read_time_convention
from emf_dist.meanflow import MeanFlowConfig, MeanFlowLoss, time_derivative
from tests.diffusers_backbone_helpers import FAMILIES, call_original, inputs, tiny_transformer, write_pipeline
from tests.helpers import randomised

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAMILY_NAMES = list(FAMILIES)


# The larger releases' options on the tiny configs: SANA 1.5's and SD3.5's q/k norms, SD3.5's
# second (image-only) attention.
VARIANTS = {"sana": ("sana", {}), "sd3": ("sd3", {}),
            "sana-qk-norm": ("sana", dict(qk_norm="rms_norm_across_heads")),
            "sd3.5": ("sd3", dict(qk_norm="rms_norm", dual_attention_layers=(0,)))}


def load(tmp_path, family, dtype=torch.float64, overrides=None, **kwargs):
    folder = write_pipeline(tmp_path / family, family, **(overrides or {}))
    return load_diffusers_backbone(folder, dtype=dtype, **kwargs)


def original(tmp_path, family, dtype=torch.float64):
    """The untouched diffusers model of the folder ``load`` wrote."""
    import diffusers

    model_class = getattr(diffusers, FAMILIES[family][0])
    return model_class.from_pretrained(tmp_path / family / "transformer", torch_dtype=dtype).to(dtype)


# --- conversion: step 0 equals the original, the interval path is live ---------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_backbone_equals_the_original_diffusers_model(tmp_path, variant):
    family, overrides = VARIANTS[variant]
    net = load(tmp_path, family, overrides=overrides)
    reference = original(tmp_path, family)
    assert net.cfg.time_embedding == "dual" and net.cfg.family == family
    z, r, t, tokens, mask, pooled = inputs()
    with torch.no_grad():
        expected = call_original(reference, family, z, t, tokens, mask, pooled)
        at_r_equals_t = net(z, t, t, tokens, mask, pooled)
        any_r = net(z, r, t, tokens, mask, pooled)  # the interval path adds exactly 0 at step 0
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(at_r_equals_t, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(any_r, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_interval_embedding_changes_the_output_once_trained(tmp_path, family):
    net = randomised(load(tmp_path, family))  # gives the zeroed interval output layer values
    interval = net.transformer.get_submodule(net.family.time_embedding_attr).interval_embedder
    assert interval.timestep_embedder.linear_2.weight.abs().min() > 0
    z, r, t, tokens, mask, pooled = inputs()
    with torch.no_grad():
        short, long = net(z, t - 0.01, t, tokens, mask, pooled), net(z, r, t, tokens, mask, pooled)
    assert (short - long).abs().mean() > 1e-3


def test_sana_interval_feeds_the_block_modulation_and_the_final_table(tmp_path):
    """AdaLayerNormSingle returns (blocks' 6 x dim modulation, embedded timestep for scale_shift_table):
    the interval reaches both."""
    time_embed = randomised(load(tmp_path, "sana")).transformer.time_embed
    timestep = torch.tensor([500.0, 500.0], dtype=torch.float64)
    interval = torch.tensor([0.0, 300.0], dtype=torch.float64)
    modulation, embedded = time_embed(torch.stack([timestep, interval], -1), batch_size=2, hidden_dtype=torch.float64)
    assert (modulation[0] - modulation[1]).abs().max() > 1e-3 and (embedded[0] - embedded[1]).abs().max() > 1e-3


def test_pipeline_can_still_call_the_converted_transformer(tmp_path):
    """A [B] timestep means r = t: the converted transformer keeps diffusers' call signature, and a
    backbone wrapped around it again sees the dual embedding."""
    net = randomised(load(tmp_path, "sana"))
    z, r, t, tokens, mask, pooled = inputs()
    with torch.no_grad():
        direct = call_original(net.transformer, "sana", z, t, tokens, mask, pooled)
        torch.testing.assert_close(direct, net(z, t, t, tokens, mask, pooled), rtol=1e-12, atol=1e-12)
        again = DiffusersBackbone(net.transformer, net.family, net.time)
        assert again.cfg.time_embedding == "dual"
        torch.testing.assert_close(again(z, r, t, tokens, mask, pooled), net(z, r, t, tokens, mask, pooled))
    with pytest.raises(ValueError, match="already"):
        convert_to_meanflow(again)


# --- the JVP pass ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_jvp_matches_float64_central_difference(tmp_path, family):
    # promote_float64: diffusers computes time features and SANA's linear attention in float32,
    # which would cap a float64 difference quotient; the twins are bit-identical in float32 (tested below).
    net = promote_float64(randomised(load(tmp_path, family)))
    z, r, t, tokens, mask, pooled = inputs()
    v = torch.randn_like(z)
    text, drop = (tokens, mask, pooled), torch.tensor([False, True, False])
    jvp = time_derivative(net, z, r, t, v, text, drop, MeanFlowConfig(jvp_float32=False))
    fd = time_derivative(net, z, r, t, v, text, drop, MeanFlowConfig(jvp="finite_difference", fd_eps=1e-7))
    assert jvp.abs().mean() > 0.1
    torch.testing.assert_close(jvp, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_jvp_processors_match_forward_ad_through_math_attention(tmp_path, variant):
    family, overrides = VARIANTS[variant]
    net = load(tmp_path, family, overrides=overrides)
    installed = set(net.processors.values())
    assert installed >= {JvpSanaAttnProcessor.__name__ if family == "sana" else JvpJointAttnProcessor.__name__}
    reference = original(tmp_path, family)  # diffusers' own processors
    z, _, t, tokens, mask, pooled = inputs()
    dz = torch.randn_like(z)
    with torch.no_grad(), fwAD.dual_level():
        ours = fwAD.unpack_dual(net(fwAD.make_dual(z, dz), t, fwAD.make_dual(t, torch.ones_like(t)),
                                    tokens, mask, pooled))
        with sdpa_kernel(SDPBackend.MATH):
            theirs = fwAD.unpack_dual(call_original(reference, family, fwAD.make_dual(z, dz),
                                                    fwAD.make_dual(t, torch.ones_like(t)), tokens, mask, pooled))
    assert theirs.tangent.abs().mean() > 0.1
    torch.testing.assert_close(ours.primal, theirs.primal, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.tangent, theirs.tangent, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_stock_processors_have_no_forward_ad(tmp_path, family):
    """Why the processors are replaced: fused SDPA refuses tangents."""
    write_pipeline(tmp_path / family, family)
    reference = original(tmp_path, family, dtype=torch.float32)
    z, _, t, tokens, mask, pooled = inputs(dtype=torch.float32)
    with torch.no_grad(), fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward AD"):
        call_original(reference, family, fwAD.make_dual(z, torch.randn_like(z)), t, tokens, mask, pooled)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_float64_twins_are_bit_identical_in_float32(tmp_path, family):
    net = randomised(load(tmp_path, family, dtype=torch.float32))
    promoted = promote_float64(copy.deepcopy(net))
    z, r, t, tokens, mask, pooled = inputs(dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(net(z, r, t, tokens, mask, pooled), promoted(z, r, t, tokens, mask, pooled))


# --- text: masks and the null condition ------------------------------------------------------------

def test_sd3_masks_padded_text_only_when_asked(tmp_path):
    z, r, t, tokens, mask, pooled = inputs()
    padded_changed = torch.where(mask[..., None], tokens, tokens + 1.0)
    for use_mask, should_change in ((False, True), (True, False)):
        # SD3.5's image-only attention gets the mask through joint_attention_kwargs too and must ignore it.
        folder = write_pipeline(tmp_path / f"sd3_{use_mask}", "sd3", **VARIANTS["sd3.5"][1])
        net = load_diffusers_backbone(folder, dtype=torch.float64, use_text_mask=use_mask)
        with torch.no_grad():
            change = (net(z, r, t, tokens, mask, pooled) - net(z, r, t, padded_changed, mask, pooled)).abs().max()
        assert (change > 1e-6) == should_change, (use_mask, change)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_dropped_rows_get_the_null_condition(tmp_path, family):
    net = load(tmp_path, family)
    z, r, t, tokens, mask, pooled = inputs()
    gen = torch.Generator().manual_seed(1)
    null_tokens, null_mask = torch.randn(3, tokens.shape[-1], generator=gen), torch.tensor([True, True, False])
    null_pooled = torch.randn(net.cfg.pooled_dim, generator=gen)
    explicit_pooled = null_pooled.double().expand_as(pooled) if net.cfg.pooled_dim else pooled  # SANA: none
    net.set_null_text(null_tokens, null_mask, null_pooled)
    drop = torch.tensor([True, False, True])
    explicit_tokens = torch.zeros_like(tokens)
    explicit_tokens[:, :3] = null_tokens.double()
    explicit_mask = torch.zeros_like(mask)
    explicit_mask[:, :3] = null_mask
    with torch.no_grad():
        dropped = net(z, r, t, tokens, mask, pooled, drop)
        null = net(z, r, t, explicit_tokens, explicit_mask, explicit_pooled)
        kept = net(z, r, t, tokens, mask, pooled)
    torch.testing.assert_close(dropped[drop], null[drop], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dropped[~drop], kept[~drop], rtol=1e-12, atol=1e-12)
    # The null condition travels in the state dict, whatever its length.
    fresh = load(tmp_path / "again", family)
    fresh.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(z, r, t, tokens, mask, pooled, drop), dropped, rtol=0, atol=0)


# --- loading, schedulers, errors -------------------------------------------------------------------

def test_is_diffusers_folder(tmp_path):
    pipeline = write_pipeline(tmp_path / "pipe", "sana")
    assert is_diffusers_folder(pipeline) and is_diffusers_folder(pipeline / "transformer")
    export = tmp_path / "export"
    export.mkdir()
    (export / "emf_model.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    assert not is_diffusers_folder(export) and not is_diffusers_folder(tmp_path / "empty")


def test_bare_transformer_folder_uses_the_documented_default(tmp_path):
    tiny_transformer("sd3").save_pretrained(tmp_path / "bare")
    net = load_diffusers_backbone(tmp_path / "bare", dtype=torch.float64)
    assert net.time.num_train_timesteps == 1000 and net.time.source.startswith("default")
    assert net.cfg.pooled_dim == 10 and not net.cfg.use_text_mask


def test_unsupported_transformer_class_names_the_supported_ones(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    unet = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1"}
    (folder / "config.json").write_text(json.dumps(unet))
    with pytest.raises(ValueError, match="UNet2DConditionModel.*SanaTransformer2DModel, SD3Transformer2DModel"):
        load_diffusers_backbone(folder)
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ValueError, match="without a transformer"):
        load_diffusers_backbone(tmp_path / "pipe")


def test_unsupported_transformer_options_are_refused():
    from emf_dist.backbones.families import family_for
    from emf_dist.backbones.time_convention import FlowTimeConvention

    sprint = tiny_transformer("sana", guidance_embeds=True)
    with pytest.raises(ValueError, match="guidance_embeds"):
        DiffusersBackbone(sprint, family_for("SanaTransformer2DModel"), FlowTimeConvention())


def test_diffusion_schedulers_are_refused(tmp_path):
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    for scheduler, match in ((DDPMScheduler(), "DDPMScheduler"),
                             (DPMSolverMultistepScheduler(), "'epsilon'"),
                             (DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                          use_karras_sigmas=True), "use_karras_sigmas"),
                             (FlowMatchEulerDiscreteScheduler(invert_sigmas=True), "invert_sigmas")):
        folder = write_pipeline(tmp_path / type(scheduler).__name__ / match.strip("'"), "sana", scheduler=scheduler)
        with pytest.raises(ValueError, match=match):
            load_diffusers_backbone(folder)


def test_time_convention_read_from_the_scheduler(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sana = load(tmp_path, "sana", dtype=torch.float32)
    assert sana.time.shift == 3.0 and "DPMSolverMultistepScheduler" in sana.time.source
    # The model is called at sigma * N whatever the shift; SANA's timestep_scale multiplies it.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=500, shift=3.0)
    scheduler.save_pretrained(tmp_path / "sched")
    time = read_time_convention(tmp_path / "sched", timestep_scale=2.0)
    assert time.num_train_timesteps == 500 and time.model_timestep(torch.tensor(0.25)).item() == 250.0
    # The scheduler calls the model at timesteps = sigmas * N, and the sigmas it visits are our
    # ``shifted`` of a uniform grid (from 1 to its sigma_min, itself shifted(1 / N)).
    scheduler.set_timesteps(4)
    sigmas = scheduler.sigmas[:-1].double()
    torch.testing.assert_close(scheduler.timesteps.double(), sigmas * 500)
    uniform = torch.linspace(1.0, scheduler.sigma_min, 4, dtype=torch.float64)
    torch.testing.assert_close(time.shifted(uniform), sigmas, rtol=1e-6, atol=1e-6)
    assert convention_from_scheduler_config(dict(scheduler.config)).shift == 3.0


# --- training: freezing, checkpointing, the MeanFlow step ------------------------------------------

TRAINED = {"sana": ("transformer_blocks", "time_embed", "scale_shift_table"),
           "sd3": ("transformer_blocks", "time_text_embed.timestep_embedder", "time_text_embed.interval_embedder",
                   "norm_out")}
FROZEN = {"sana": ("patch_embed", "caption_projection", "caption_norm", "proj_out"),
          "sd3": ("pos_embed", "context_embedder", "time_text_embed.text_embedder", "proj_out")}


def _parameters_of(transformer, paths):
    out = set()
    for path in paths:
        try:
            out |= {id(p) for p in transformer.get_submodule(path).parameters()}
        except AttributeError:
            out.add(id(transformer.get_parameter(path)))
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_freezing_leaves_exactly_emf_groups_trainable(tmp_path, family):
    net = load(tmp_path, family, dtype=torch.float32)
    names = freeze_for_emf_finetune(net)
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == _parameters_of(net.transformer, TRAINED[family])
    assert not trainable & _parameters_of(net.transformer, FROZEN[family])
    assert len(names) == len(trainable) and any("interval_embedder" in name for name in names)
    everything = {id(p) for p in net.parameters()}
    assert everything == _parameters_of(net.transformer, TRAINED[family] + FROZEN[family])


def _meanflow_grads(net, seed=0):
    z, _, _, tokens, mask, pooled = inputs(batch=4, dtype=torch.float32)
    objective = MeanFlowLoss(MeanFlowConfig(text_drop=0.5))
    net.zero_grad(set_to_none=True)
    loss, stats = objective(net, z, tokens, mask, pooled, generator=torch.Generator().manual_seed(seed))
    loss.backward()
    return loss, stats, {name: p.grad for name, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_meanflow_step_trains_the_backbone(tmp_path, family):
    net = randomised(load(tmp_path, family, dtype=torch.float32))
    trainable = freeze_for_emf_finetune(net)
    loss, stats, grads = _meanflow_grads(net)
    assert torch.isfinite(loss) and stats["jvp_rows"] > 0
    assert sorted(grads) == sorted(trainable)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for name, g in grads.items() if "interval_embedder.timestep_embedder.linear_2" in name)
    assert all(p.grad is None for p in net.parameters() if not p.requires_grad)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, family):
    net = randomised(load(tmp_path, family, dtype=torch.float32))
    freeze_for_emf_finetune(net)
    block, calls = net.transformer.transformer_blocks[0], []
    forward = block.forward

    def counted(*args, **kwargs):  # not a forward hook: torch does not run hooks when it recomputes
        calls.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    block.forward = counted
    loss, _, plain = _meanflow_grads(net)
    plain_calls, calls[:] = list(calls), []
    net.cfg.checkpointing = True
    loss_ckpt, _, checkpointed = _meanflow_grads(net)
    # The JVP pass (no grad) and the gradient pass run block 0 once each; checkpointing recomputes
    # it in the backward pass, with gradients on.
    assert plain_calls == [False, True] and calls == [False, True, True]
    assert net.transformer.gradient_checkpointing
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)
