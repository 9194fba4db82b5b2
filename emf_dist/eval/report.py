"""One folder per evaluation, for people and for the promotion gate.

    report.md              every table, with links to the pictures
    metrics.json           machine-readable: overall accuracy per sampler and step count (`gate`),
                           per-task and held-out accuracy, detector calibration, Frechet, encoders
    steps_vs_quality.png   overall accuracy against network evaluations, one line per sampler
    results.jsonl          one line per scored image (like GenEval's results.jsonl), with the reason
    grids/steps/*.png      one grid per sampler and step count: a row per task
    grids/tasks/*.png      one grid per task: the ground truth, then a row per sampler and step count
    encoders.md/.json      the encoder table and selection decision (when encoders were evaluated)
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from emf_dist.eval.benchmark import BenchmarkResult
from emf_dist.eval.encoder_table import encoder_table
from emf_dist.generate import save_png

_BACKGROUND = (40, 40, 40)


def labeled_rows(rows: list[np.ndarray], labels: list[str], upscale: int = 4, pad: int = 2) -> np.ndarray:
    """Rows of images [K, H, W, 3] stacked into one picture with a text label left of each row."""
    count, height, width = max(len(r) for r in rows), rows[0].shape[1] * upscale, rows[0].shape[2] * upscale
    label_width = 7 * max(len(label) for label in labels) + 8  # PIL's default bitmap font is ~6 px wide
    size = (label_width + count * (width + pad) + pad, len(rows) * (height + pad) + pad)
    canvas = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for r, (row, label) in enumerate(zip(rows, labels)):
        top = pad + r * (height + pad)
        draw.text((4, top + height // 2 - 5), label, fill=(230, 230, 230))
        for c, image in enumerate(row):
            tile = Image.fromarray(image).resize((width, height), Image.NEAREST)
            canvas.paste(tile, (label_width + pad + c * (width + pad), top))
    return np.asarray(canvas)


def _upscale_for(resolution: int) -> int:
    return max(1, 128 // resolution)  # tiles of about 128 px, readable in a browser


def write_grids(result: BenchmarkResult, out_dir: str) -> dict[str, list[str]]:
    tasks, up = result.config.tasks, _upscale_for(result.resolution)
    written = {"steps": [], "tasks": []}
    for label, grid in result.grids.items():
        path = os.path.join(out_dir, "grids", "steps", f"{label}.png")
        save_png(labeled_rows(list(grid), list(tasks), up), path)
        written["steps"].append(path)
    for t, task in enumerate(tasks):
        rows = [result.reference[t]] + [grid[t] for grid in result.grids.values()]
        path = os.path.join(out_dir, "grids", "tasks", f"{task}.png")
        save_png(labeled_rows(rows, ["ground truth"] + list(result.grids), up), path)
        written["tasks"].append(path)
    return written


def plot_steps_vs_quality(result: BenchmarkResult, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    lines: dict[tuple[str, float], list] = {}
    for s in result.samplers:
        lines.setdefault((s.spec.model, s.spec.guidance), []).append(s)
    for (model, guidance), points in lines.items():
        points.sort(key=lambda s: s.spec.nfe)
        label = model + ("" if guidance == 1.0 else f" (CFG {guidance:g})")
        nfe = [s.spec.nfe for s in points]
        (line,) = ax.plot(nfe, [s.overall for s in points], marker="o", label=label)
        if all(s.heldout_overall is not None for s in points):
            ax.plot(nfe, [s.heldout_overall for s in points], marker="x", linestyle="--", color=line.get_color(),
                    label=label + ", held-out pairs")
        for s in points:
            ax.annotate(str(s.spec.steps), (s.spec.nfe, s.overall), textcoords="offset points", xytext=(3, 4),
                        fontsize=7)
    ticks = sorted({s.spec.nfe for s in result.samplers})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("network evaluations per image (NFE; CFG counts 2 per step)")
    ax.set_ylabel("overall accuracy (mean over tasks)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("steps vs quality (labels: sampler steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def benchmark_table(result: BenchmarkResult, frechet: dict[str, dict] | None = None) -> str:
    tasks = list(result.config.tasks)
    held = any(s.heldout_overall is not None for s in result.samplers)
    fd_name = next(iter(frechet.values()))["metric"] if frechet else None
    head = ["sampler", "steps", "CFG", "NFE", "overall"] + tasks
    head += (["held-out"] if held else []) + ([fd_name] if fd_name else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in result.samplers:
        cells = [s.spec.model, str(s.spec.steps), "-" if s.spec.guidance == 1.0 else f"{s.spec.guidance:g}",
                 str(s.spec.nfe), f"**{s.overall:.3f}**"] + [f"{s.tasks.get(t, float('nan')):.3f}" for t in tasks]
        if held:
            cells.append("n/a" if s.heldout_overall is None else f"{s.heldout_overall:.3f}")
        if fd_name:
            cells.append(f"{frechet[s.spec.label]['value']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics(result: BenchmarkResult | None, encoders: dict | None, frechet: dict | None, frechet_note: str) -> dict:
    out: dict[str, Any] = {}
    if result is not None:
        out["gate"] = {s.spec.label: s.overall for s in result.samplers}  # what a promotion gate compares
        out["benchmark"] = {
            "resolution": result.resolution, "prompts": len(result.prompts),
            "heldout_prompts": sum(p.heldout for p in result.prompts),
            "images_per_prompt": result.config.images_per_prompt, "models": result.models,
            "calibration": result.calibration,
            "truncated_prompts": {name: len(cut) for name, cut in result.truncated_prompts.items()},
            "samplers": [{"label": s.spec.label, "model": s.spec.model, "mean_flow": s.spec.mean_flow,
                          "steps": s.spec.steps, "guidance": s.spec.guidance, "nfe": s.spec.nfe,
                          "overall": s.overall, "tasks": s.tasks, "heldout_overall": s.heldout_overall,
                          "heldout_tasks": s.heldout_tasks, "images": s.images} for s in result.samplers]}
    out["frechet"] = {"note": frechet_note, "per_sampler": frechet or {}}
    if encoders is not None:
        out["encoders"] = encoders
    return out


def _benchmark_section(result: BenchmarkResult, frechet: dict | None, grids: dict) -> list[str]:
    cal = result.calibration
    lines = ["## Compositional benchmark (GenEval-style, generated scenes)", "",
             f"{len(result.prompts)} prompts ({sum(p.heldout for p in result.prompts)} with held-out pairs) x "
             f"{result.config.images_per_prompt} images, {result.resolution} px, noise seed {result.config.seed}, "
             f"prompt seed {result.config.prompt_seed}. An image is correct only if every clause of its prompt holds; "
             "overall = mean over tasks.", ""]
    if cal:
        lines += [f"Detector calibration on {cal['scenes']} fresh ground-truth renders: clean {cal['clean']:.3f}, "
                  f"blur {cal['blur']:.3f}, noise {cal['noise']:.3f}, blur+noise {cal['blur_noise']:.3f}; wrong "
                  f"prompts rejected {cal['rejects_wrong']:.3f}.", ""]
    for name, cut in result.truncated_prompts.items():
        lines += [f"**{len(cut)} of {len(result.prompts)} prompts are longer than {name}'s text encoder takes** "
                  "(`encoder.max_length` tokens), so its images for them follow a cut prompt: "
                  + "; ".join(cut) + ". Raise `encoder.max_length` at prep and training to keep them whole.", ""]
    lines += [benchmark_table(result, frechet), "", "![steps vs quality](steps_vs_quality.png)", ""]
    if not any(p.heldout for p in result.prompts):
        lines += ["No held-out (color, shape) pairs configured (`benchmark.holdout`), so no held-out column.", ""]
    lines += ["Sample grids: the first sample of the first prompts per task; in a task grid the top row is the "
              "ground truth and each further row one sampler, columns are these prompts:", ""]
    for task, path in zip(result.config.tasks, grids["tasks"]):
        captions = [p.scene.caption for p in result.prompts if p.scene.task == task and not p.heldout]
        shown = "; ".join(f"{i + 1}. {c}" for i, c in enumerate(captions[: result.config.grid_prompts]))
        lines.append(f"- [{task}](grids/tasks/{os.path.basename(path)}): {shown}")
    lines += ["- per sampler: " + ", ".join(f"[{os.path.basename(p)[:-4]}](grids/steps/{os.path.basename(p)})"
                                            for p in grids["steps"]), ""]
    return lines


def write_report(out_dir: str, *, benchmark: BenchmarkResult | None = None, encoders: dict | None = None,
                 frechet: dict | None = None, frechet_note: str = "not computed", title: str = "Evaluation") -> dict:
    """Write the evaluation folder; returns the metrics written to metrics.json."""
    os.makedirs(out_dir, exist_ok=True)
    lines = [f"# {title}", ""]
    if benchmark is not None:
        grids = write_grids(benchmark, out_dir)
        plot_steps_vs_quality(benchmark, os.path.join(out_dir, "steps_vs_quality.png"))
        with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
            for rec in benchmark.records:
                f.write(json.dumps({**rec, "caption": benchmark.prompts[rec["prompt"]].scene.caption}) + "\n")
        lines += _benchmark_section(benchmark, frechet, grids)
        lines += ["## Distribution distance", "", frechet_note, ""]
    if encoders is not None:
        table = encoder_table(encoders)
        with open(os.path.join(out_dir, "encoders.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out_dir, "encoders.json"), "w") as f:
            json.dump(encoders, f, indent=2)
        setup = encoders["setup"]
        lines += ["## Text encoders (EMF's selection step)", "",
                  f"Discriminability: {setup['captions']} captions of {setup['images']} images, image similarity from "
                  f"{setup['image_similarity']}. Disentanglement: {setup['disentanglement_prompts']} prompts "
                  f"({setup['prompt_source']}), b over {setup['unrelated_pairs']} unrelated pairs; "
                  "corrected = (s - b) / (1 - b).", "", table, ""]
    out = metrics(benchmark, encoders, frechet, frechet_note)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(out, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return out
