"""A deterministic object detector for scene images, scored exactly the way GenEval scores.

GenEval (Ghosh et al., 2023) runs Mask2Former to find objects, CLIP to name each object's
color, and then checks the prompt's clauses: every `include` clause must hold (at least
`count` objects of the class, of the color if one is asked, at the relative position if
one is asked) and no `exclude` clause may (fewer than `count` objects of the class). An
image is right only if all of them pass. The scene world needs no learned detector:

- colors: every pixel is read as a palette color covering part of it over the black
  background (`palette_index`), so blurred edges keep their color; pixels no palette
  color explains are ignored;
- objects: 4-connected components of one palette color, specks below a minimum area dropped;
- shape: from geometry. A triangle (drawn apex up) has about 1/4 of its pixels in the top
  half of its box, a circle or a square 1/2; a square fills its box (1.0), a circle about
  pi/4 (0.67-0.84 at the sizes the scenes use). Components that fit no shape are ignored,
  as a detector ignores objects below its confidence threshold.

`scene_metadata` writes a scene's clauses in GenEval's own metadata format (class = shape)
so exported folders can be scored here or read by anyone who knows GenEval. Two choices
differ from GenEval, both because our captions say more than GenEval's: our prompts name a
color for every object, so every include clause carries one, and position clauses carry the
colors that identify the two objects. Where GenEval takes the `count` most confident
detections of a class and then checks their colors, we have no confidences and take the
largest detections of the requested color: the same verdict GenEval gives whenever its
detector ranks the requested-colored objects first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from emf_dist.scenes.generator import COLORS, SHAPES, Scene

BACKGROUND = "background"
PALETTE_NAMES = (BACKGROUND,) + tuple(COLORS)
_PALETTE = np.array([(0, 0, 0)] + list(COLORS.values()), dtype=np.int32)  # [9, 3]


@dataclass
class DetectorConfig:
    # RGB distance between a pixel and the best `coverage * color` beyond which no palette color
    # explains it; the closest two palette colors (red and orange) are 128 apart.
    max_color_distance: float = 100.0
    # Components smaller than this share of the canvas, or than min_area_pixels, are specks, not
    # objects (8 px at 32 x 32; the smallest scene object, a 5 px triangle, has 13).
    min_area_fraction: float = 0.008
    min_area_pixels: int = 8
    # A triangle has ~0.25-0.30 of its pixels in the top half of its box (more once blur eats its
    # apex); circles and squares 0.5, blurred or not, since they are symmetric.
    triangle_top_fraction: float = 0.44
    square_fill: float = 0.9  # area / box area at or above this: square (1.0 when drawn)
    circle_fill: float = 0.6  # ... at or above this (and not a triangle or square): circle
    max_aspect: float = 1.6  # shapes are drawn in square boxes; longer blobs are no shape
    max_asymmetry: float = 0.1  # |share of pixels in the left (or top) half - 0.5| allowed for symmetric shapes
    position_threshold: float = 0.1  # GenEval's POSITION_THRESHOLD, a share of the summed box sizes

    def validate(self) -> list[str]:
        problems = []
        if self.max_color_distance <= 0:
            problems.append("max_color_distance must be > 0")
        if not 0 <= self.min_area_fraction < 1:
            problems.append("min_area_fraction must be in [0, 1)")
        if not 0 < self.circle_fill < self.square_fill <= 1:
            problems.append("need 0 < circle_fill < square_fill <= 1")
        if self.max_aspect < 1:
            problems.append("max_aspect must be >= 1")
        return problems


@dataclass
class Detection:
    shape: str
    color: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 with x1, y1 exclusive (as in scenes.py)
    area: int


# ---------------------------------------------------------------- detection

def palette_index(image: np.ndarray, max_distance: float) -> np.ndarray:
    """[H, W] index into PALETTE_NAMES per pixel: 0 background, -1 no palette color fits.

    Each pixel is read as `coverage * color` over the black background: coverage is the
    projection on the color, and the color whose scaled version is closest wins if it covers at
    least half the pixel. A blurred edge (half red, half black) is then red or background as
    its coverage says, instead of a mixture that matches neither (plain nearest-color matching
    loses the thin apex of a blurred triangle that way)."""
    pixels = image.astype(np.float32)[..., None, :]  # [H, W, 1, 3]
    colors = _PALETTE[1:].astype(np.float32)  # [8, 3]
    coverage = np.clip((pixels * colors).sum(-1) / (colors * colors).sum(-1), 0.0, 1.0)  # [H, W, 8]
    residual = ((pixels - coverage[..., None] * colors) ** 2).sum(-1)
    residual[coverage < 0.5] = np.inf
    index = residual.argmin(-1) + 1
    best = residual.min(-1)
    index[np.isinf(best)] = 0
    index[np.isfinite(best) & (best > max_distance ** 2)] = -1
    return index


def classify_shape(mask: np.ndarray, cfg: DetectorConfig) -> str | None:
    """Shape of one component given its mask cropped to its box, or None if it fits none.

    Every scene shape is left-right symmetric and fills a square box; a triangle is bottom-heavy
    with a full-width base. Blobs that fail these checks (what noise makes) are no shape."""
    height, width = mask.shape
    if max(height, width) > cfg.max_aspect * min(height, width):
        return None
    area = mask.sum()
    half = lambda counts, n: counts[: n // 2].sum() + (counts[n // 2] / 2 if n % 2 else 0)  # noqa: E731
    rows, cols = mask.sum(1), mask.sum(0)
    top, left = half(rows, height) / area, half(cols, width) / area
    fill = area / (height * width)
    if top < cfg.triangle_top_fraction:  # (small triangles are not quite symmetric: their apex is 1-2 px)
        return "triangle" if fill <= 0.75 and rows[-1] >= 0.6 * width else None
    if max(abs(left - 0.5), abs(top - 0.5)) > cfg.max_asymmetry:
        return None
    if fill >= cfg.square_fill:
        return "square"
    if fill >= cfg.circle_fill:
        return "circle"
    return None


def detect(image: np.ndarray, cfg: DetectorConfig | None = None) -> list[Detection]:
    """Objects in a [H, W, 3] uint8 image, largest first (our stand-in for detector confidence)."""
    cfg = cfg or DetectorConfig()
    index = palette_index(image, cfg.max_color_distance)
    min_area = max(cfg.min_area_pixels, cfg.min_area_fraction * image.shape[0] * image.shape[1])
    found = []
    for color_id in range(1, len(PALETTE_NAMES)):
        labels, count = ndimage.label(index == color_id)  # 4-connected by default
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            mask = labels[box] == label
            area = int(mask.sum())
            if area < min_area:
                continue
            shape = classify_shape(mask, cfg)
            if shape is not None:
                ys, xs = box
                found.append(Detection(shape, PALETTE_NAMES[color_id], (xs.start, ys.start, xs.stop, ys.stop), area))
    found.sort(key=lambda d: (-d.area, d.bbox[1], d.bbox[0]))
    return found


# ---------------------------------------------------------------- GenEval clauses

def scene_metadata(task: str, objects: list[dict[str, Any]], relation: str | None, prompt: str) -> dict:
    """GenEval metadata (tag, include, exclude, prompt) for a scene; class = shape name."""
    first = {"class": objects[0]["shape"], "count": 1, "color": objects[0]["color"]}
    if task == "counting":
        count = len(objects)
        return {"tag": task, "include": [{**first, "count": count}],
                "exclude": [{"class": objects[0]["shape"], "count": count + 1}], "prompt": prompt}
    clauses = [{"class": o["shape"], "count": 1, "color": o["color"]} for o in objects]
    if task == "position":  # as GenEval: the target first, then "A <relation> group 0"
        clauses = [clauses[1], {**clauses[0], "position": [relation, 0]}]
    return {"tag": task, "include": clauses, "prompt": prompt}


def metadata_of(scene: Scene) -> dict:
    return scene_metadata(scene.task, scene.objects, scene.relation, scene.caption)


def relative_position(box_a, box_b, threshold: float = 0.1) -> set[str]:
    """Relations of box A to box B, as GenEval computes them (centers, shrunk by the box sizes)."""
    boxes = np.array([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _candidates(detections: list[Detection], clause: dict) -> list[Detection]:
    return [d for d in detections if d.shape == clause["class"]
            and ("color" not in clause or d.color == clause["color"])]


def evaluate(detections: list[Detection], metadata: dict, cfg: DetectorConfig | None = None) -> tuple[bool, str]:
    """GenEval's verdict: every include clause holds and no exclude clause does. Returns (correct, reason)."""
    cfg = cfg or DetectorConfig()
    correct, reasons, groups = True, [], []
    for clause in metadata.get("include", []):
        found = _candidates(detections, clause)[: clause["count"]]
        matched = len(found) >= clause["count"]
        if not matched:
            what = f"{clause.get('color', '')} {clause['class']}".strip()
            reasons.append(f"expected {what}>={clause['count']}, found {len(found)}")
        elif "position" in clause:
            relation, target = clause["position"]
            if groups[target] is None:
                matched = False
                reasons.append(f"no target for {clause['class']} to be {relation}")
            else:
                for obj in found:
                    for other in groups[target]:
                        actual = relative_position(obj.bbox, other.bbox, cfg.position_threshold)
                        if relation not in actual:
                            matched = False
                            reasons.append(f"expected {clause['class']} {relation} target, found "
                                           f"{' and '.join(sorted(actual)) or 'no relation'}")
                            break
                    if not matched:
                        break
        correct = correct and matched
        groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        present = _candidates(detections, clause)
        if len(present) >= clause["count"]:
            correct = False
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {len(present)}")
    return correct, "; ".join(reasons)


def score(image: np.ndarray, metadata: dict, cfg: DetectorConfig | None = None) -> tuple[bool, str]:
    return evaluate(detect(image, cfg), metadata, cfg)


def known_classes(metadata: dict) -> bool:
    """True when every clause names a scene shape and color, i.e. this detector can judge it."""
    clauses = metadata.get("include", []) + metadata.get("exclude", [])
    return bool(clauses) and all(c["class"] in SHAPES and c.get("color", "red") in COLORS for c in clauses)


# ---------------------------------------------------------------- calibration

_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur per channel; what a slightly soft generator produces at object edges."""
    smooth = ndimage.gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0), mode="nearest")
    return np.clip(np.rint(smooth), 0, 255).astype(np.uint8)


def add_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    noisy = image.astype(np.float32) + rng.normal(0.0, std, image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def wrong_metadata(scene: Scene, rng: np.random.Generator) -> dict:
    """Clauses the scene's own image must fail: a color, shape, count or relation that is not there."""
    meta = metadata_of(scene)
    clause = meta["include"][-1]  # for position: the clause with the relation
    present = {(o["color"], o["shape"]) for o in scene.objects}
    if scene.task == "position" and rng.random() < 0.5:
        clause["position"] = [_OPPOSITE[clause["position"][0]], 0]
    elif scene.task == "counting" and rng.random() < 0.5:  # one more, or one fewer (the exclude catches it)
        delta = 1 if clause["count"] == 1 or rng.random() < 0.5 else -1
        clause["count"] += delta
        meta["exclude"][0]["count"] += delta
    elif rng.random() < 0.5:
        clause["color"] = str(rng.choice([c for c in COLORS if (c, clause["class"]) not in present]))
    else:
        clause["class"] = str(rng.choice([s for s in SHAPES if (clause["color"], s) not in present]))
        for excluded in meta.get("exclude", []):
            excluded["class"] = clause["class"]
    return meta


def calibrate(scenes: list[Scene], cfg: DetectorConfig | None = None, *, blur_sigma: float = 0.5,
              noise_std: float = 8.0, seed: int = 0) -> dict[str, float]:
    """Accuracy on ground-truth renders (clean, blurred, noisy, both) and the rejection rate of wrong clauses.

    Each condition's accuracy is the share of scenes the detector scores correct against the
    scene's own prompt; `rejects_wrong` is the share of clean images it scores wrong against a
    prompt that differs in one color, shape, count or relation."""
    rng = np.random.default_rng(seed)
    conditions = {
        "clean": lambda im: im,
        "blur": lambda im: blur(im, blur_sigma),
        "noise": lambda im: add_noise(im, noise_std, rng),
        "blur_noise": lambda im: add_noise(blur(im, blur_sigma), noise_std, rng),
    }
    hits = {name: 0 for name in conditions}
    rejected = 0
    for scene in scenes:
        meta = metadata_of(scene)
        for name, corrupt in conditions.items():
            hits[name] += score(corrupt(scene.image), meta, cfg)[0]
        rejected += not score(scene.image, wrong_metadata(scene, rng), cfg)[0]
    total = max(len(scenes), 1)
    result = {name: count / total for name, count in hits.items()}
    result["rejects_wrong"] = rejected / total
    result["scenes"] = len(scenes)
    return result
