"""`emf demo`: the EMF recipe end to end on one machine, on built-in data.

scenes -> captions encoded by the packaged MiniLM -> flow-matching pretraining -> conversion
to the dual time embedding -> MeanFlow fine-tuning with EMF's progress schedule -> exported
models -> sample grids (MeanFlow at 1/2/4 steps beside flow matching at 1/4/32 Euler steps).
Single process, in memory; the distributed trainer runs the same objective on Ray + DeepSpeed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from data_prep.scenes import SceneConfig, iter_scenes
from emf_dist.convert import meanflow_from_flow_matching
from emf_dist.export import ExportInfo, SamplingInfo, export_model
from emf_dist.generate import from_uint8, generate_images, image_grid, save_png
from emf_dist.local_trainer import InMemoryData, LocalTrainConfig, train_local
from emf_dist.meanflow import MeanFlowConfig, MeanFlowLoss
from emf_dist.model import ModelConfig, VelocityNet, parameter_count
from emf_dist.text_encoder import TextEncoder, TextEncoderConfig
from emf_dist.time_sampling import TimeSamplerConfig


def _default_model() -> ModelConfig:
    return ModelConfig(input_size=32, patch_size=4, width=128, depth=4, heads=4, text_dim=384,
                       time_embedding="single", time_scale=1.0, checkpointing=False)


@dataclass
class DemoConfig:
    scenes: SceneConfig = field(default_factory=lambda: SceneConfig(tasks=("single_object", "colors")))
    samples: int = 2000  # training scenes
    encoder: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(max_length=16))
    model: ModelConfig = field(default_factory=_default_model)  # the flow-matching parent's architecture
    fm_loss: MeanFlowConfig = field(default_factory=lambda: MeanFlowConfig(
        mode="flow_matching", time=TimeSamplerConfig(distribution="logit_normal", mu=0.0, sigma=1.0),
        adaptive_p=0.0))
    fm_train: LocalTrainConfig = field(default_factory=lambda: LocalTrainConfig(steps=400, batch_size=32, lr=1e-3,
                                                                                log_every=100))
    mf_loss: MeanFlowConfig = field(default_factory=lambda: MeanFlowConfig(time=TimeSamplerConfig.emf()))
    mf_train: LocalTrainConfig = field(default_factory=lambda: LocalTrainConfig(steps=400, batch_size=32, lr=5e-4,
                                                                                log_every=100))
    prompts: tuple[str, ...] = ("a red circle", "a blue square", "a green triangle", "a yellow circle",
                                "a photo of a white square", "a magenta triangle", "an orange circle",
                                "a cyan square")

    def validate(self) -> list[str]:
        problems = []
        if self.model.time_embedding != "single":
            problems.append("model.time_embedding must be 'single': the demo pretrains with flow matching, then converts")
        if self.model.text_dim != 384 and self.encoder.name == "minilm":
            problems.append(f"model.text_dim {self.model.text_dim} != 384, the packaged MiniLM's size")
        if self.samples < 1:
            problems.append("samples must be >= 1")
        return problems


def load_scenes(cfg: DemoConfig, encoder: TextEncoder) -> InMemoryData:
    scenes = list(iter_scenes(cfg.scenes, 0, cfg.samples))
    images = from_uint8(np.stack([s.image for s in scenes]))
    text = encoder.encode([s.caption for s in scenes])
    return InMemoryData(images, text.tokens.float(), text.mask, text.pooled.float())


def run_demo(cfg: DemoConfig, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg.fm_train.seed)
    started = time.perf_counter()
    encoder = TextEncoder(cfg.encoder)
    print(f"[1/5] generating {cfg.samples} scenes and encoding their captions with {cfg.encoder.name}", flush=True)
    data = load_scenes(cfg, encoder)

    fm_model = VelocityNet(cfg.model)
    print(f"[2/5] flow-matching pretraining: {parameter_count(fm_model) / 1e6:.2f} M parameters, "
          f"{cfg.fm_train.steps} steps", flush=True)
    fm_ema = train_local(fm_model, MeanFlowLoss(cfg.fm_loss), data, cfg.fm_train)["ema"]
    fm_ema.copy_to(fm_model)
    info = ExportInfo(cfg.model, cfg.encoder, encoder.fingerprint(), SamplingInfo(mean_flow=False, steps=32))
    fm_dir = export_model(fm_model, info, os.path.join(out_dir, "flow_matching_model"))

    print(f"[3/5] converting to MeanFlow and fine-tuning {cfg.mf_train.steps} steps (EMF schedule)", flush=True)
    mf_model = meanflow_from_flow_matching(cfg.model, fm_model.state_dict())
    mf_ema = train_local(mf_model, MeanFlowLoss(cfg.mf_loss), data, cfg.mf_train)["ema"]
    mf_ema.copy_to(mf_model)
    mf_info = replace(info, model=mf_model.cfg, sampling=SamplingInfo(mean_flow=True, steps=1))
    mf_dir = export_model(mf_model, mf_info, os.path.join(out_dir, "model"))

    print("[4/5] sampling grids", flush=True)
    prompts = list(cfg.prompts)
    grids = {}
    for name, model, mean_flow, steps in [("meanflow", mf_model, True, 1), ("meanflow", mf_model, True, 2),
                                          ("meanflow", mf_model, True, 4), ("flow_matching", fm_model, False, 1),
                                          ("flow_matching", fm_model, False, 4),
                                          ("flow_matching", fm_model, False, 32)]:
        images = generate_images(model, encoder, prompts, steps=steps, seed=0, mean_flow=mean_flow)
        path = os.path.join(out_dir, f"samples_{name}_{steps}step.png")
        save_png(image_grid(images, columns=len(prompts)), path, upscale=4)
        grids[f"{name}_{steps}"] = path

    summary = {"seconds": round(time.perf_counter() - started, 1), "model": mf_dir, "flow_matching_model": fm_dir,
               "grids": grids, "prompts": prompts}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[5/5] done in {summary['seconds']} s\n  model:   {mf_dir}\n  grids:   {os.path.join(out_dir, 'samples_*.png')}"
          f"\n  try:     emf generate --model {mf_dir} --steps 1 --out red.png --upscale 8 \"a red circle\"", flush=True)
    return summary
