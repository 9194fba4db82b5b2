"""The compositional benchmark: GenEval's six tasks on generated scenes, across step counts.

A fixed prompt set per task is drawn from the scene generator (its own seed, so the prompts
are not the training captions' indices), each prompt is sampled `images_per_prompt` times
with fixed noise, and the deterministic detector scores every image against the prompt's
clauses. Accuracy per task is the share of correct images; overall accuracy is the mean
over tasks, as GenEval's summary_scores.py computes it. Prompts that contain a held-out
(color, shape) pair are scored apart, so a model that memorised combinations shows it.

The sweep is EMF's steps-versus-quality comparison: MeanFlow at 1/2/4/8 steps beside flow
matching at 1..32 Euler steps with and without CFG, each point placed at its number of
network evaluations (NFE; CFG costs two per step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from emf_dist.eval.sampling import DECODE_BATCH, EvalModel, SamplerSpec, fixed_noise, generate
from emf_dist.scenes.detector import DetectorConfig, calibrate, detect, evaluate, metadata_of
from emf_dist.scenes.generator import TASKS, Scene, SceneConfig, make_scene


@dataclass
class BenchmarkConfig:
    tasks: tuple[str, ...] = TASKS  # GenEval task families to score
    prompts_per_task: int = 8  # fixed prompts per task
    images_per_prompt: int = 4  # images sampled per prompt (different noise)
    prompt_seed: int = 1000  # scene seed the prompts are drawn from (training uses its own, 0 by default)
    seed: int = 0  # noise seed; every sampler configuration gets the same noise
    resolution: int | None = None  # scene resolution; None: the models' image size (decoded pixels for a latent model)
    # "color shape" pairs the model never saw in training (SceneConfig.holdout of its data); prompts
    # that contain one are drawn from the scene generator's holdout split and reported apart.
    holdout: tuple[str, ...] = ()
    holdout_prompts_per_task: int = 4
    # The training scenes' layout (SceneConfig.cell / min_size / max_size), so the reference renders
    # and the detector's calibration scenes look like what the model learned.
    cell: int | None = None
    min_size: int | None = None
    max_size: int | None = None
    meanflow_steps: tuple[int, ...] = (1, 2, 4, 8)
    meanflow_guidance: tuple[float, ...] = (1.0,)  # MeanFlow trained with guidance in its target needs no CFG
    flow_matching_steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    flow_matching_guidance: tuple[float, ...] = (1.0, 1.5)  # 1.0 = no CFG; EMF samples with 1.5-2
    batch_size: int = 64  # images per network call
    vae_batch_size: int = DECODE_BATCH  # latent models: latents per VAE decode
    grid_prompts: int = 8  # prompts per task shown in the sample grids
    calibration_scenes: int = 300  # fresh ground-truth scenes the detector is checked on (0: skip)
    progress: bool = True  # a tqdm bar while generating
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def validate(self) -> list[str]:
        problems = [f"unknown task {t!r}" for t in self.tasks if t not in TASKS]
        for name in ("prompts_per_task", "images_per_prompt", "batch_size", "vae_batch_size", "grid_prompts"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.holdout_prompts_per_task < 0 or self.calibration_scenes < 0:
            problems.append("holdout_prompts_per_task and calibration_scenes must be >= 0")
        steps = self.meanflow_steps + self.flow_matching_steps
        if any(s < 1 for s in steps):
            problems.append("every step count must be >= 1")
        if any(g <= 0 for g in self.meanflow_guidance + self.flow_matching_guidance):
            problems.append("guidance scales must be > 0")
        return problems

    def scene_config(self, tasks: tuple[str, ...], resolution: int, seed: int) -> SceneConfig:
        return SceneConfig(resolution=resolution, tasks=tasks, holdout=self.holdout, seed=seed, cell=self.cell,
                           min_size=self.min_size, max_size=self.max_size)


@dataclass
class BenchmarkPrompt:
    scene: Scene  # the ground-truth scene the prompt was drawn from (its render is the reference)
    metadata: dict  # GenEval clauses
    heldout: bool  # contains a held-out (color, shape) pair


@dataclass
class SamplerResult:
    spec: SamplerSpec
    tasks: dict[str, float]  # accuracy per task, over in-distribution prompts
    overall: float  # mean over tasks
    heldout_tasks: dict[str, float]  # the same over held-out prompts (empty without holdout pairs)
    heldout_overall: float | None
    images: int  # images scored


@dataclass
class BenchmarkResult:
    config: BenchmarkConfig
    resolution: int
    prompts: list[BenchmarkPrompt]
    samplers: list[SamplerResult]
    records: list[dict]  # one per image: sampler, prompt index, sample index, correct, reason
    grids: dict[str, np.ndarray]  # sampler label -> [tasks, grid_prompts, H, W, 3] (first sample of each prompt)
    reference: np.ndarray  # the ground-truth renders in the same layout
    calibration: dict | None  # detector accuracy on fresh renders (detector.calibrate)
    models: dict[str, dict] = field(default_factory=dict)  # model name -> folder, sampling defaults
    # model name -> the prompts longer than its text encoder's max_length (generated from their first L tokens)
    truncated_prompts: dict[str, list[str]] = field(default_factory=dict)
    generated: dict[str, np.ndarray] = field(default_factory=dict)  # label -> all images (only if kept)


def prompt_set(cfg: BenchmarkConfig, resolution: int) -> list[BenchmarkPrompt]:
    """The fixed prompts: per task, `prompts_per_task` from the train split and, with holdout pairs,
    `holdout_prompts_per_task` from the holdout split (each has one held-out pair)."""
    prompts = []
    for task in cfg.tasks:
        scenes_cfg = cfg.scene_config((task,), resolution, cfg.prompt_seed)
        splits = [("train", cfg.prompts_per_task)]
        if cfg.holdout:
            splits.append(("holdout", cfg.holdout_prompts_per_task))
        for split, count in splits:
            for index in range(count):
                scene = make_scene(scenes_cfg, index, split)
                prompts.append(BenchmarkPrompt(scene, metadata_of(scene), split == "holdout"))
    return prompts


def sampler_specs(cfg: BenchmarkConfig, name: str, mean_flow: bool) -> list[SamplerSpec]:
    steps, scales = ((cfg.meanflow_steps, cfg.meanflow_guidance) if mean_flow
                     else (cfg.flow_matching_steps, cfg.flow_matching_guidance))
    return [SamplerSpec(name, mean_flow, s, g) for g in scales for s in steps]


def _accuracy(records: list[dict], prompts: list[BenchmarkPrompt], tasks, heldout: bool) -> dict[str, float]:
    per_task: dict[str, list[bool]] = {}
    for rec in records:
        prompt = prompts[rec["prompt"]]
        if prompt.heldout == heldout:
            per_task.setdefault(prompt.scene.task, []).append(rec["correct"])
    return {t: float(np.mean(per_task[t])) for t in tasks if t in per_task}


def score_images(images: np.ndarray, prompts: list[BenchmarkPrompt], cfg: BenchmarkConfig,
                 label: str) -> list[dict]:
    """Detector verdicts; images are laid out prompt-major: image j belongs to prompt j // images_per_prompt."""
    records = []
    for j, image in enumerate(images):
        index, sample = divmod(j, cfg.images_per_prompt)
        correct, reason = evaluate(detect(image, cfg.detector), prompts[index].metadata, cfg.detector)
        records.append({"sampler": label, "prompt": index, "sample": sample, "task": prompts[index].scene.task,
                        "heldout": prompts[index].heldout, "correct": bool(correct), "reason": reason})
    return records


def summarise(spec: SamplerSpec, records: list[dict], prompts: list[BenchmarkPrompt], tasks) -> SamplerResult:
    in_dist = _accuracy(records, prompts, tasks, heldout=False)
    held = _accuracy(records, prompts, tasks, heldout=True)
    return SamplerResult(spec, in_dist, float(np.mean(list(in_dist.values()))) if in_dist else 0.0,
                         held, float(np.mean(list(held.values()))) if held else None, len(records))


def _grid(images: np.ndarray, prompts: list[BenchmarkPrompt], cfg: BenchmarkConfig) -> np.ndarray:
    """[tasks, grid_prompts, H, W, 3]: the first sample of the first in-distribution prompts per task."""
    size = images.shape[1]
    grid = np.full((len(cfg.tasks), cfg.grid_prompts, size, size, 3), 40, np.uint8)
    for row, task in enumerate(cfg.tasks):
        picks = [i for i, p in enumerate(prompts) if p.scene.task == task and not p.heldout][: cfg.grid_prompts]
        for col, index in enumerate(picks):
            grid[row, col] = images[index * cfg.images_per_prompt]
    return grid


def run_benchmark(models: dict[str, EvalModel], cfg: BenchmarkConfig, keep_images: bool = False) -> BenchmarkResult:
    """Sweep every model's samplers over the prompt set. `models`: name -> the model with its own encoder
    (and VAE)."""
    problems = cfg.validate()
    if problems:
        raise ValueError("invalid benchmark config: " + "; ".join(problems))
    sizes = {model.image_size for model in models.values()}
    if len(sizes) != 1:
        raise ValueError(f"the models generate different sizes {sorted(sizes)}; benchmark them separately")
    resolution = cfg.resolution or sizes.pop()
    prompts = prompt_set(cfg, resolution)
    captions = [p.scene.caption for p in prompts for _ in range(cfg.images_per_prompt)]
    plan = [(name, spec) for name, model in models.items()
            for spec in sampler_specs(cfg, name, model.info.sampling.mean_flow)]
    bar = tqdm(total=len(plan) * len(captions), desc="generating", unit="img", disable=not cfg.progress)
    samplers, records, grids, generated = [], [], {}, {}
    texts = {name: model.encoder.encode(captions) for name, model in models.items()}
    truncated = {name: [p.scene.caption for i, p in enumerate(prompts) if text.truncated[i * cfg.images_per_prompt]]
                 for name, text in texts.items()}
    with bar:
        for name, spec in plan:
            model = models[name]
            bar.set_postfix_str(spec.label)
            images = generate(model, texts[name], fixed_noise(len(captions), model.net, cfg.seed), spec,
                              batch_size=cfg.batch_size, decode_batch=cfg.vae_batch_size, progress=bar)
            scored = score_images(images, prompts, cfg, spec.label)
            records += scored
            samplers.append(summarise(spec, scored, prompts, cfg.tasks))
            grids[spec.label] = _grid(images, prompts, cfg)
            if keep_images:
                generated[spec.label] = images
    reference = _grid(np.stack([p.scene.image for p in prompts]).repeat(cfg.images_per_prompt, 0), prompts, cfg)
    calibration = None
    if cfg.calibration_scenes:
        fresh_cfg = cfg.scene_config(cfg.tasks, resolution, cfg.prompt_seed + 1)
        fresh = [make_scene(fresh_cfg, i) for i in range(cfg.calibration_scenes)]
        calibration = calibrate(fresh, cfg.detector)
    return BenchmarkResult(cfg, resolution, prompts, samplers, records, grids, reference, calibration,
                           generated=generated, truncated_prompts={k: v for k, v in truncated.items() if v})
