"""Discriminability: whether an encoding tells prompts apart, scored by the images they describe.

Every image has several captions. For each query caption the nearest other caption by pooled
text embedding is retrieved, excluding the captions of the query's own image and verbatim
copies of the query (any encoder, even string equality, retrieves a copy, so they would
measure nothing). The score is the similarity of the retrieved caption's image to the query's
image; Recall@1 is the share of queries whose retrieved image is as similar as the best
available one. Image similarity on generated scenes comes from their exact ground truth
(`scene_similarity`: multiset Jaccard over objects, colors, shapes and the relation), on real
data from a vision backbone's features (backbone.py). `chance` is the expected score of a
random retriever, for scale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from emf_dist.eval.encoder_config import DiscriminabilityConfig
from emf_dist.eval.scene_truth import generated_scenes, scene_facts, scene_similarity
from emf_dist.scenes.generator import TEMPLATES, prompt_for


@dataclass
class RetrievalSet:
    captions: list[str]
    image_of: np.ndarray  # [captions] image index of each caption
    image_similarity: np.ndarray  # [images, images]


def scene_retrieval_set(cfg: DiscriminabilityConfig) -> RetrievalSet:
    scenes = generated_scenes(cfg.scenes, cfg.resolution, cfg.seed)
    captions, image_of = [], []
    for i, scene in enumerate(scenes):
        for template in range(len(TEMPLATES[scene.task])):
            captions.append(prompt_for(scene.task, scene.objects, scene.relation, template))
            image_of.append(i)
    if cfg.image_backbone:
        sim = _backbone_similarity(cfg.image_backbone, np.stack([s.image for s in scenes]))
    else:
        facts = [scene_facts(s.objects, s.relation) for s in scenes]
        sim = np.array([[scene_similarity(a, b) for b in facts] for a in facts])
    return RetrievalSet(captions, np.array(image_of), sim)


def jsonl_retrieval_set(cfg: DiscriminabilityConfig) -> RetrievalSet:
    from PIL import Image

    captions, image_of, images = [], [], []
    with open(cfg.data) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            texts = row.get("captions") or [row["caption"]]
            images.append(np.asarray(Image.open(row["image"]).convert("RGB")))
            captions += texts
            image_of += [len(images) - 1] * len(texts)
    return RetrievalSet(captions, np.array(image_of), _backbone_similarity(cfg.image_backbone, images))


def _backbone_similarity(path: str, images) -> np.ndarray:
    from emf_dist.eval.backbone import VisionBackbone

    backbone = VisionBackbone(path)
    feats = np.concatenate([backbone.features(np.asarray(im)[None]) for im in images])  # sizes may differ
    feats /= np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12
    return feats @ feats.T


def discriminability(pooled: torch.Tensor, data: RetrievalSet) -> dict[str, float]:
    emb = F.normalize(pooled.float(), dim=-1)
    text_sim = emb @ emb.T
    same_image = torch.from_numpy(data.image_of[:, None] == data.image_of[None, :])
    text_ids: dict[str, int] = {}
    ids = np.array([text_ids.setdefault(c.strip().lower(), len(text_ids)) for c in data.captions])
    same_text = torch.from_numpy(ids[:, None] == ids[None, :])
    valid = ~(same_image | same_text)
    text_sim = text_sim.masked_fill(~valid, float("-inf"))
    retrieved = text_sim.argmax(1).numpy()
    image_sim = data.image_similarity[data.image_of[:, None], data.image_of[None, :]]  # [captions, captions]
    rows = valid.any(1).numpy()
    valid_np = valid.numpy()
    got = image_sim[np.arange(len(retrieved)), retrieved]
    best = np.where(valid_np, image_sim, -np.inf).max(1)
    chance = (image_sim * valid_np).sum(1) / np.maximum(valid_np.sum(1), 1)
    return {"score": float(got[rows].mean()), "recall_at_1": float((got >= best - 1e-9)[rows].mean()),
            "chance": float(chance[rows].mean()), "queries": int(rows.sum())}
