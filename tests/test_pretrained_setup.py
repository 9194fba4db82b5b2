"""Training from a diffusers folder or a backbone's export, on the driver and in one process: resolving
the run's model, the refusals before any worker starts, the model and teacher the workers build. Tiny random SANA pipelines written with save_pretrained (tests/pretrained_helpers.py)."""

import json

import pytest
import torch

from emf_dist.backbones import BackboneConfig, DiffusersBackbone
from emf_dist.config import from_dict, to_dict
from emf_dist.export import export_model
from emf_dist.text_encoder import TextEncoder
from emf_dist.train.config import TrainConfig
from emf_dist.train.driver import resolve_model
from emf_dist.train.pretrained import load_backbone_parent, write_null_text
from emf_dist.train.setup import build_model, build_objective, build_teacher
from emf_dist.train.worker import load_parent
from tests.pretrained_helpers import TEXT_DIM, TEXT_LENGTH, trained_backbone, write_sana_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return write_sana_pipeline(tmp_path_factory.mktemp("sana") / "pipeline")


def config(tmp_path, init_from, **over) -> TrainConfig:
    base = {"init_from": str(init_from), "data": {"url": str(tmp_path / "no-data")},
            "storage_path": str(tmp_path / "runs"), "encoder": {"max_length": TEXT_LENGTH}, "mode": "meanflow_finetune"}
    return from_dict(TrainConfig, {**base, **over}, validate=True)


@pytest.mark.parametrize("mode, embedding", [("meanflow_finetune", "dual"), ("flow_matching", "single")])
def test_the_run_config_describes_the_backbone_that_trains(tmp_path, pipeline, mode, embedding):
    for init_from in (pipeline, pipeline / "transformer"):  # a pipeline folder or the transformer's own
        cfg = resolve_model(config(tmp_path, init_from, mode=mode, model={"checkpointing": False}))
        assert cfg.model == BackboneConfig(family="sana", class_name="SanaTransformer2DModel", input_size=8,
                                           in_channels=4, patch_size=2, text_dim=TEXT_DIM, pooled_dim=0,
                                           use_text_mask=True, time_embedding=embedding, checkpointing=False)
        # What the workers and train_config.json get reads back as the same config.
        assert from_dict(TrainConfig, to_dict(cfg), validate=True) == cfg
    assert resolve_model(config(tmp_path, pipeline)).encoder.name == str(pipeline)  # the pipeline's text encoder
    assert resolve_model(config(tmp_path, pipeline / "transformer")).encoder.name == "minilm"  # none there


def test_unsupported_folders_and_modes_are_refused_before_workers_start(tmp_path, pipeline):
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0"}))
    with pytest.raises(ValueError, match="unsupported diffusers transformer 'UNet2DConditionModel'; supported: "
                                         "SanaTransformer2DModel, SD3Transformer2DModel"):
        resolve_model(config(tmp_path, unet))
    with pytest.raises(ValueError, match="not meanflow_distill"):
        resolve_model(config(tmp_path, pipeline, mode="meanflow_distill", distill={"teacher_steps": 2}))
    sprint = write_sana_pipeline(tmp_path / "sprint", transformer_overrides={"guidance_embeds": True})
    with pytest.raises(ValueError, match="guidance_embeds=True"):
        resolve_model(config(tmp_path, sprint))
    with pytest.raises(ValueError, match="continues pretraining from a diffusers"):
        resolve_model(config(tmp_path, tmp_path, mode="flow_matching"))
    with pytest.raises(ValueError, match="the decoupled one is written for our DiT"):
        resolve_model(config(tmp_path, pipeline, model={"time_embedding": "decoupled", "decoder_depth": 1}))


def _built(tmp_path, pipeline, **over):
    cfg = resolve_model(config(tmp_path, pipeline, **over))
    write_null_text(cfg, TextEncoder(cfg.encoder))
    parent = load_backbone_parent(cfg)
    return cfg, parent, build_model(cfg, parent)


def test_finetune_builds_the_converted_model_and_keeps_the_unconverted_parent_as_teacher(tmp_path, pipeline):
    cfg, parent, model = _built(tmp_path, pipeline, objective={"velocity": "teacher"})
    teacher = build_teacher(cfg, parent, "cpu")
    assert teacher is parent and model is not parent
    assert (model.cfg.time_embedding, teacher.cfg.time_embedding) == ("dual", "single")
    assert not any(p.requires_grad for p in teacher.parameters())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("interval_embedder" in name for name in trainable)
    assert not any(name.startswith(("transformer.patch_embed", "transformer.caption_projection")) for name in trainable)
    gen = torch.Generator().manual_seed(0)
    z, tokens = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, TEXT_LENGTH, TEXT_DIM, generator=gen)
    mask, t = torch.ones(2, TEXT_LENGTH, dtype=torch.bool), torch.tensor([0.3, 0.9])
    with torch.no_grad():  # EMF's conversion: the fine-tune starts at its parent, for every r
        torch.testing.assert_close(model(z, t * 0.5, t, tokens, mask, None), teacher(z, t, t, tokens, mask, None))
    # The null condition is the pipeline's encoding of "", in the model as well as in the teacher.
    null = TextEncoder(cfg.encoder).encode_null()
    torch.testing.assert_close(model.null_tokens, null.tokens[0].float())
    assert torch.equal(model.null_mask, null.mask[0])


def test_emf_freeze_off_trains_everything_and_flow_matching_continues_the_parent(tmp_path, pipeline):
    _, _, model = _built(tmp_path, pipeline, emf_freeze=False)
    assert all(p.requires_grad for p in model.parameters())
    cfg, parent, model = _built(tmp_path, pipeline, mode="flow_matching")
    assert model is parent and isinstance(model, DiffusersBackbone) and model.cfg.time_embedding == "single"
    assert all(p.requires_grad for p in model.parameters()) and build_teacher(cfg, parent, "cpu") is None


@pytest.fixture(scope="module")
def sana_exports(pipeline, tmp_path_factory):
    """Exports of a fine-tuned MeanFlow SANA and of a continued flow-matching one (weights moved off their start)."""
    folder = tmp_path_factory.mktemp("exports")
    out = {}
    for mode in ("meanflow_finetune", "flow_matching"):
        model, _, info = trained_backbone(folder / mode, pipeline, mode)
        out[mode] = (export_model(model, info, folder / mode / "export", scheduler_dir=str(pipeline / "scheduler")),
                     model, info)
    return out


def test_distillation_from_a_backbone_export_builds_its_copy_as_student_and_the_export_as_teacher(
        tmp_path, pipeline, sana_exports):
    export, trained, info = sana_exports["meanflow_finetune"]
    cfg = resolve_model(config(tmp_path, export, mode="meanflow_distill", distill={"teacher_steps": 2, "text_drop": 0}))
    assert cfg.model == info.model and cfg.model.time_embedding == "dual"
    assert cfg.encoder.name == str(pipeline)  # the export's text encoder, as for a run from the pipeline
    assert from_dict(TrainConfig, to_dict(cfg), validate=True) == cfg
    parent = load_parent(cfg)  # what every worker loads: the export, with its own null condition
    student, teacher = build_model(cfg, parent), build_teacher(cfg, parent, "cpu")
    assert teacher is parent and student is not parent
    assert all(p.requires_grad for p in student.parameters()) and not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(student.null_tokens, trained.null_tokens)

    gen = torch.Generator().manual_seed(0)
    x, tokens = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, TEXT_LENGTH, TEXT_DIM, generator=gen)
    mask = torch.ones(2, TEXT_LENGTH, dtype=torch.bool)
    loss, stats = build_objective(cfg, teacher)(student, x, tokens, mask, None, generator=torch.Generator().manual_seed(1))
    # The oracle: the teacher's two MeanFlow steps and the student's one step, written out here.
    draws = torch.Generator().manual_seed(1)
    torch.rand(2, generator=draws)  # the objective's text-dropout draw (text_drop 0: no row dropped)
    noise = torch.randn(x.shape, generator=draws)
    with torch.no_grad():
        half, one, zero = torch.full((2,), 0.5), torch.ones(2), torch.zeros(2)
        mid = noise - 0.5 * trained(noise, half, one, tokens, mask, None)
        x_2 = mid - 0.5 * trained(mid, zero, half, tokens, mask, None)
        err = (trained(noise, zero, one, tokens, mask, None) - (noise - x_2)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(stats["mse"], err.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.detach(), (err * (err + 1e-3).pow(-0.5)).mean(), rtol=1e-5, atol=1e-7)
    assert err.min() > 0  # two steps differ from one: something to distil
    loss.backward()
    assert all(p.grad is not None for p in student.transformer.transformer_blocks.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_distillation_refuses_what_is_not_a_meanflow_model_before_workers_start(tmp_path, pipeline, sana_exports):
    flow_matching_export = sana_exports["flow_matching"][0]
    with pytest.raises(ValueError, match="flow-matching model .*meanflow_distill needs a MeanFlow export"):
        resolve_model(config(tmp_path, flow_matching_export, mode="meanflow_distill"))
    with pytest.raises(ValueError, match=r"not meanflow_distill: it is a flow-matching model .* fine-tune it first "
                                         r"\(mode meanflow_finetune\) and distil that run's export"):
        resolve_model(config(tmp_path, pipeline, mode="meanflow_distill"))
    with pytest.raises(ValueError, match="EMF's fine-tune starts from the diffusers folder itself"):
        resolve_model(config(tmp_path, flow_matching_export, mode="meanflow_finetune"))
