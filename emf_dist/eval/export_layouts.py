"""Generated images in the folder layouts the official GenEval and DPG-Bench scorers read.

Their detectors and VQA models need GPUs and weights we cannot ship, so we write what their
scripts expect and the user runs them:

GenEval (github.com/djghosh13/geneval, MIT). Prompts come from its
`prompts/evaluation_metadata.jsonl` (one JSON object per line: tag, include, exclude, prompt),
which we do not vendor: pass your copy. The layout is the one its own generation script
writes and `evaluation/evaluate_images.py` reads:

    OUT/00000/metadata.jsonl     the prompt's metadata line (one JSON object)
    OUT/00000/samples/00000.png  images_per_prompt samples (GenEval uses 4)
    OUT/00001/...

    python evaluation/evaluate_images.py OUT --outfile results.jsonl --model-path <detector weights>
    python evaluation/summary_scores.py results.jsonl

Our own scene prompts can be written in the same format (`scene_geneval_metadata`); the
scene detector scores such a folder with `score_geneval_folder`.

DPG-Bench (github.com/TencentQQGYLab/ELLA, Apache-2.0). Prompts are `dpg_bench/prompts/<id>.txt`
(one prompt per file), again not vendored: pass your copy of that folder. Its scorer
`dpg_bench/compute_dpg_bench.py` reads `OUT/<id>.png`, each a 2 x 2 grid of four samples of
`resolution` pixels without padding, and crops them at (0, 0), (r, 0), (0, r), (r, r):

    bash dpg_bench/dist_eval.sh OUT <resolution printed by the export>
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from emf_dist.errors import InputError
from emf_dist.eval.benchmark import BenchmarkConfig, prompt_set
from emf_dist.eval.sampling import SamplerSpec, fixed_noise, generate, load_eval_model
from emf_dist.generate import check_sampling, save_png
from emf_dist.scenes.detector import DetectorConfig, known_classes, score


def scene_geneval_metadata(cfg: BenchmarkConfig, resolution: int) -> list[dict]:
    """The benchmark's scene prompt set as GenEval metadata lines (class = shape, with colors)."""
    return [p.metadata for p in prompt_set(cfg, resolution)]


def read_geneval_metadata(path: str) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    bad = [i for i, row in enumerate(rows) if "prompt" not in row]
    if bad:
        raise ValueError(f"{path}: line {bad[0] + 1} has no 'prompt'; expected GenEval's evaluation_metadata.jsonl")
    return rows


def read_dpg_prompts(folder: str) -> list[tuple[str, str]]:
    """(item id, prompt) for every <id>.txt in DPG-Bench's prompts folder, sorted by id."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder; pass DPG-Bench's dpg_bench/prompts folder "
                         "(one <id>.txt per prompt)")
    items = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".txt"):
            with open(os.path.join(folder, name)) as f:
                items.append((name[:-4], f.read().strip()))
    if not items:
        raise ValueError(f"{folder} holds no <id>.txt prompt files")
    return items


class _Generator:
    """An exported model with its own encoder (and VAE) and default sampler, generating fixed-seed batches."""

    def __init__(self, model_dir: str, steps: int | None, guidance: float | None, seed: int, batch_size: int,
                 device: str = "cpu"):
        check_sampling(steps, guidance)
        self.model = load_eval_model(model_dir, device)
        info = self.model.info
        self.spec = SamplerSpec("model", info.sampling.mean_flow, info.sampling.steps if steps is None else steps,
                                info.sampling.guidance_scale if guidance is None else guidance)
        self.seed, self.batch_size = seed, batch_size

    def images(self, prompts: list[str], first_index: int, progress) -> np.ndarray:
        """Images for consecutive prompts; noise is drawn per global image index, so chunking does not matter."""
        noise = fixed_noise(len(prompts), self.model.net, self.seed, start=first_index)
        return generate(self.model, self.model.encoder.encode(prompts), noise, self.spec,
                        batch_size=self.batch_size, progress=progress)


def export_geneval(model_dir: str, metadata: list[dict] | None, out_dir: str, *, images_per_prompt: int = 4,
                   steps: int | None = None, guidance: float | None = None, seed: int = 0, upscale: int = 1,
                   batch_size: int = 64, progress: bool = True) -> str:
    """One folder per metadata line; metadata None: the benchmark's scene prompts (BenchmarkConfig defaults)."""
    gen = _Generator(model_dir, steps, guidance, seed, batch_size)
    if metadata is None:
        metadata = scene_geneval_metadata(BenchmarkConfig(), gen.model.image_size)
    with tqdm(total=len(metadata) * images_per_prompt, desc="geneval", unit="img", disable=not progress) as bar:
        for index, meta in enumerate(metadata):
            folder = os.path.join(out_dir, f"{index:0>5}")
            os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
            with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
                json.dump(meta, f)
            images = gen.images([meta["prompt"]] * images_per_prompt, index * images_per_prompt, bar)
            for k, image in enumerate(images):
                save_png(image, os.path.join(folder, "samples", f"{k:05}.png"), upscale=upscale)
    return out_dir


def export_dpg(model_dir: str, prompts: list[tuple[str, str]], out_dir: str, *, steps: int | None = None,
               guidance: float | None = None, seed: int = 0, upscale: int = 1, batch_size: int = 64,
               progress: bool = True) -> int:
    """Write <id>.png 2 x 2 grids; returns the per-sample resolution to pass to DPG-Bench's scorer."""
    gen = _Generator(model_dir, steps, guidance, seed, batch_size)
    os.makedirs(out_dir, exist_ok=True)
    with tqdm(total=len(prompts) * 4, desc="dpg-bench", unit="img", disable=not progress) as bar:
        for index, (item, text) in enumerate(prompts):
            tiles = gen.images([text] * 4, index * 4, bar)
            top, bottom = np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)
            save_png(np.concatenate([top, bottom], axis=0), os.path.join(out_dir, f"{item}.png"), upscale=upscale)
    return gen.model.image_size * upscale


def score_geneval_folder(folder: str, cfg: DetectorConfig | None = None) -> dict:
    """Score a GenEval-layout folder of scene prompts with the scene detector, as GenEval summarises:
    accuracy per tag and overall as the mean over tags. Prompts about other objects are refused."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder: pass the folder `emf eval export-geneval` wrote")
    per_tag: dict[str, list[bool]] = {}
    records = []
    for sub in sorted(os.listdir(folder)):
        path = os.path.join(folder, sub)
        if not (sub.isdigit() and os.path.isdir(path)):
            continue
        with open(os.path.join(path, "metadata.jsonl")) as f:
            meta = json.load(f)
        if not known_classes(meta):
            raise ValueError(f"{path}: '{meta['prompt']}' is not a scene prompt; score it with GenEval's own detector")
        for name in sorted(os.listdir(os.path.join(path, "samples"))):
            if re.fullmatch(r"\d+\.png", name):
                image = np.asarray(Image.open(os.path.join(path, "samples", name)).convert("RGB"))
                correct, reason = score(image, meta, cfg)  # scale-free: an upscaled export scores the same
                per_tag.setdefault(meta["tag"], []).append(correct)
                records.append({"filename": os.path.join(sub, "samples", name), "tag": meta["tag"],
                                "prompt": meta["prompt"], "correct": correct, "reason": reason})
    if not records:  # an overall 0.000 would read as a (terrible) score
        raise InputError(f"{folder} holds no GenEval-layout images (NNNNN/metadata.jsonl and NNNNN/samples/NNNNN.png): "
                         "write them with `emf eval export-geneval --out FOLDER` first")
    tasks = {tag: float(np.mean(v)) for tag, v in per_tag.items()}
    return {"tasks": tasks, "overall": float(np.mean(list(tasks.values()))), "records": records}
