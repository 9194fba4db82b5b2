"""The scene detector: calibrated on fresh renders, GenEval's rules, and wrong images rejected."""

import numpy as np
import pytest
import torch

from emf_dist.scenes.detector import calibrate, detect, evaluate, metadata_of, relative_position, scene_metadata, score
from emf_dist.scenes.generator import SceneConfig, iter_scenes, make_scene, prompt_for, render


@pytest.mark.parametrize("resolution, count", [(32, 300), (16, 100), (64, 60)])
def test_calibration_on_fresh_renders_is_at_least_098_also_blurred_and_noisy(resolution, count):
    scenes = list(iter_scenes(SceneConfig(resolution=resolution, seed=4321), 0, count))
    result = calibrate(scenes, blur_sigma=0.5, noise_std=8.0)
    for condition in ("clean", "blur", "noise", "blur_noise", "rejects_wrong"):
        assert result[condition] >= 0.98, (condition, result)


def _scene_of(task, objects, relation=None, resolution=32):
    caption = prompt_for(task, objects, relation)
    return render(objects, resolution), scene_metadata(task, objects, relation, caption)


RED_CIRCLE = {"shape": "circle", "color": "red", "bbox": [4, 4, 14, 14]}
BLUE_SQUARE = {"shape": "square", "color": "blue", "bbox": [18, 6, 27, 15]}


def test_a_right_image_passes_and_each_kind_of_wrong_image_fails():
    image, meta = _scene_of("position", [RED_CIRCLE, BLUE_SQUARE], "left of")
    assert score(image, meta) == (True, "")
    # wrong color: the circle is drawn green
    wrong = render([{**RED_CIRCLE, "color": "green"}, BLUE_SQUARE], 32)
    ok, reason = score(wrong, meta)
    assert not ok and "red circle>=1" in reason
    # wrong shape: a red triangle instead of the circle
    ok, _ = score(render([{**RED_CIRCLE, "shape": "triangle"}, BLUE_SQUARE], 32), meta)
    assert not ok
    # swapped positions: the mirror image puts the circle right of the square
    ok, reason = score(image[:, ::-1].copy(), meta)
    assert not ok and "expected circle left of target" in reason
    # a missing object
    ok, _ = score(render([RED_CIRCLE], 32), meta)
    assert not ok


def test_counting_needs_the_exact_number():
    boxes = ([2, 2, 10, 10], [20, 2, 28, 10], [2, 20, 10, 28])
    three = [{"shape": "triangle", "color": "yellow", "bbox": b} for b in boxes]
    image, meta = _scene_of("counting", three)
    assert meta["include"][0]["count"] == 3 and meta["exclude"][0]["count"] == 4
    assert score(image, meta)[0]
    assert not score(render(three[:2], 32), meta)[0]  # too few
    four = three + [{"shape": "triangle", "color": "yellow", "bbox": [20, 20, 28, 28]}]
    ok, reason = score(render(four, 32), meta)  # too many: GenEval's exclude clause
    assert not ok and "triangle<4" in reason


def test_color_attribute_binding_is_checked():
    objects = [{"shape": "circle", "color": "red", "bbox": [2, 2, 12, 12]},
               {"shape": "square", "color": "blue", "bbox": [18, 18, 28, 28]}]
    image, meta = _scene_of("color_attr", objects)
    assert score(image, meta)[0]
    swapped = [{**objects[0], "color": "blue"}, {**objects[1], "color": "red"}]  # a blue circle and a red square
    assert not score(render(swapped, 32), meta)[0]


def test_relative_position_follows_geneval():
    # Centers 20 px apart on x, 2 on y: only "left of" (GenEval shrinks offsets by 0.1 x the box sizes).
    assert relative_position([0, 0, 10, 10], [20, 2, 30, 12]) == {"left of"}
    assert relative_position([20, 20, 30, 30], [0, 0, 10, 10]) == {"right of", "below"}
    assert relative_position([0, 0, 10, 10], [1, 1, 11, 11]) == set()  # overlapping: no relation


def test_position_metadata_uses_geneval_layout():
    scene = make_scene(SceneConfig(tasks=("position",), seed=3), 0)
    meta = metadata_of(scene)
    target, subject = meta["include"]
    assert subject["position"] == [scene.relation, 0]
    assert (subject["class"], subject["color"]) == (scene.objects[0]["shape"], scene.objects[0]["color"])
    assert (target["class"], target["color"]) == (scene.objects[1]["shape"], scene.objects[1]["color"])
    assert meta["prompt"] == scene.caption


def test_noise_images_contain_no_objects():
    """An untrained model outputs its noise; it must not score by chance."""
    z = torch.randn(100, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images = ((z.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.mean([len(detect(im)) for im in images]) < 0.05


def test_evaluate_reports_every_failed_clause():
    _, meta = _scene_of("two_object", [RED_CIRCLE, BLUE_SQUARE])
    ok, reason = evaluate([], meta)
    assert not ok and "red circle>=1" in reason and "blue square>=1" in reason
