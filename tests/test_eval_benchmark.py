"""The compositional benchmark, the report and the GenEval / DPG-Bench exports, end to end on tiny
exported models (untrained: these tests check the pipeline and its files, not quality)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from emf_app.cli import main as emf
from emf_dist.convert import meanflow_from_flow_matching
from emf_dist.eval.benchmark import BenchmarkConfig, prompt_set, run_benchmark, score_images
from emf_dist.eval.export_layouts import export_dpg, export_geneval, scene_geneval_metadata, score_geneval_folder
from emf_dist.eval.report import write_report
from emf_dist.eval.sampling import EvalModel, fixed_noise
from emf_dist.export import ExportInfo, SamplingInfo, export_model, load_model
from emf_dist.generate import load_encoder_for, save_png
from emf_dist.model import ModelConfig, VelocityNet
from emf_dist.text_encoder import TextEncoder, TextEncoderConfig
from tests.helpers import randomised

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A flow-matching model and its MeanFlow conversion, exported as the demo exports them (16 px)."""
    out = tmp_path_factory.mktemp("models")
    encoder_cfg = TextEncoderConfig(max_length=16)
    fingerprint = TextEncoder(encoder_cfg).fingerprint()
    cfg = ModelConfig(input_size=16, patch_size=4, width=32, depth=1, heads=2, text_dim=384,
                      time_embedding="single", time_scale=1.0)
    torch.manual_seed(0)
    fm = randomised(VelocityNet(cfg))  # random, not zero, outputs: samplers must differ
    info = ExportInfo(cfg, encoder_cfg, fingerprint, SamplingInfo(mean_flow=False, steps=32))
    fm_dir = export_model(fm, info, out / "flow_matching_model")
    mf = meanflow_from_flow_matching(cfg, fm.state_dict())
    mf_info = replace(info, model=mf.cfg, sampling=SamplingInfo(mean_flow=True, steps=1))
    mf_dir = export_model(mf, mf_info, out / "model")
    return {"model": mf_dir, "baseline": fm_dir}


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return str(folder)


def test_benchmark_cli_writes_the_whole_report(models, tiny_vit, tmp_path, capsys):
    out = tmp_path / "report"
    overrides = ["benchmark.prompts_per_task=1", "benchmark.images_per_prompt=2", "benchmark.calibration_scenes=24",
                 "benchmark.progress=false", f"frechet.backbone={tiny_vit}", "frechet.real_images=16",
                 "encoders.baselines=[hashed_bow]", "encoders.discriminability.scenes=6",
                 "encoders.disentanglement.prompts=3", "encoders.disentanglement.ratios=[0.5]"]
    assert emf(["eval", "benchmark", "--model", models["model"], "--baseline", models["baseline"],
                "--out", str(out), *overrides]) == 0
    assert "meanflow-1step" in capsys.readouterr().out

    metrics = json.loads((out / "metrics.json").read_text())
    expected = ([f"meanflow-{s}step" for s in (1, 2, 4, 8)] +
                [f"flow_matching-{s}step" for s in (1, 2, 4, 8, 16, 32)] +
                [f"flow_matching-{s}step-cfg1.5" for s in (1, 2, 4, 8, 16, 32)])
    assert list(metrics["gate"]) == expected
    assert all(0.0 <= v <= 1.0 for v in metrics["gate"].values())
    nfe = {s["label"]: s["nfe"] for s in metrics["benchmark"]["samplers"]}
    assert nfe["meanflow-8step"] == 8 and nfe["flow_matching-32step"] == 32 and nfe["flow_matching-32step-cfg1.5"] == 64
    assert set(metrics["benchmark"]["samplers"][0]["tasks"]) == {"single_object", "two_object", "counting", "colors",
                                                               "position", "color_attr"}
    assert min(metrics["benchmark"]["calibration"][k] for k in ("clean", "blur", "noise", "blur_noise")) >= 0.98
    frechet = metrics["frechet"]["per_sampler"]
    assert set(frechet) == set(expected) and all(v["metric"] == "FD_vit" and v["value"] >= 0 for v in frechet.values())
    assert metrics["encoders"]["encoders"][0]["name"] == "minilm"

    records = (out / "results.jsonl").read_text().splitlines()
    assert len(records) == len(expected) * 6 * 1 * 2
    assert {"sampler", "prompt", "caption", "correct", "reason"} <= set(json.loads(records[0]))
    plot = Image.open(out / "steps_vs_quality.png")
    assert plot.format == "PNG" and plot.width > 300
    tasks = sorted(metrics["benchmark"]["samplers"][0]["tasks"])
    assert sorted(p.stem for p in (out / "grids" / "tasks").glob("*.png")) == tasks
    assert sorted(p.stem for p in (out / "grids" / "steps").glob("*.png")) == sorted(expected)
    report = (out / "report.md").read_text()
    for text in ("| sampler | steps | CFG | NFE | overall |", "steps_vs_quality.png", "FD_vit", "Detector calibration",
                 "| minilm | candidate |", "No held-out"):
        assert text in report


def test_held_out_pairs_are_scored_apart_and_the_same_seed_gives_the_same_images(models):
    net, info = load_model(models["model"])
    encoder = load_encoder_for(info, models["model"])
    cfg = BenchmarkConfig(prompts_per_task=1, images_per_prompt=2, holdout=("red triangle", "blue circle"),
                          holdout_prompts_per_task=1, meanflow_steps=(1, 2), calibration_scenes=0, progress=False)
    first = run_benchmark({"meanflow": EvalModel(net, info, encoder)}, cfg, keep_images=True)
    held = [p for p in first.prompts if p.heldout]
    assert len(held) == 6 and len(first.prompts) == 12
    for p in held:
        assert {(o["color"], o["shape"]) for o in p.scene.objects} & {("red", "triangle"), ("blue", "circle")}
    for p in first.prompts:
        if not p.heldout:
            assert not {(o["color"], o["shape"]) for o in p.scene.objects} & {("red", "triangle"), ("blue", "circle")}
    assert all(s.heldout_overall is not None and set(s.heldout_tasks) == set(cfg.tasks) for s in first.samplers)
    again = run_benchmark({"meanflow": EvalModel(net, info, encoder)}, cfg, keep_images=True)
    assert all(np.array_equal(first.generated[k], again.generated[k]) for k in first.generated)
    assert not np.array_equal(first.generated["meanflow-1step"], first.generated["meanflow-2step"])


def test_prompts_longer_than_the_encoder_takes_are_counted_and_named_in_the_report(models, tmp_path):
    net, info = load_model(models["model"])
    encoder = TextEncoder(replace(info.text_encoder, max_length=9))
    cfg = BenchmarkConfig(prompts_per_task=2, images_per_prompt=2, meanflow_steps=(1,), calibration_scenes=0,
                          progress=False)
    result = run_benchmark({"meanflow": EvalModel(net, info, encoder)}, cfg)
    # The oracle: the tokenizer's own count, special tokens included.
    cut = [p.scene.caption for p in result.prompts if len(encoder.tokenizer(p.scene.caption)["input_ids"]) > 9]
    assert 0 < len(cut) < len(result.prompts)
    assert result.truncated_prompts == {"meanflow": cut}
    metrics = write_report(str(tmp_path), benchmark=result)
    assert metrics["benchmark"]["truncated_prompts"] == {"meanflow": len(cut)}
    report = (tmp_path / "report.md").read_text()
    assert f"{len(cut)} of {len(result.prompts)} prompts are longer than meanflow's text encoder takes" in report
    assert all(caption in report for caption in cut)
    whole = run_benchmark({"meanflow": EvalModel(net, info, TextEncoder(replace(info.text_encoder, max_length=40)))}, cfg)
    assert whole.truncated_prompts == {}
    write_report(str(tmp_path / "whole"), benchmark=whole)
    assert "longer than" not in (tmp_path / "whole" / "report.md").read_text()


def test_ground_truth_renders_score_perfectly_through_the_benchmark_layout():
    """Image j belongs to prompt j // images_per_prompt: the true renders must all be judged correct."""
    cfg = BenchmarkConfig(prompts_per_task=3, images_per_prompt=2, holdout=("green square",),
                          holdout_prompts_per_task=2)
    prompts = prompt_set(cfg, 32)
    images = np.stack([p.scene.image for p in prompts]).repeat(cfg.images_per_prompt, 0)
    records = score_images(images, prompts, cfg, "truth")
    assert len(records) == len(prompts) * 2 and all(r["correct"] for r in records)
    assert not any(r["correct"] for r in score_images(images[::-1].copy(), prompts, cfg, "shuffled")[:6])


def test_noise_is_independent_of_chunking(models):
    net, _ = load_model(models["model"])
    whole = fixed_noise(10, net, seed=3)
    torch.testing.assert_close(whole[4:], fixed_noise(6, net, seed=3, start=4), rtol=0, atol=0)
    assert not torch.equal(whole, fixed_noise(10, net, seed=4))


def test_geneval_layout_with_scene_prompts_round_trips_through_the_scorer(models, tmp_path, capsys):
    out = tmp_path / "geneval"
    assert emf(["eval", "export-geneval", "--model", models["model"], "--out", str(out),
                "--images-per-prompt", "2", "--upscale", "2"]) == 0
    assert "score-geneval" in capsys.readouterr().out
    metadata = scene_geneval_metadata(BenchmarkConfig(), 16)
    folders = sorted(p.name for p in out.iterdir())
    assert folders == [f"{i:05d}" for i in range(len(metadata))]
    assert json.loads((out / "00000" / "metadata.jsonl").read_text()) == metadata[0]
    assert sorted(p.name for p in (out / "00000" / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert Image.open(out / "00000" / "samples" / "00000.png").size == (32, 32)
    assert emf(["eval", "score-geneval", str(out)]) == 0
    assert "overall (mean over tasks)" in capsys.readouterr().out

    # The same layout holding the ground-truth renders (upscaled 4x) scores 1.0 on every task.
    truth = tmp_path / "truth"
    for i, prompt in enumerate(prompt_set(BenchmarkConfig(prompts_per_task=2), 32)):
        (truth / f"{i:05d}" / "samples").mkdir(parents=True)
        (truth / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(prompt.metadata))
        save_png(prompt.scene.image, truth / f"{i:05d}" / "samples" / "00000.png", upscale=4)
    result = score_geneval_folder(str(truth))
    assert result["overall"] == 1.0 and len(result["tasks"]) == 6


def test_geneval_export_of_a_users_metadata_file(models, tmp_path, capsys):
    lines = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
             {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
              "prompt": "a photo of two cats"}]
    meta_file = tmp_path / "evaluation_metadata.jsonl"
    meta_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "geneval"
    export_geneval(models["model"], [json.loads(x) for x in meta_file.read_text().splitlines()], str(out),
                   images_per_prompt=3, progress=False)
    assert json.loads((out / "00001" / "metadata.jsonl").read_text()) == lines[1]
    assert len(list((out / "00001" / "samples").glob("*.png"))) == 3
    assert emf(["eval", "score-geneval", str(out)]) == 2  # COCO objects need GenEval's own detector
    assert "GenEval's own detector" in capsys.readouterr().err


def test_dpg_layout_is_a_2x2_grid_per_prompt(models, tmp_path, capsys):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "item_a.txt").write_text("A red circle above a blue square.\n")
    (prompts / "item_b.txt").write_text("Three yellow triangles.")
    out = tmp_path / "dpg"
    assert emf(["eval", "export-dpg", "--model", models["model"], "--prompts", str(prompts), "--out", str(out),
                "--upscale", "3"]) == 0
    assert f"dist_eval.sh {out} 48" in capsys.readouterr().out
    grid = np.asarray(Image.open(out / "item_a.png"))
    assert grid.shape == (96, 96, 3)
    assert not np.array_equal(grid[:48, :48], grid[:48, 48:])  # four different samples
    assert sorted(p.name for p in out.iterdir()) == ["item_a.png", "item_b.png"]
    assert export_dpg(models["model"], [("x", "a red circle")], str(tmp_path / "dpg2"), progress=False) == 16
