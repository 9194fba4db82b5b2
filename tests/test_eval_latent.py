"""Evaluation of a latent model: an export of a fine-tuned diffusers backbone is sampled in its latent
space and decoded by the VAE the export records, with the text encoder the export records. Tiny
random SANA pipeline (tests/pretrained_helpers.py); untrained, so these check the path, not quality."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from emf_app.cli import main as emf
from emf_dist.eval.export_layouts import export_dpg, export_geneval
from emf_dist.eval.sampling import EvalModel, SamplerSpec, fixed_noise, generate, load_eval_model
from emf_dist.export import ExportInfo, export_model
from emf_dist.model import VelocityNet
from emf_dist.samplers import sample
from emf_dist.text_encoder import TextEncoder, TextEncoderConfig
from emf_dist.vae import describe_vae, load_vae
from tests.helpers import randomised, tiny_config
from tests.pretrained_helpers import LATENT_CHANNELS, LATENT_SIDE, RESOLUTION, trained_backbone, write_sana_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return write_sana_pipeline(tmp_path_factory.mktemp("sana") / "pipeline")


@pytest.fixture(scope="module")
def export(pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    model, _, info = trained_backbone(folder, pipeline, "meanflow_finetune")
    return export_model(model, info, folder / "export", scheduler_dir=str(pipeline / "scheduler"))


def test_sampling_decodes_the_latents_through_the_recorded_vae_in_batches(export, pipeline):
    model = load_eval_model(export)
    # The export's own records: the pipeline's Gemma-2 (SANA's prompt recipe) and its DC-AE.
    assert model.encoder.cfg.name == str(pipeline) and model.encoder.fingerprint() == model.info.encoder_fingerprint
    assert model.vae[1] == model.info.vae and model.info.vae.source == str(pipeline / "vae")
    assert model.image_size == RESOLUTION
    prompts = ["a red circle", "a blue square", "two green triangles"]
    text, noise = model.encoder.encode(prompts), fixed_noise(len(prompts), model.net, seed=0)
    images = generate(model, text, noise, SamplerSpec("meanflow", True, 2), batch_size=2, decode_batch=1)
    assert images.shape == (3, RESOLUTION, RESOLUTION, 3) and images.dtype == np.uint8

    # The oracle: diffusers' AutoencoderDC, loaded afresh, decoding all latents at once.
    vae = load_vae(str(pipeline))
    with torch.no_grad():
        latents = sample(model.net, noise, text.tokens, text.mask, text.pooled, steps=2, mean_flow=True)
        pixels = vae.decode(latents / vae.config.scaling_factor).sample
    expected = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1  # batch-size rounding at most
    assert images.std() > 1 and not np.array_equal(images[0], images[1])

    with pytest.raises(ValueError, match="4-channel latent space; decoding its samples needs the VAE"):
        EvalModel(model.net, model.info, model.encoder, vae=None)


def test_the_benchmark_cli_reports_on_a_fine_tuned_sana_export(export, pipeline, tmp_path, capsys):
    out = tmp_path / "report"
    assert emf(["eval", "benchmark", "--model", str(export), "--out", str(out), "benchmark.prompts_per_task=1",
                "benchmark.images_per_prompt=2", "benchmark.meanflow_steps=[1,2]", "benchmark.calibration_scenes=0",
                "benchmark.vae_batch_size=3", "benchmark.progress=false", "encoders.baselines=[hashed_bow]",
                "encoders.discriminability.scenes=6", "encoders.disentanglement.prompts=3",
                "encoders.disentanglement.ratios=[0.5]"]) == 0
    assert "meanflow-1step" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["gate"]) == ["meanflow-1step", "meanflow-2step"]
    bench = metrics["benchmark"]
    assert bench["resolution"] == RESOLUTION  # the scenes are drawn at the decoded size
    described = bench["models"]["meanflow"]
    assert (described["text_encoder"], described["vae"], described["image_size"]) == (
        str(pipeline), str(pipeline / "vae"), RESOLUTION)
    assert len((out / "results.jsonl").read_text().splitlines()) == 2 * 6 * 2
    assert metrics["encoders"]["encoders"][0]["fingerprint"]["weights_sha256"] == \
        load_eval_model(export).info.encoder_fingerprint["weights_sha256"]  # the export's Gemma-2 was ranked
    assert Image.open(out / "grids" / "steps" / "meanflow-1step.png").format == "PNG"


def test_our_dit_trained_on_vae_latents_is_decoded_alike(pipeline, tmp_path):
    encoder = TextEncoder(TextEncoderConfig(max_length=16))
    net = randomised(VelocityNet(tiny_config(in_channels=LATENT_CHANNELS, input_size=LATENT_SIDE, text_dim=encoder.dim)))
    info = ExportInfo(net.cfg, encoder.cfg, encoder.fingerprint(), vae=describe_vae(str(pipeline), load_vae(str(pipeline))))
    model = load_eval_model(export_model(net, info, tmp_path / "dit"))
    images = generate(model, encoder.encode(["a red circle"]), fixed_noise(1, model.net, seed=0),
                      SamplerSpec("meanflow", True, 1))
    assert model.image_size == RESOLUTION and images.shape == (1, RESOLUTION, RESOLUTION, 3)


def test_geneval_and_dpg_exports_write_decoded_images(export, tmp_path):
    metadata = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}]
    folder = export_geneval(str(export), metadata, str(tmp_path / "geneval"), images_per_prompt=2, progress=False)
    assert Image.open(tmp_path / "geneval" / "00000" / "samples" / "00001.png").size == (RESOLUTION, RESOLUTION)
    assert folder == str(tmp_path / "geneval")
    assert export_dpg(str(export), [("item", "a red circle")], str(tmp_path / "dpg"), progress=False) == RESOLUTION
    assert Image.open(tmp_path / "dpg" / "item.png").size == (2 * RESOLUTION, 2 * RESOLUTION)
