"""What a generated scene shows, as countable facts (for image similarity without a vision
model), and a multi-sentence description of it (the long prompts disentanglement cuts)."""

from __future__ import annotations

from collections import Counter

from emf_dist.scenes.generator import NUMBER_WORDS, TASKS, SceneConfig, make_scene


def scene_facts(objects: list[dict], relation: str | None) -> Counter:
    facts = Counter()
    for obj in objects:
        facts[("object", obj["color"], obj["shape"])] += 1
        facts[("color", obj["color"])] += 1
        facts[("shape", obj["shape"])] += 1
    if relation:
        a, b = objects[0], objects[1]
        facts[("relation", a["color"], a["shape"], relation, b["color"], b["shape"])] += 1
    return facts


def scene_similarity(a: Counter, b: Counter) -> float:
    """Multiset Jaccard of two scenes' facts: 1 for the same content, 0 for nothing in common."""
    union = sum((a | b).values())
    return sum((a & b).values()) / union if union else 1.0


_REGIONS = (("top left", "top", "top right"), ("left", "center", "right"),
            ("bottom left", "bottom", "bottom right"))


def describe(scene) -> str:
    """A multi-sentence description of a scene, the long prompts that disentanglement deletes from."""
    res = scene.image.shape[0]
    sentences = [scene.caption[0].upper() + scene.caption[1:] + "."]
    for obj in scene.objects:
        x0, y0, x1, y1 = obj["bbox"]
        col, row = min(int(3 * (x0 + x1) / 2 / res), 2), min(int(3 * (y0 + y1) / 2 / res), 2)
        where = _REGIONS[row][col]
        sentences.append(f"A {obj['color']} {obj['shape']} is at the {where}.")
    if scene.relation:
        a, b = scene.objects[:2]
        sentences.append(f"The {a['color']} {a['shape']} is {scene.relation} the {b['color']} {b['shape']}.")
    count = len(scene.objects)
    number = NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)
    sentences.append(f"There {'is one object' if count == 1 else f'are {number} objects'} on a plain black background.")
    return " ".join(sentences)


def generated_scenes(count: int, resolution: int, seed: int):
    """``count`` generated scenes drawn from every task, fixed by ``seed``."""
    cfg = SceneConfig(resolution=resolution, tasks=TASKS, seed=seed)
    return [make_scene(cfg, i) for i in range(count)]
