"""Exports of a trained diffusers backbone: they reload from their own files (not the parent's, not
the training config), diffusers loads their transformer, and `emf generate` decodes through the
recorded VAE. Tiny random SANA pipeline (tests/pretrained_helpers.py)."""

import shutil

import pytest
import torch
from PIL import Image

from emf_dist.export import export_model, load_model, read_export_info
from emf_dist.generate import generate_to_file
from emf_dist.vae import load_vae
from tests.pretrained_helpers import LATENT_SIDE, RESOLUTION, TEXT_LENGTH, trained_backbone, write_sana_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return write_sana_pipeline(tmp_path_factory.mktemp("sana") / "pipeline")


def inputs(encoder):
    gen = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 4, LATENT_SIDE, LATENT_SIDE, generator=gen), torch.tensor([0.4, 0.9])
    text = encoder.encode(["a red circle", "a blue square above a circle"])
    return z, t, text.tokens.float(), text.mask


@pytest.mark.parametrize("mode", ["meanflow_finetune", "flow_matching"])
def test_the_export_reloads_without_the_parent_and_diffusers_loads_its_transformer(tmp_path, pipeline, mode):
    from diffusers import SanaTransformer2DModel

    model, encoder, info = trained_backbone(tmp_path, pipeline, mode)
    folder = export_model(model, info, tmp_path / "export", scheduler_dir=str(pipeline / "scheduler"))
    parent = tmp_path / "parent-away"
    shutil.copytree(pipeline / "transformer", parent)
    shutil.rmtree(pipeline / "transformer")  # the reload must not read the parent's weights
    try:
        back, loaded_info = load_model(folder)
    finally:
        shutil.copytree(parent, pipeline / "transformer")
    assert loaded_info.model == info.model and loaded_info.vae == info.vae
    z, t, tokens, mask = inputs(encoder)
    drop = torch.tensor([False, True])  # the null condition travels with the export
    with torch.no_grad():
        torch.testing.assert_close(back(z, t * 0.3, t, tokens, mask, None, drop),
                                   model(z, t * 0.3, t, tokens, mask, None, drop), rtol=0, atol=0)
        # diffusers' plain class: the trained network at r = t (phi_interval(0) folded into a bias)
        plain = SanaTransformer2DModel.from_pretrained(f"{folder}/transformer")
        expected = model(z, t, t, tokens, mask, None)
        got = plain(z, encoder_hidden_states=tokens, timestep=t * 1000, encoder_attention_mask=mask).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert back.time.num_train_timesteps == 1000 and "DPMSolverMultistepScheduler" in back.time.source


def test_generate_decodes_the_samples_through_the_recorded_vae_and_a_diffusers_pipeline_runs_the_export(
        tmp_path, pipeline):
    from diffusers import SanaPipeline

    model, encoder, info = trained_backbone(tmp_path, pipeline, "meanflow_finetune")
    folder = export_model(model, info, tmp_path / "export", scheduler_dir=str(pipeline / "scheduler"))
    assert read_export_info(folder).vae.class_name == "AutoencoderDC"
    out = generate_to_file(folder, ["a red circle"], str(tmp_path / "one.png"))
    assert Image.open(out).size == (RESOLUTION, RESOLUTION)  # decoded pixels, not latents
    # The rest of a pipeline comes from the parent: the export names only transformer and scheduler.
    pipe = SanaPipeline.from_pretrained(folder, vae=load_vae(str(pipeline)), text_encoder=encoder.model,
                                        tokenizer=encoder.tokenizer)
    images = pipe("a red circle", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION, output_type="pt",
                  max_sequence_length=TEXT_LENGTH, use_resolution_binning=False).images
    assert images.shape == (1, 3, RESOLUTION, RESOLUTION) and torch.isfinite(images).all()
