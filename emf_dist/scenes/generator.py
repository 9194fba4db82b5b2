"""Procedural shape scenes: the demo's default training set and the GenEval-style benchmark's truth.

Every object is drawn without anti-aliasing, so each of its pixels has exactly its palette color
and an evaluator can find objects by exact color match. A scene depends only on
(config, split, index): workers can generate disjoint index ranges in parallel and agree.
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "magenta": (255, 0, 255), "cyan": (0, 255, 255), "white": (255, 255, 255), "orange": (255, 128, 0),
}
SHAPES = ("circle", "square", "triangle")
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
SPLITS = {"train": 0, "holdout": 1}  # the id is part of the RNG seed, so never renumber
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
ALL_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES)  # every (color, shape) combination
MAX_OBJECTS = 4
MIN_SHAPE_SIZE = 5  # below this a triangle and a circle become the same blob of pixels
_TWO_OBJECT_TASKS = ("two_object", "position", "color_attr")

# Caption templates per task. Fields: a0/a1 "a red circle", np0 "red circle(s)", s0/c0 shape and
# color words, a_s0 "a circle", a_c0 "an orange", num "three", rel "to the left of".
TEMPLATES: dict[str, tuple[str, ...]] = {
    "single_object": ("a photo of {a0}", "{a0}", "an image showing one {np0}",
                      "a picture of {a0} on a black background"),
    "colors": ("a photo of {a_s0} that is {c0}", "{a_c0}-colored {s0}", "{a_s0} colored {c0}"),
    "counting": ("{num} {np0}", "a photo of {num} {np0}", "an image showing exactly {num} {np0}"),
    "two_object": ("a photo of {a0} and {a1}", "{a0} and {a1}", "an image with {a0} and {a1}"),
    "color_attr": ("a photo of {a0} and {a1}", "{a_s0} that is {c0} and {a_s1} that is {c1}",
                   "{a0} together with {a1}"),
    "position": ("a photo of {a0} {rel} {a1}", "{a0} {rel} {a1}", "an image where {a0} is {rel} {a1}"),
}
_RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above",
                   "below": "below"}


@dataclass(frozen=True)
class SceneConfig:
    resolution: int = 32  # square canvas side in pixels
    tasks: tuple[str, ...] = TASKS  # GenEval task families to draw scenes from
    task_weights: tuple[float, ...] | None = None  # relative task frequencies; None: uniform
    min_size: int | None = None  # smallest object side in px; None: 7/32 of resolution
    max_size: int | None = None  # largest object side in px; None: 12/32 of resolution
    holdout: tuple[str, ...] = ()  # "color shape" pairs kept out of train, e.g. ("red triangle",)
    # Place objects on a grid of cell x cell px cells (one object per cell, centered) instead of
    # anywhere: far fewer layouts to learn, which is what lets a small model on a CPU learn
    # shapes, counts and relations in minutes. None: free placement.
    cell: int | None = None
    seed: int = 0  # dataset seed; with split and index it fixes every scene

    def __post_init__(self) -> None:
        # Lists from YAML would make the config unhashable, and the plan cache needs a hash.
        for name in ("tasks", "task_weights", "holdout"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    def sizes(self) -> tuple[int, int]:
        lo = self.min_size if self.min_size is not None else max(MIN_SHAPE_SIZE, self.resolution * 7 // 32)
        hi = self.max_size if self.max_size is not None else max(lo, self.resolution * 12 // 32)
        return lo, hi

    def holdout_pairs(self) -> list[tuple[str, str]]:
        return [tuple(item.split(" ", 1)) if " " in item else (item, "") for item in self.holdout]

    def validate(self) -> list[str]:
        problems = [f"unknown task {t!r}" for t in self.tasks if t not in TASKS]
        if not self.tasks:
            problems.append("tasks is empty")
        if self.task_weights is not None:
            if len(self.task_weights) != len(self.tasks):
                problems.append("task_weights must have one weight per task")
            elif any(w < 0 for w in self.task_weights) or sum(self.task_weights) <= 0:
                problems.append("task_weights must be non-negative with a positive sum")
        if self.resolution < 16:
            problems.append(f"resolution {self.resolution} < 16")
        lo, hi = self.sizes()
        if lo < MIN_SHAPE_SIZE:
            problems.append(f"min_size {lo} < {MIN_SHAPE_SIZE}: shapes become indistinguishable")
        if lo > hi:
            problems.append(f"min_size {lo} > max_size {hi}")
        if hi > self.resolution // 2 - 1:  # 2x2 grid with a 1 px gap is the worst case for 4 objects
            problems.append(f"max_size {hi} > {self.resolution // 2 - 1}: 4 objects cannot fit")
        problems += self._cell_problems(hi)
        for item, (color, shape) in zip(self.holdout, self.holdout_pairs()):
            if color not in COLORS or shape not in SHAPES:
                problems.append(f"holdout {item!r} is not a known 'color shape' pair")
        train = _train_pool(self)
        if not train:
            problems.append("holdout removes every (color, shape) pair from train")
        elif set(self.tasks) & set(_TWO_OBJECT_TASKS) and not any(_bound(p, q) for p in train for q in train):
            problems.append("train pairs cannot give two objects of different colors and shapes")
        if self.seed < 0:
            problems.append("seed must be >= 0")
        return problems

    def _cell_problems(self, max_size: int) -> list[str]:
        if self.cell is None:
            return []
        if max_size > self.cell - 1:  # a 1 px gap keeps neighbours apart for the detector
            return [f"max_size {max_size} > cell - 1 = {self.cell - 1}"]
        per_side = self.resolution // self.cell
        problems = []
        if per_side ** 2 < MAX_OBJECTS and "counting" in self.tasks:
            problems.append(f"cell {self.cell} gives {per_side ** 2} cells; counting needs {MAX_OBJECTS}")
        if per_side < 2:
            problems.append(f"cell {self.cell} gives fewer than 2 cells per side at resolution {self.resolution}")
        return problems


@dataclass
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    task: str
    objects: list[dict[str, Any]]  # {"shape", "color", "bbox": [x0, y0, x1, y1]}, x1/y1 exclusive
    key: str  # unique across splits, free of dots (webdataset splits keys at dots)
    relation: str | None = None  # position task: objects[0] <relation> objects[1]
    split: str = "train"
    index: int = 0

    def metadata(self) -> dict[str, Any]:
        return {"key": self.key, "caption": self.caption, "task": self.task, "relation": self.relation,
                "split": self.split, "index": self.index,
                "objects": [{"shape": o["shape"], "color": o["color"], "bbox": [int(v) for v in o["bbox"]]}
                            for o in self.objects]}


# ---------------------------------------------------------------- rendering

@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean mask of a shape filling a width x height box; cached since sizes are few."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centers
    dx, dy = xs - width / 2, ys - height / 2
    if shape == "square":
        mask = np.ones((height, width), bool)
    elif shape == "circle":  # radius 0.1 px short of the box: drops lone near-corner pixels
        mask = (dx / (width / 2 - 0.1)) ** 2 + (dy / (height / 2 - 0.1)) ** 2 <= 1.0
    elif shape == "triangle":  # apex up; 0.5 floor keeps the apex row non-empty for even widths
        half = np.maximum(ys / height * width / 2, 0.5)
        mask = np.abs(dx) <= half
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask.flags.writeable = False
    return mask


def render(objects: list[dict[str, Any]], resolution: int) -> np.ndarray:
    image = np.zeros((resolution, resolution, 3), np.uint8)
    for obj in objects:
        x0, y0, x1, y1 = obj["bbox"]
        image[y0:y1, x0:x1][shape_mask(obj["shape"], x1 - x0, y1 - y0)] = COLORS[obj["color"]]
    return image


# ---------------------------------------------------------------- captions

def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def prompt_for(task: str, objects: list[dict[str, Any]], relation: str | None = None,
               template: int = 0) -> str:
    """Caption for a task and object list; template indexes TEMPLATES[task]."""
    if task not in TEMPLATES:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    templates = TEMPLATES[task]
    if not 0 <= template < len(templates):
        raise ValueError(f"task {task!r} has templates 0..{len(templates) - 1}, got {template}")
    if task == "position" and relation not in _RELATION_WORDS:
        raise ValueError(f"position prompts need a relation in {RELATIONS}, got {relation!r}")
    count = len(objects)
    fields = {"num": NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count),
              "rel": _RELATION_WORDS.get(relation or "", "")}
    for i, obj in enumerate(objects[:2]):
        color, shape = obj["color"], obj["shape"]
        fields.update({f"c{i}": color, f"s{i}": shape, f"a{i}": _article(f"{color} {shape}"),
                       f"a_s{i}": _article(shape), f"a_c{i}": _article(color)})
    fields["np0"] = f"{objects[0]['color']} {objects[0]['shape']}" + ("s" if count > 1 else "")
    return templates[template].format(**fields)


# ---------------------------------------------------------------- sampling

def _bound(p: tuple[str, str], q: tuple[str, str]) -> bool:
    """Two pairs with different colors and shapes: attributes can only bind one way."""
    return p[0] != q[0] and p[1] != q[1]


def _train_pool(cfg: SceneConfig) -> list[tuple[str, str]]:
    held = set(cfg.holdout_pairs())
    return [pair for pair in ALL_PAIRS if pair not in held]


@dataclass(frozen=True)
class _Plan:  # per-config precomputation, so make_scene stays cheap
    tasks: tuple[str, ...]
    cum_weights: tuple[float, ...]
    sizes: tuple[int, int]
    train_pool: tuple[tuple[str, str], ...]
    holdout_pool: tuple[tuple[str, str], ...]


@functools.lru_cache(maxsize=64)
def _plan(cfg: SceneConfig) -> _Plan:
    problems = cfg.validate()
    if problems:
        raise ValueError("invalid SceneConfig: " + "; ".join(problems))
    weights = cfg.task_weights or (1.0,) * len(cfg.tasks)
    return _Plan(cfg.tasks, tuple(np.cumsum(weights).tolist()), cfg.sizes(),
                 tuple(_train_pool(cfg)), tuple(cfg.holdout_pairs()))


_CONSTRAINTS: dict[str, Callable[[list], bool]] = {
    "two_object": lambda p: p[0] != p[1],
    "position": lambda p: p[0][0] != p[1][0],  # distinct colors: color detection tells them apart
    "color_attr": lambda p: _bound(p[0], p[1]),
}


def _randint(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Uniform int in [lo, hi); rng.random() is ~4x cheaper per call than rng.integers()."""
    return lo + int(rng.random() * (hi - lo))


def _sample_pairs(rng: np.random.Generator, plan: _Plan, task: str, k: int, split: str) -> list:
    ok = _CONSTRAINTS.get(task, lambda p: True)
    pool = plan.train_pool if split == "train" else ALL_PAIRS
    for _ in range(100):
        pairs = [pool[_randint(rng, 0, len(pool))] for _ in range(k)]
        if split == "holdout":  # one slot is forced to be a held-out pair
            pairs[_randint(rng, 0, k)] = plan.holdout_pool[_randint(rng, 0, len(plan.holdout_pool))]
        if ok(pairs):
            return pairs
    raise RuntimeError(f"could not sample {task} objects for split {split!r}")


def _apart(a: list[int], b: list[int]) -> bool:
    """Boxes separated by at least one background pixel along x or y."""
    return a[2] + 1 <= b[0] or b[2] + 1 <= a[0] or a[3] + 1 <= b[1] or b[3] + 1 <= a[1]


def _free_layout(rng: np.random.Generator, sizes: list[int], res: int, tries: int = 20) -> list | None:
    """Random non-overlapping boxes, or None when the random tries run out."""
    boxes: list[list[int]] = []
    for s in sizes:
        for _ in range(tries):
            x, y = _randint(rng, 0, res - s + 1), _randint(rng, 0, res - s + 1)
            box = [x, y, x + s, y + s]
            if all(_apart(box, other) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _grid_layout(rng: np.random.Generator, sizes: list[int], res: int) -> list:
    """Fallback that always fits: one object per quadrant (validate() guarantees size < res//2)."""
    half, boxes = res // 2, []
    for cell, s in zip(rng.permutation(4).tolist(), sizes):
        x = (cell % 2) * half + _randint(rng, 0, half - s)
        y = (cell // 2) * half + _randint(rng, 0, half - s)
        boxes.append([x, y, x + s, y + s])
    return boxes


def _position_layout(rng: np.random.Generator, sizes: list[int], res: int, relation: str) -> list:
    """Two boxes with the relation true on its axis AND dominant: the cross-axis center offset is
    smaller than the main-axis one, so "left of" never also reads as "above"."""
    a_first = relation in ("left of", "above")
    s1, s2 = sizes if a_first else sizes[::-1]
    p1 = _randint(rng, 0, res - s1 - s2)  # main axis: first box, then a gap, then the second
    p2 = _randint(rng, p1 + s1 + 1, res - s2 + 1)
    q1 = _randint(rng, 0, res - s1 + 1)
    # Doubled coordinates keep this integer: need |2*q2 + s2 - m2| < d2.
    m2, d2 = 2 * q1 + s1, (2 * p2 + s2) - (2 * p1 + s1)
    lo = max(0, (m2 - s2 - d2) // 2 + 1)
    hi = min(res - s2, -(-(m2 - s2 + d2) // 2) - 1)
    q2 = _randint(rng, lo, hi + 1)
    horizontal = relation in ("left of", "right of")
    boxes = [[p, q, p + s, q + s] if horizontal else [q, p, q + s, p + s]
             for p, q, s in ((p1, q1, s1), (p2, q2, s2))]
    return boxes if a_first else boxes[::-1]


def _relation_holds(a: tuple[int, int], b: tuple[int, int], relation: str) -> bool:
    """Cells (row, col): a <relation> b on its axis, and that axis dominates (see _position_layout)."""
    d_row, d_col = b[0] - a[0], b[1] - a[1]
    main, cross = {"left of": (d_col, d_row), "right of": (-d_col, d_row),
                   "above": (d_row, d_col), "below": (-d_row, d_col)}[relation]
    return main > 0 and abs(cross) < main


def _cell_layout(rng: np.random.Generator, sizes: list[int], res: int, cell: int, relation: str | None) -> list:
    """One object per distinct cell, centered in it; for a relation, a cell pair where it holds."""
    per_side = res // cell
    cells = [(row, col) for row in range(per_side) for col in range(per_side)]
    if relation:
        pairs = [(a, b) for a in cells for b in cells if _relation_holds(a, b, relation)]
        chosen = list(pairs[_randint(rng, 0, len(pairs))])
    else:
        chosen = [cells[i] for i in rng.permutation(len(cells))[: len(sizes)].tolist()]
    boxes = []
    for (row, col), s in zip(chosen, sizes):
        x, y = col * cell + (cell - s) // 2, row * cell + (cell - s) // 2
        boxes.append([x, y, x + s, y + s])
    return boxes


def scene_key(split: str, index: int) -> str:
    """The key of scene ``index`` of ``split``: unique across splits, free of dots."""
    return f"scene-{split}-{index:09d}"


def make_scene(cfg: SceneConfig, index: int, split: str = "train") -> Scene:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    plan = _plan(cfg)
    if split == "holdout" and not plan.holdout_pool:
        raise ValueError("split 'holdout' needs SceneConfig.holdout pairs, and none are configured")
    rng = np.random.default_rng([cfg.seed, SPLITS[split], index])
    task = plan.tasks[bisect.bisect_right(plan.cum_weights, rng.random() * plan.cum_weights[-1])]
    if task == "counting":
        count = _randint(rng, 1, MAX_OBJECTS + 1)
        pairs = _sample_pairs(rng, plan, task, 1, split) * count
    else:
        pairs = _sample_pairs(rng, plan, task, 2 if task in _TWO_OBJECT_TASKS else 1, split)
    sizes = [_randint(rng, plan.sizes[0], plan.sizes[1] + 1) for _ in pairs]
    relation = RELATIONS[_randint(rng, 0, len(RELATIONS))] if task == "position" else None
    if cfg.cell:
        boxes = _cell_layout(rng, sizes, cfg.resolution, cfg.cell, relation)
    elif relation:
        boxes = _position_layout(rng, sizes, cfg.resolution, relation)
    else:
        boxes = _free_layout(rng, sizes, cfg.resolution) or _grid_layout(rng, sizes, cfg.resolution)
    objects = [{"shape": s, "color": c, "bbox": b} for (c, s), b in zip(pairs, boxes)]
    caption = prompt_for(task, objects, relation, _randint(rng, 0, len(TEMPLATES[task])))
    return Scene(render(objects, cfg.resolution), caption, task, objects,
                 key=scene_key(split, index), relation=relation, split=split, index=index)


def iter_scenes(cfg: SceneConfig, start: int, stop: int, split: str = "train") -> Iterator[Scene]:
    """Scenes start..stop-1; any chunking of an index range yields the same scenes."""
    for index in range(start, stop):
        yield make_scene(cfg, index, split)
