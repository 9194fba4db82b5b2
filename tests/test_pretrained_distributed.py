"""Bring your own SANA, end to end on real Ray workers and DeepSpeed engines, on a tiny random SANA
pipeline folder (tests/pretrained_helpers.py):

    emf prep (the pipeline's Gemma-2 text states + DC-AE latents) -> emf train mode=meanflow_finetune
    init_from=PIPELINE (2 workers) -> export -> emf generate (a decoded PNG)
    -> emf train mode=meanflow_distill init_from=that export -> export -> emf generate

One local Ray instance, one pipeline folder and one prepared dataset serve the module (as in
tests/test_train_distributed.py); every run is 2 workers on gloo.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

from emf_app.cli import main as emf
from emf_dist.config import from_dict
from emf_dist.export import load_model, read_export_info
from emf_dist.manifest import read_manifest
from emf_dist.train.checkpoint import consolidated_weights
from emf_dist.train.config import TrainConfig
from emf_dist.train.driver import resolve_model, train
from emf_dist.train.pretrained import check_export_parts
from tests.pretrained_helpers import (
    LATENT_CHANNELS,
    LATENT_SIDE,
    RESOLUTION,
    TEXT_DIM,
    TEXT_LENGTH,
    write_sana_pipeline,
)

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return write_sana_pipeline(tmp_path_factory.mktemp("sana") / "pipeline")


@pytest.fixture(scope="module")
def dataset(ray_session, pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    assert emf(["prep", f"out={out}", "samples_per_shard=16", "source.count=32", f"encoder.name={pipeline}",
                f"encoder.max_length={TEXT_LENGTH}", "image.kind=latent", f"image.vae={pipeline}",
                f"image.resolution={RESOLUTION}", f"source.scenes.resolution={RESOLUTION}", "progress=false"]) == 0
    return str(out)


def run_overrides(dataset, pipeline, storage, name, *extra) -> list[str]:
    # All rows r != t: every step runs the JVP pass (through ZeRO-3's hooked modules at stage 3).
    return [f"name={name}", f"storage_path={storage}", "mode=meanflow_finetune", f"init_from={pipeline}",
            f"data.url={dataset}", "data.loader_workers=0", "data.shuffle_buffer=4", f"encoder.max_length={TEXT_LENGTH}",
            "steps=3", "micro_batch=2", "checkpoint_every=3", "optim.lr=1e-3", "optim.warmup_steps=1",
            "objective.time.r_neq_t=1.0", "objective.time.r_neq_t_end=1.0", "logging.every=3",
            "logging.wandb=disabled", *extra]


def run_config(*overrides) -> TrainConfig:
    from emf_dist.config import apply_overrides
    return from_dict(TrainConfig, apply_overrides({}, overrides), validate=True)


def test_the_dataset_holds_the_pipelines_text_states_and_latents(dataset, pipeline):
    manifest = read_manifest(dataset)
    assert manifest.text_shapes["tokens"] == [TEXT_LENGTH, TEXT_DIM]
    assert manifest.encoder["prompt"]["pipeline"] == "SanaPipeline"
    assert manifest.image.shape == [LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE]
    assert (manifest.image.vae, manifest.image.vae_class) == (str(pipeline / "vae"), "AutoencoderDC")


@pytest.fixture(scope="module")
def zero0_run(dataset, pipeline, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    assert emf(["train", *run_overrides(dataset, pipeline, storage, "sana-z0", "zero.stage=0",
                                        "logging.sample_every=3")]) == 0
    return storage / "sana-z0"


def test_prep_train_export_generate_round_trip(zero0_run, tmp_path):
    export = zero0_run / "export"
    assert (export / "transformer" / "config.json").exists() and (export / "model_index.json").exists()
    # The training sample grid is decoded pixels: 4 prompts of RESOLUTION px in a 2 x 2 grid.
    grid = Image.open(zero0_run / "samples" / "step_00000003.png")
    assert grid.size == (2 * RESOLUTION + 6, 2 * RESOLUTION + 6)
    out = tmp_path / "red.png"
    assert emf(["generate", "a red circle", "--model", str(export), "--out", str(out)]) == 0
    assert Image.open(out).size == (RESOLUTION, RESOLUTION)


def test_zero3_meanflow_steps_on_the_adapted_sana_match_zero0(zero0_run, dataset, pipeline, tmp_path):
    zero3 = train(run_config(*run_overrides(dataset, pipeline, tmp_path, "sana-z3", "zero.stage=3")))
    a = consolidated_weights(str(zero0_run / "step_00000003"))
    b = consolidated_weights(zero3.checkpoint)
    start = initial_parameters(pipeline)
    moved = [name for name in start if not torch.equal(b[name], start[name])]
    assert any("interval_embedder" in name for name in moved) and any("transformer_blocks" in name for name in moved)
    for name in start:  # float32 sums reduced in a different order: ~1e-6 after 3 Adam steps
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def initial_parameters(pipeline) -> dict:
    """The converted parent's parameters: the fine-tune's step 0."""
    from emf_dist.backbones import load_diffusers_backbone
    return {k: v.detach() for k, v in load_diffusers_backbone(pipeline).named_parameters()}


@pytest.mark.parametrize("part, differs", [("text encoder", {"gemma_seed": 1}), ("VAE", {"vae_seed": 1})])
def test_shards_of_another_encoder_or_vae_are_refused_before_workers_start(dataset, pipeline, tmp_path, part,
                                                                           differs):
    other = write_sana_pipeline(tmp_path / "other", **differs)  # the same transformer
    message = (r"encoded by text encoder .*pipeline .*not by the model's \(.*other/text_encoder"
               if part == "text encoder" else r"VAE mismatch between the shards .*pipeline/vae.* and the model "
               r"\(.*other/vae\): sha256")
    with pytest.raises(ValueError, match=message):
        train(run_config(*run_overrides(dataset, other, tmp_path, "refused")))
    assert not (tmp_path / "refused").exists()  # nothing started, nothing written


def distill_overrides(dataset, storage, export, name) -> list[str]:
    return [f"name={name}", f"storage_path={storage}", "mode=meanflow_distill", f"init_from={export}",
            f"data.url={dataset}", "data.loader_workers=0", "data.shuffle_buffer=4", f"encoder.max_length={TEXT_LENGTH}",
            "distill.teacher_steps=2", "steps=2", "micro_batch=2", "checkpoint_every=2", "optim.lr=1e-3",
            "optim.warmup_steps=1", "logging.every=2", "logging.wandb=disabled"]


def test_distilling_the_fine_tuned_sana_export_on_workers_exports_a_backbone(zero0_run, dataset, pipeline, tmp_path):
    teacher = zero0_run / "export"
    assert emf(["train", *distill_overrides(dataset, tmp_path, teacher, "sana-distill")]) == 0
    export = tmp_path / "sana-distill" / "export"
    info, parent = read_export_info(export), read_export_info(teacher)
    assert info.model == parent.model and info.training["mode"] == "meanflow_distill"
    assert (info.text_encoder.name, info.vae) == (str(pipeline), parent.vae)
    assert (export / "scheduler" / "scheduler_config.json").is_file()
    assert not (tmp_path / "sana-distill" / "null_text.safetensors").exists()  # the export's own null condition
    student, _ = load_model(export)
    before = load_model(teacher)[0].state_dict()
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert any("transformer_blocks" in k for k in moved) and any("interval_embedder" in k for k in moved)
    out = tmp_path / "one.png"
    assert emf(["generate", "a red circle", "--model", str(export), "--out", str(out)]) == 0
    assert Image.open(out).size == (RESOLUTION, RESOLUTION)


def test_distillation_refuses_shards_of_another_text_encoder_or_vae(zero0_run, dataset, tmp_path):
    cfg = resolve_model(run_config(*distill_overrides(dataset, tmp_path, zero0_run / "export", "refused")))
    manifest = read_manifest(dataset)
    other_text = replace(manifest, encoder={**manifest.encoder, "weights_sha256": "0" * 64})
    with pytest.raises(ValueError, match=r"text encoder mismatch between the teacher at .*export and the shards "
                                         r"at .*: weights_sha256"):
        check_export_parts(cfg, other_text)
    other_vae = replace(manifest, image=replace(manifest.image, vae_sha256="0" * 64))
    with pytest.raises(ValueError, match=r"VAE mismatch between the teacher at .*export \(.*pipeline/vae\) and the "
                                         r"shards at .*: sha256"):
        check_export_parts(cfg, other_vae)
    check_export_parts(cfg, manifest)
