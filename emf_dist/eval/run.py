"""The jobs behind `emf eval ...`: typed configs in, one report folder out."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np

from emf_dist.eval.benchmark import BenchmarkConfig, BenchmarkResult, run_benchmark
from emf_dist.eval.encoder_config import EncoderEvalConfig
from emf_dist.eval.encoder_table import encoder_table
from emf_dist.eval.encoders import evaluate_encoders
from emf_dist.eval.frechet import FrechetConfig, frechet_between
from emf_dist.eval.report import write_report
from emf_dist.eval.sampling import EvalModel, load_eval_model
from emf_dist.scenes.generator import iter_scenes

NO_BACKBONE = ("Not computed: no vision backbone was given. No pretrained vision model ships in a PyPI package this "
               "project can install offline, so there is no default; pass a local transformers vision model with "
               "`frechet.backbone=/path/to/model` (Inception for FID, DINOv2/v3, CLIP, ViT: the metric is named "
               "after the backbone, FD_<model type>, and called FID only on Inception).")


@dataclass
class EvalConfig:
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    frechet: FrechetConfig = field(default_factory=FrechetConfig)
    # Rank the models' own text encoder against the reference baselines into the same report.
    # Its `candidates` are replaced by the models' encoders; use `emf eval encoders` to compare others.
    run_encoders: bool = True
    encoders: EncoderEvalConfig = field(default_factory=EncoderEvalConfig)
    device: str = "cpu"


def run_encoder_job(cfg: EncoderEvalConfig, out_dir: str, device: str = "cpu") -> dict:
    """`emf eval encoders`: the table, the decision and encoders.json in a report folder."""
    result = evaluate_encoders(cfg, device)
    write_report(out_dir, encoders=result, title="Text encoder evaluation")
    print(encoder_table(result), flush=True)
    return result


def _load_models(model_dirs: dict[str, str], device: str) -> tuple[dict[str, EvalModel], dict]:
    """name -> the model with its text encoder and VAE; names say what kind of sampler each model gets."""
    models, described, encoders = {}, {}, {}
    for role, folder in model_dirs.items():
        model = load_eval_model(folder, device, encoders)  # the demo's two models share one encoder: loaded once
        info = model.info
        name = "meanflow" if info.sampling.mean_flow else "flow_matching"
        if name in models:  # two models of one kind: tell them apart by their role
            name = f"{name}-{role}"
        models[name] = model
        described[name] = {"dir": os.path.abspath(folder), "role": role, "mean_flow": info.sampling.mean_flow,
                           "default_steps": info.sampling.steps, "text_encoder": info.text_encoder.name,
                           "vae": None if info.vae is None else info.vae.source, "image_size": model.image_size}
    return models, described


def _frechet(result: BenchmarkResult, cfg: FrechetConfig, device: str) -> tuple[dict | None, str]:
    if not cfg.backbone:
        return None, NO_BACKBONE
    from emf_dist.eval.backbone import VisionBackbone

    backbone = VisionBackbone(cfg.backbone, device)
    scenes = result.config.scene_config(result.config.tasks, result.resolution, cfg.real_seed)
    real = np.stack([s.image for s in iter_scenes(scenes, 0, cfg.real_images)])
    per_sampler = {label: frechet_between(backbone, images, real, cfg.batch_size)
                   for label, images in result.generated.items()}
    first = next(iter(per_sampler.values()))
    note = (f"{first['metric']} on the features of {first['backbone']} ({first['path']}), between each sampler's "
            f"{first['images'][0]} generated images and {first['images'][1]} held-out ground-truth scenes "
            f"(scene seed {cfg.real_seed}); feature dimension {first['feature_dim']}.")
    if first["rank_deficient"]:
        note += " Fewer images than feature dimensions: the estimate is biased upwards; compare only at equal counts."
    return per_sampler, note


def run_benchmark_job(model_dirs: dict[str, str], cfg: EvalConfig, out_dir: str) -> dict:
    """`emf eval benchmark`: the sweep, calibration, Frechet (if a backbone is given), encoder table, report."""
    started = time.perf_counter()
    models, described = _load_models(model_dirs, cfg.device)
    result = run_benchmark(models, cfg.benchmark, keep_images=bool(cfg.frechet.backbone))
    result.models = described
    frechet, note = _frechet(result, cfg.frechet, cfg.device)
    encoders = None
    if cfg.run_encoders:
        own = {json.dumps(m.info.encoder_fingerprint, sort_keys=True): m.info.text_encoder for m in models.values()}
        enc_cfg = dataclasses.replace(cfg.encoders, candidates=list(own.values()))
        encoders = evaluate_encoders(enc_cfg, cfg.device)
    out = write_report(out_dir, benchmark=result, encoders=encoders, frechet=frechet, frechet_note=note,
                       title="Evaluation: " + ", ".join(f"{k} ({v['dir']})" for k, v in described.items()))
    print(f"wrote {out_dir}/report.md in {time.perf_counter() - started:.0f} s", flush=True)
    for label, acc in out["gate"].items():
        print(f"  {label:<28} overall {acc:.3f}", flush=True)
    return out
