"""Bring your own SD3, from prep to training, on a tiny random SD3 pipeline folder
(tests/sd3_pipeline_helpers.py):

    emf prep (a local Ray instance; the pipeline's CLIP-L + CLIP-G + T5 text states and KL latents)
    -> the training driver's checks for mode=meanflow_finetune init_from=PIPELINE -> the parent with
    the pipeline's null condition -> MeanFlow steps of the converted SD3 on batches read from the shards

in one process (no Ray Train workers: tests/test_pretrained_distributed.py runs those for SANA).
Shards of an SD3 pipeline with one other encoder are refused, naming it.
"""
from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests must never reach a hub

import numpy as np
import pytest
import torch
import webdataset as wds

from data_prep.config import PrepConfig
from data_prep.job import run_prep
from emf_dist.backbones import BackboneConfig
from emf_dist.config import from_dict, load_config
from emf_dist.manifest import read_manifest
from emf_dist.train.config import TrainConfig
from emf_dist.train.driver import check_data, resolve_model
from emf_dist.train.local import train_local
from emf_dist.train.pretrained import load_backbone_parent, write_null_text
from emf_dist.train.setup import build_batches, build_model, build_objective, build_teacher
from tests.sd3_pipeline_helpers import (
    LATENT_CHANNELS,
    LATENT_SIDE,
    POOLED_DIM,
    RESOLUTION,
    SD3,
    T5_LENGTH,
    TEXT_LENGTH,
    pipeline_encoding,
    write_sd3_pipeline,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return write_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipeline")


@pytest.fixture(scope="module")
def dataset(ray_local, pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    cfg = load_config(PrepConfig, None, [
        f"out={out}", "progress=false", "source.count=8", "samples_per_shard=4", f"encoder.name={pipeline}",
        f"encoder.max_length={T5_LENGTH}", "image.kind=latent", f"image.vae={pipeline}",
        f"image.resolution={RESOLUTION}", f"source.scenes.resolution={RESOLUTION}"])
    run_prep(cfg, echo=lambda _: None)
    return str(out)


def train_config(dataset, init_from, storage, **over) -> TrainConfig:
    base = {"name": "sd3-emf", "storage_path": str(storage), "mode": "meanflow_finetune", "init_from": str(init_from),
            "data": {"url": dataset, "loader_workers": 0, "shuffle_buffer": 4}, "encoder": {"max_length": T5_LENGTH},
            "model": {"checkpointing": False}, "scaling": {"num_workers": 1}, "steps": 2, "micro_batch": 2, "optim": {"lr": 1e-3, "warmup_steps": 1},
            "objective": {"time": {"r_neq_t": 1.0, "r_neq_t_end": 1.0}}}
    return from_dict(TrainConfig, {**base, **over}, validate=True)


def test_the_shards_hold_the_pipelines_text_states_in_the_transformers_shapes(dataset, pipeline):
    manifest = read_manifest(dataset)
    assert manifest.text_shapes == {"tokens": [TEXT_LENGTH, SD3["joint_attention_dim"]], "mask": [TEXT_LENGTH],
                                    "pooled": [SD3["pooled_projection_dim"]]}
    assert manifest.encoder["prompt"]["pipeline"] == "StableDiffusion3Pipeline"
    assert manifest.image.shape == [LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE]
    assert (manifest.image.vae_class, manifest.image.shift_factor) == ("AutoencoderKL", 0.1)
    samples = list(wds.WebDataset(manifest.shard_urls(dataset), shardshuffle=False).decode())[:3]
    tokens, _, pooled, _ = pipeline_encoding(pipeline, [s["txt"] for s in samples])
    for i, sample in enumerate(samples):  # float16 in the shards
        assert sample["mask.npy"].shape == (TEXT_LENGTH,) and sample["mask.npy"].all()
        np.testing.assert_allclose(sample["tokens.npy"].astype(np.float32), tokens[i].numpy(), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(sample["pooled.npy"].astype(np.float32), pooled[i].numpy(), rtol=1e-3, atol=1e-3)


def test_the_driver_accepts_them_for_the_sd3_folder_and_meanflow_steps_run_on_them(dataset, pipeline, tmp_path):
    cfg = resolve_model(train_config(dataset, pipeline, tmp_path))
    assert cfg.model == BackboneConfig(family="sd3", class_name="SD3Transformer2DModel", input_size=LATENT_SIDE,
                                       in_channels=LATENT_CHANNELS, patch_size=2, text_dim=SD3["joint_attention_dim"],
                                       pooled_dim=POOLED_DIM, use_text_mask=False, time_embedding="dual",
                                       checkpointing=False)
    assert cfg.encoder.name == str(pipeline)  # the pipeline's own encoders, left at the default
    manifest, encoder = check_data(cfg)
    write_null_text(cfg, encoder)
    parent = load_backbone_parent(cfg)
    # The null condition is the pipeline's negative prompt "" at the training length.
    _, negative, _, negative_pooled = pipeline_encoding(pipeline, [""])
    torch.testing.assert_close(parent.null_tokens, negative[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(parent.null_pooled, negative_pooled[0], rtol=1e-3, atol=1e-3)
    assert parent.null_mask.shape == (TEXT_LENGTH,) and parent.null_mask.all()
    model = build_model(cfg, parent)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    result = train_local(model, build_objective(cfg, build_teacher(cfg, parent, "cpu")), [build_batches(cfg, 0, 1)], cfg)
    assert len(result["mse"]) == 2 and all(np.isfinite(result["mse"]))
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters() if p.requires_grad)


def test_shards_of_another_sd3_encoder_are_refused_naming_it(dataset, tmp_path):
    other = write_sd3_pipeline(tmp_path / "other", encoder_seeds={"text_encoder_2": 9})  # another CLIP-G
    cfg = resolve_model(train_config(dataset, other, tmp_path))
    with pytest.raises(ValueError, match=r"encoded by text encoder .*pipeline \(weights [0-9a-f]{12}\.\.\), not by the "
                                         r"model's \(\S*other/text_encoder_2, weights [0-9a-f]{12}\.\.\): prepare the "
                                         r"data with encoder.name=\S*other$"):
        check_data(cfg)
