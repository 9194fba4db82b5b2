"""Tests for the procedural scene generator (emf_dist/scenes/generator.py)."""
from __future__ import annotations

import json
from collections import Counter, deque

import numpy as np
import pytest

from emf_dist.scenes.generator import (
    COLORS,
    NUMBER_WORDS,
    SHAPES,
    TASKS,
    TEMPLATES,
    SceneConfig,
    iter_scenes,
    make_scene,
    prompt_for,
    render,
    shape_mask,
)

N_SCENES = 600


@pytest.fixture(scope="module")
def scenes():
    return list(iter_scenes(SceneConfig(), 0, N_SCENES))


def _same(a, b) -> bool:
    return np.array_equal(a.image, b.image) and a.metadata() == b.metadata()


def _components(image: np.ndarray) -> list[tuple[tuple[int, int, int], list[int]]]:
    """4-connected components of same-colored non-black pixels: (color, [x0, y0, x1, y1])."""
    h, w, _ = image.shape
    seen = np.zeros((h, w), bool)
    found = []
    for y0 in range(h):
        for x0 in range(w):
            color = tuple(int(v) for v in image[y0, x0])
            if seen[y0, x0] or color == (0, 0, 0):
                continue
            seen[y0, x0] = True
            queue, xs, ys = deque([(y0, x0)]), [], []
            while queue:
                y, x = queue.popleft()
                xs.append(x)
                ys.append(y)
                for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if (0 <= ny < h and 0 <= nx < w and not seen[ny, nx]
                            and tuple(int(v) for v in image[ny, nx]) == color):
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            found.append((color, [min(xs), min(ys), max(xs) + 1, max(ys) + 1]))
    return found


def _template_index(scene) -> int:
    for t in range(len(TEMPLATES[scene.task])):
        if prompt_for(scene.task, scene.objects, scene.relation, t) == scene.caption:
            return t
    raise AssertionError(f"caption {scene.caption!r} matches no template")


def test_determinism_per_index():
    cfg = SceneConfig()
    for index in (0, 1, 12345, 10**8):
        assert _same(make_scene(cfg, index), make_scene(SceneConfig(), index))
    assert not _same(make_scene(cfg, 5), make_scene(SceneConfig(seed=1), 5))


def test_chunking_does_not_change_scenes():
    cfg = SceneConfig()
    whole = list(iter_scenes(cfg, 0, 60))
    # Chunks generated out of order, as parallel workers would.
    chunks = [list(iter_scenes(cfg, a, b)) for a, b in ((41, 60), (0, 17), (17, 41))]
    pieces = chunks[1] + chunks[2] + chunks[0]
    assert len(pieces) == len(whole)
    assert all(_same(a, b) for a, b in zip(whole, pieces))
    assert len({s.image.tobytes() for s in whole}) > 50  # not one scene repeated


def test_image_format_and_exact_palette(scenes):
    for scene in scenes:
        image = scene.image
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        covered = np.zeros((32, 32), bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj["bbox"]
            patch = image[y0:y1, x0:x1].reshape(-1, 3)
            lit = patch[patch.any(axis=1)]
            assert len(lit) > 0, scene.key
            assert (lit == COLORS[obj["color"]]).all(), scene.key  # no anti-aliased blends
            covered[y0:y1, x0:x1] = True
        assert not image[~covered].any(), scene.key  # background stays black


def test_boxes_inside_canvas_and_apart(scenes):
    for scene in scenes:
        boxes = [o["bbox"] for o in scene.objects]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
            assert 7 <= x1 - x0 <= 12 and 7 <= y1 - y0 <= 12
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:  # at least one background pixel between them
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], scene.key


def test_position_relations_hold(scenes):
    seen = set()
    for scene in (s for s in scenes if s.task == "position"):
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = (o["bbox"] for o in scene.objects)
        dx = (bx0 + bx1) / 2 - (ax0 + ax1) / 2  # B's center relative to A's
        dy = (by0 + by1) / 2 - (ay0 + ay1) / 2
        ok = {"left of": ax1 < bx0 and abs(dy) < dx, "right of": bx1 < ax0 and abs(dy) < -dx,
              "above": ay1 < by0 and abs(dx) < dy, "below": by1 < ay0 and abs(dx) < -dy}
        assert ok[scene.relation], (scene.key, scene.relation, scene.objects)
        assert scene.objects[0]["color"] != scene.objects[1]["color"]
        seen.add(scene.relation)
    assert seen == {"left of", "right of", "above", "below"}


def test_components_match_objects_and_counts(scenes):
    counts = Counter()
    for scene in scenes:
        found = sorted((c, b) for c, b in _components(scene.image))
        expected = sorted((COLORS[o["color"]], list(o["bbox"])) for o in scene.objects)
        assert found == expected, scene.key  # one tight component per object
        if scene.task == "counting":
            stated = next(n for n, word in enumerate(NUMBER_WORDS) if f"{word} " in scene.caption)
            assert len(found) == stated and len({c for c, _ in found}) == 1, scene.key
            counts[stated] += 1
    assert set(counts) == {1, 2, 3, 4}


def test_captions_name_objects_and_vary(scenes):
    templates = {task: set() for task in TASKS}
    for scene in scenes:
        caption = scene.caption
        for obj in scene.objects:
            assert obj["color"] in caption and obj["shape"] in caption, caption
        n = len(scene.objects)
        if scene.task == "counting":
            assert NUMBER_WORDS[n] in caption
            assert (f"{scene.objects[0]['shape']}s" in caption) == (n > 1), caption
        assert " a orange" not in f" {caption}" and " an red" not in f" {caption}", caption
        templates[scene.task].add(_template_index(scene))
    assert all(len(used) >= 3 for used in templates.values()), templates


def test_prompt_for_examples():
    red_circle, orange_sq = {"color": "red", "shape": "circle"}, {"color": "orange", "shape": "square"}
    assert prompt_for("single_object", [red_circle]) == "a photo of a red circle"
    assert prompt_for("single_object", [orange_sq], template=1) == "an orange square"
    assert prompt_for("counting", [{"color": "blue", "shape": "circle"}] * 3) == "three blue circles"
    assert prompt_for("counting", [red_circle]) == "one red circle"
    assert (prompt_for("position", [red_circle, orange_sq], "left of", 1)
            == "a red circle to the left of an orange square")
    assert prompt_for("colors", [orange_sq], template=1) == "an orange-colored square"
    with pytest.raises(ValueError):
        prompt_for("single_object", [red_circle], template=len(TEMPLATES["single_object"]))
    with pytest.raises(ValueError):
        prompt_for("position", [red_circle, orange_sq])


def test_holdout_pairs_split_cleanly():
    held = {("red", "triangle"), ("blue", "circle")}
    cfg = SceneConfig(holdout=("red triangle", "blue circle"))
    for scene in iter_scenes(cfg, 0, 400):
        assert not held & {(o["color"], o["shape"]) for o in scene.objects}, scene.key
    for scene in iter_scenes(cfg, 0, 200, split="holdout"):
        assert held & {(o["color"], o["shape"]) for o in scene.objects}, scene.key
    assert make_scene(cfg, 3, "holdout").key != make_scene(cfg, 3).key
    with pytest.raises(ValueError, match="holdout"):
        make_scene(SceneConfig(), 0, split="holdout")
    with pytest.raises(ValueError, match="split"):
        make_scene(cfg, 0, split="test")


@pytest.mark.parametrize("kwargs, needle", [
    ({"tasks": ("single_object", "drawing")}, "drawing"),
    ({"holdout": ("purple circle",)}, "purple"),
    ({"holdout": ("red hexagon",)}, "hexagon"),
    ({"holdout": ("red",)}, "red"),
    ({"max_size": 16}, "4 objects"),
    ({"min_size": 3}, "indistinguishable"),
    ({"min_size": 12, "max_size": 9}, "min_size"),
    ({"resolution": 8}, "resolution"),
    ({"task_weights": (1.0, 2.0)}, "task_weights"),
    ({"task_weights": (0.0,) * 6}, "task_weights"),
    ({"holdout": tuple(f"{c} {s}" for c in COLORS for s in SHAPES)}, "every"),
    ({"seed": -1}, "seed"),
    ({"resolution": 16, "cell": 8, "min_size": 6, "max_size": 8}, "cell - 1"),
    ({"resolution": 16, "cell": 16, "min_size": 6, "max_size": 7}, "counting needs"),
    ({"resolution": 16, "cell": 9, "min_size": 6, "max_size": 7, "tasks": ("position",)}, "fewer than 2"),
])
def test_validate_catches_bad_configs(kwargs, needle):
    cfg = SceneConfig(**kwargs)
    problems = cfg.validate()
    assert any(needle in p for p in problems), problems
    with pytest.raises(ValueError):
        make_scene(cfg, 0)


def test_validate_accepts_good_configs():
    assert SceneConfig().validate() == []
    assert SceneConfig(resolution=16).validate() == []
    assert SceneConfig(tasks=["counting"], holdout=["red triangle"], seed=3).validate() == []


def test_task_weights_and_other_resolutions():
    cfg = SceneConfig(task_weights=(0, 0, 1, 0, 3, 0))
    assert {s.task for s in iter_scenes(cfg, 0, 100)} == {"counting", "position"}
    for res in (16, 64):
        cfg = SceneConfig(resolution=res)
        lo, hi = cfg.sizes()
        for scene in iter_scenes(cfg, 0, 100):
            assert scene.image.shape == (res, res, 3)
            assert np.array_equal(render(scene.objects, res), scene.image)
            for x0, y0, x1, y1 in (o["bbox"] for o in scene.objects):
                assert 0 <= x0 and x1 <= res and 0 <= y0 and y1 <= res and lo <= x1 - x0 <= hi


def test_metadata_is_json_and_key_is_clean(scenes):
    keys = set()
    for scene in scenes[:100]:
        meta = json.loads(json.dumps(scene.metadata()))
        assert "image" not in meta and meta["caption"] == scene.caption and meta["task"] == scene.task
        assert [o["bbox"] for o in meta["objects"]] == [list(o["bbox"]) for o in scene.objects]
        assert "." not in scene.key and scene.key not in keys
        keys.add(scene.key)
        assert np.array_equal(render(meta["objects"], 32), scene.image)


@pytest.mark.parametrize("size", range(7, 13))
def test_shapes_distinguishable_by_fill_ratio(size):
    fill = {shape: shape_mask(shape, size, size).mean() for shape in SHAPES}
    assert 0.70 <= fill["circle"] <= 0.83, fill
    assert fill["square"] == 1.0
    assert 0.45 <= fill["triangle"] <= 0.60, fill
    triangle = shape_mask("triangle", size, size)
    assert triangle[0].sum() < triangle[-1].sum() == size  # pointed top, full base
    for shape in SHAPES:  # the mask fills its box edge to edge, so bboxes are tight
        mask = shape_mask(shape, size, size)
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()


def test_smallest_allowed_shapes_stay_apart():
    for size in (5, 6):
        fill = {shape: shape_mask(shape, size, size).mean() for shape in SHAPES}
        assert fill["triangle"] + 0.1 < fill["circle"] < fill["square"] - 0.1, fill


def test_cell_layout_puts_one_object_per_cell_and_keeps_every_relation():
    """The demo's layout: objects centered in distinct cells of a grid, relations still true."""
    cfg = SceneConfig(resolution=24, cell=8, min_size=6, max_size=7)
    relations = set()
    for scene in iter_scenes(cfg, 0, 300):
        cells = set()
        for o in scene.objects:
            x0, y0, x1, y1 = o["bbox"]
            col, row = x0 // 8, y0 // 8
            assert (x1 - 1) // 8 == col and (y1 - 1) // 8 == row, scene.key  # inside one cell
            assert x0 - col * 8 == (8 - (x1 - x0)) // 2, scene.key  # centered in it
            cells.add((row, col))
        assert len(cells) == len(scene.objects), scene.key
        found = sorted((c, b) for c, b in _components(scene.image))
        assert found == sorted((COLORS[o["color"]], list(o["bbox"])) for o in scene.objects), scene.key
        if scene.task == "position":
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = (o["bbox"] for o in scene.objects)
            dx, dy = (bx0 + bx1 - ax0 - ax1) / 2, (by0 + by1 - ay0 - ay1) / 2
            ok = {"left of": abs(dy) < dx, "right of": abs(dy) < -dx, "above": abs(dx) < dy, "below": abs(dx) < -dy}
            assert ok[scene.relation], (scene.key, scene.relation, scene.objects)
            relations.add(scene.relation)
    assert relations == {"left of", "right of", "above", "below"}
