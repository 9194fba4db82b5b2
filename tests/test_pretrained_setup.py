"""Training from a diffusers folder, on the driver and in one process: resolving the run's model,
the refusals before any worker starts, the model and teacher the workers build. Tiny random SANA pipelines written with save_pretrained (tests/pretrained_helpers.py)."""

import json

import pytest
import torch

from emf_dist.backbones import BackboneConfig, DiffusersBackbone
from emf_dist.config import from_dict, to_dict
from emf_dist.text_encoder import TextEncoder
from emf_dist.train.config import TrainConfig
from emf_dist.train.driver import resolve_model
from emf_dist.train.pretrained import load_backbone_parent, write_null_text
from emf_dist.train.setup import build_model, build_teacher
from tests.pretrained_helpers import TEXT_DIM, TEXT_LENGTH, write_sana_pipeline

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
