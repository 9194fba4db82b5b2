"""EMF's text-encoder selection: discriminability and disentanglement, against reference baselines.

EMF picks the encoder before any fine-tuning because at one step the network cannot refine
a vague condition: the encoding must tell different prompts apart (discriminability) and
must change gracefully when parts of a prompt go away (disentanglement).

Discriminability. Every image has several captions. For each query caption the nearest other
caption by pooled text embedding is retrieved, excluding the captions of the query's own
image and verbatim copies of the query (any encoder, even string equality, retrieves a copy,
so they would measure nothing). The score is the similarity of the retrieved caption's image
to the query's image; Recall@1 is the share of queries whose retrieved image is as similar as
the best available one. Image similarity on generated scenes comes from their exact ground
truth (`scene_similarity`: multiset Jaccard over objects, colors, shapes and the relation),
on real data from a vision backbone's features (backbone.py). `chance` is the expected score
of a random retriever, for scale.

Disentanglement. A prompt loses words, phrases or sentences (10%, 30%, 50% of them, fixed
seeds). The cosine between the full and reduced encodings is measured on the pooled vector and
token-aligned: each surviving word's token states (averaged over its tokens) against the
same word's in the full prompt. Raw cosines are not comparable across encoders (an LLM's
unrelated prompts can sit at 0.8), so each is also reported baseline-corrected,
(s - b) / (1 - b), with b the mean cosine of unrelated prompts (pooled) or of different words
from unrelated prompts (token-aligned): 1 = unchanged by the deletion, 0 = as far apart as
unrelated text.

Selection: a candidate passes if it reaches both configurable thresholds (discriminability,
corrected pooled disentanglement) and, by default, beats every reference baseline on both;
the passing candidate with the highest discriminability is selected.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from emf_dist.eval.baselines import HashedBagOfWords, RandomInitEncoder
from emf_dist.scenes.generator import NUMBER_WORDS, TASKS, TEMPLATES, SceneConfig, make_scene, prompt_for
from emf_dist.text_encoder import EncodedText, TextEncoder, TextEncoderConfig

BASELINES = ("hashed_bow", "random_init")
MODES = ("word", "phrase", "sentence")
# A phrase starts after punctuation or at one of these words: a deterministic stand-in for a parser
# that is good enough to cut "a red circle | to the left | of a blue square".
_PHRASE_STARTS = frozenset("and with that which where while on in at to of near next above below beside "
                           "behind under over together".split())


@dataclass
class DiscriminabilityConfig:
    scenes: int = 150  # generated scenes; each contributes one caption per template of its task
    resolution: int = 32  # their resolution (matters only with an image backbone)
    seed: int = 7  # scene seed
    # JSONL of real data instead of scenes: {"image": path, "captions": [...]} (or "caption": str) per line;
    # needs image_backbone, since real images have no ground truth to compare.
    data: str | None = None
    # Local transformers vision model (e.g. DINOv3) for image similarity; None: scene ground truth.
    image_backbone: str | None = None


@dataclass
class DisentanglementConfig:
    prompts: int = 60  # multi-sentence scene descriptions (or the first N lines of prompt_file)
    prompt_file: str | None = None  # one prompt per line, e.g. long DPG-Bench prompts; None: scene descriptions
    modes: tuple[str, ...] = MODES
    ratios: tuple[float, ...] = (0.1, 0.3, 0.5)  # share of units deleted
    seed: int = 11
    unrelated_pairs: int = 200  # prompt pairs sampled for the token-aligned baseline b (pooled b uses all)


@dataclass
class SelectionConfig:
    # On the default scenes (this machine, 2026-11): MiniLM 0.70 / 0.72, hashed bag of words 0.47 / 0.71,
    # MiniLM's architecture randomly initialised 0.38 / 0.40 (discriminability / corrected disentanglement).
    min_discriminability: float = 0.5  # retrieved image's mean similarity to the query's
    min_disentanglement: float = 0.3  # baseline-corrected pooled cosine, mean over modes and ratios
    beat_baselines: bool = True  # must also beat every reference baseline on both metrics


@dataclass
class EncoderEvalConfig:
    candidates: list[TextEncoderConfig] = field(default_factory=lambda: [TextEncoderConfig()])
    baselines: tuple[str, ...] = BASELINES  # reference encoders ("hashed_bow", "random_init")
    random_init_seed: int = 0  # the random-init baseline copies the first candidate's architecture
    # Token budget for every encoder here (None: each candidate's own). Training captions are short;
    # the multi-sentence prompts need more, or deletions past the budget would change nothing.
    max_length: int | None = 96
    discriminability: DiscriminabilityConfig = field(default_factory=DiscriminabilityConfig)
    disentanglement: DisentanglementConfig = field(default_factory=DisentanglementConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    def validate(self) -> list[str]:
        problems = [f"unknown baseline {b!r}; choose from {BASELINES}" for b in self.baselines if b not in BASELINES]
        problems += [f"unknown deletion mode {m!r}; choose from {MODES}" for m in self.disentanglement.modes
                 if m not in MODES]
        if not self.candidates:
            problems.append("candidates is empty")
        if any(not 0 < r < 1 for r in self.disentanglement.ratios):
            problems.append("disentanglement.ratios must lie in (0, 1)")
        if self.discriminability.data and not self.discriminability.image_backbone:
            problems.append("discriminability.data (real images) needs discriminability.image_backbone")
        if self.max_length is not None and self.max_length < 8:
            problems.append("max_length must be >= 8 or null")
        return problems


# ---------------------------------------------------------------- candidates

class _TransformersAdapter:
    """A TextEncoder (pretrained or random-init) seen through the evaluation's interface."""

    def __init__(self, encoder: TextEncoder, name: str):
        self.encoder, self.name = encoder, name

    def encode(self, captions: Sequence[str]) -> EncodedText:
        """Same result as `encoder.encode`, several times faster on short texts.

        TextEncoder always pads to cfg.max_length, and the network runs on every padded position:
        96 positions for a 12-token caption. Token states of real tokens do not depend on the
        padded length (padding is masked; TextEncoder counts positions from the first real token), so texts
        are encoded in length-sorted batches at the batch's own length, then padded back with
        zeros on the tokenizer's padding side, exactly as the full-length layout has them."""
        captions = list(captions)
        if self.encoder.cfg.backend == "sentence-transformers" and self.encoder.cfg.padding_side == "left":
            return self.encoder.encode(captions)  # its pipeline counts positions from the pad: no shortcut
        full = self.encoder.cfg.max_length
        lengths = [len(ids) for ids in self.encoder.tokenizer(captions, truncation=True, max_length=full)["input_ids"]]
        order = sorted(range(len(captions)), key=lengths.__getitem__)
        tokens = torch.zeros(len(captions), full, self.encoder.dim)
        mask = torch.zeros(len(captions), full, dtype=torch.bool)
        pooled = torch.zeros(len(captions), self.encoder.dim)
        truncated = torch.zeros(len(captions), dtype=torch.bool)
        left = self.encoder.cfg.padding_side == "left"
        for start in range(0, len(order), 64):
            rows = order[start:start + 64]
            length = min(full, -(-max(lengths[i] for i in rows) // 8) * 8)
            part = _with_max_length(self.encoder, length).encode([captions[i] for i in rows])
            cols = slice(full - length, full) if left else slice(0, length)
            tokens[rows, cols], mask[rows, cols] = part.tokens.float(), part.mask
            pooled[rows], truncated[rows] = part.pooled.float(), part.truncated
        return EncodedText(tokens, mask, pooled, truncated)

    def token_offsets(self, captions: Sequence[str]) -> list[list[tuple[int, int] | None]] | None:
        """Character span per token position, in the encoder's own padded layout; None if unknown."""
        tok = self.encoder.tokenizer
        if not getattr(tok, "is_fast", False):
            return None  # slow tokenizers give no offsets: the token-aligned cosine is skipped
        enc = tok(list(captions), padding="max_length", truncation=True, max_length=self.encoder.cfg.max_length,
                  return_offsets_mapping=True, return_special_tokens_mask=True)
        out = []
        for offsets, special, attend in zip(enc["offset_mapping"], enc["special_tokens_mask"], enc["attention_mask"]):
            out.append([tuple(o) if a and not s and o[1] > o[0] else None for o, s, a in zip(offsets, special, attend)])
        return out

    def fingerprint(self) -> dict:
        return self.encoder.fingerprint()


def _with_max_length(encoder: TextEncoder, length: int) -> TextEncoder:
    """The same loaded encoder (shared model and tokenizer) with another token budget."""
    clone = copy.copy(encoder)
    clone.cfg = dataclasses.replace(encoder.cfg, max_length=length)
    return clone


@dataclass
class Candidate:
    name: str
    kind: str  # "candidate" or "baseline"
    encoder: Any  # encode(captions) -> EncodedText, token_offsets(captions), fingerprint()


def build_candidates(cfg: EncoderEvalConfig, device: str = "cpu") -> list[Candidate]:
    out, seen = [], Counter()
    for enc_cfg in cfg.candidates:
        if cfg.max_length is not None:
            enc_cfg = dataclasses.replace(enc_cfg, max_length=cfg.max_length)
        seen[enc_cfg.name] += 1
        name = enc_cfg.name if seen[enc_cfg.name] == 1 else f"{enc_cfg.name}#{seen[enc_cfg.name]}"
        out.append(Candidate(name, "candidate", _TransformersAdapter(TextEncoder(enc_cfg, device), name)))
    first = out[0].encoder.encoder.cfg
    for baseline in cfg.baselines:
        if baseline == "hashed_bow":
            out.append(Candidate("hashed-bow", "baseline", HashedBagOfWords(max_length=first.max_length)))
        else:
            random_cfg = dataclasses.replace(first, backend="transformers")
            encoder = RandomInitEncoder(random_cfg, seed=cfg.random_init_seed, device=device)
            out.append(Candidate(encoder.name, "baseline", _TransformersAdapter(encoder, encoder.name)))
    return out


def _encode(candidate: Candidate, texts: Sequence[str]) -> EncodedText:
    enc = candidate.encoder.encode(list(texts))
    return EncodedText(enc.tokens.float(), enc.mask, enc.pooled.float(), enc.truncated)


# ---------------------------------------------------------------- ground truth for scenes

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


def _scenes(count: int, resolution: int, seed: int):
    cfg = SceneConfig(resolution=resolution, tasks=TASKS, seed=seed)
    return [make_scene(cfg, i) for i in range(count)]


# ---------------------------------------------------------------- discriminability

@dataclass
class RetrievalSet:
    captions: list[str]
    image_of: np.ndarray  # [captions] image index of each caption
    image_similarity: np.ndarray  # [images, images]


def scene_retrieval_set(cfg: DiscriminabilityConfig) -> RetrievalSet:
    scenes = _scenes(cfg.scenes, cfg.resolution, cfg.seed)
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


# ---------------------------------------------------------------- disentanglement

def units(words: list[str], mode: str) -> list[list[int]]:
    """Word indices grouped into the units a deletion removes: words, phrases or sentences."""
    groups: list[list[int]] = []
    for i, word in enumerate(words):
        prev = words[i - 1] if i else ""
        if mode == "word":
            new = True
        elif mode == "phrase":
            new = not i or prev[-1] in ",;:.!?" or word.lower().strip(",;:.!?") in _PHRASE_STARTS
        else:
            new = not i or prev[-1] in ".!?"
        if new:
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


def reduce_prompt(prompt: str, mode: str, ratio: float, rng: np.random.Generator) -> tuple[str, list[int]] | None:
    """Delete round(ratio * units) units (at least one, never all); returns the reduced prompt and
    the full prompt's index of each word it keeps, or None if the prompt has fewer than 2 units."""
    words = prompt.split()
    groups = units(words, mode)
    if len(groups) < 2:
        return None
    drop = min(len(groups) - 1, max(1, round(ratio * len(groups))))
    dropped = set(rng.choice(len(groups), size=drop, replace=False).tolist())
    kept = [i for g, group in enumerate(groups) if g not in dropped for i in group]
    return " ".join(words[i] for i in kept), kept


def word_vectors(tokens: torch.Tensor, offsets: list, text: str) -> dict[int, torch.Tensor]:
    """Mean token state per whitespace word of `text` (words cut off by the token budget are absent)."""
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    starts = [s for s, _ in spans]
    members: dict[int, list[int]] = {}
    for pos, off in enumerate(offsets):
        if off is None:
            continue
        w = bisect.bisect_right(starts, off[0]) - 1
        if w >= 0 and off[0] < spans[w][1]:
            members.setdefault(w, []).append(pos)
    return {w: tokens[pos].mean(0) for w, pos in members.items()}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12))


def _disentanglement_prompts(cfg: DisentanglementConfig) -> tuple[list[str], list[tuple[int, int]]]:
    """The prompts and every pair of unrelated ones (different content)."""
    if cfg.prompt_file:
        with open(cfg.prompt_file) as f:
            prompts = [line.strip() for line in f if line.strip()][: cfg.prompts]
        differ = lambda i, j: prompts[i] != prompts[j]  # noqa: E731
    else:
        scenes = _scenes(cfg.prompts, 32, cfg.seed)
        prompts = [describe(s) for s in scenes]
        facts = [scene_facts(s.objects, s.relation) for s in scenes]
        differ = lambda i, j: scene_similarity(facts[i], facts[j]) < 1  # noqa: E731
    pairs = [(i, j) for i in range(len(prompts)) for j in range(i + 1, len(prompts)) if differ(i, j)]
    if not pairs:
        raise ValueError("disentanglement needs at least 2 prompts with different content")
    return prompts, pairs


def disentanglement(candidate: Candidate, prompts: list[str], pairs: list[tuple[int, int]],
                    cfg: DisentanglementConfig) -> dict[str, Any]:
    reductions = []  # (mode, ratio, prompt index, reduced text, kept word indices)
    for mode in cfg.modes:
        for ratio in cfg.ratios:
            for p, prompt in enumerate(prompts):
                rng = np.random.default_rng([cfg.seed, MODES.index(mode), round(ratio * 1000), p])
                reduced = reduce_prompt(prompt, mode, ratio, rng)
                if reduced is not None:
                    reductions.append((mode, ratio, p, *reduced))
    full = _encode(candidate, prompts)
    red = _encode(candidate, [r[3] for r in reductions])
    full_off = candidate.encoder.token_offsets(prompts)
    red_off = candidate.encoder.token_offsets([r[3] for r in reductions])
    full_words = [word_vectors(full.tokens[i], full_off[i], t) for i, t in enumerate(prompts)] if full_off else None

    cells: dict[tuple[str, float], dict[str, list[float]]] = {}
    for k, (mode, ratio, p, text, kept) in enumerate(reductions):
        cell = cells.setdefault((mode, ratio), {"pooled": [], "token": []})
        cell["pooled"].append(_cos(full.pooled[p], red.pooled[k]))
        if full_words is not None:
            mine = word_vectors(red.tokens[k], red_off[k], text)
            shared = [w for w in mine if kept[w] in full_words[p]]
            if shared:
                a = torch.stack([full_words[p][kept[w]] for w in shared])
                b = torch.stack([mine[w] for w in shared])
                cell["token"].append(float(F.cosine_similarity(a, b, dim=-1, eps=1e-12).mean()))

    # b over every unrelated pair for the pooled vector (cheap); over a fixed sample for tokens.
    emb = F.normalize(full.pooled, dim=-1, eps=1e-12)
    first, second = map(list, zip(*pairs))
    b_pooled = float((emb[first] * emb[second]).sum(-1).mean())
    rng = np.random.default_rng([cfg.seed, 2])
    sample = [pairs[i] for i in rng.permutation(len(pairs))[: cfg.unrelated_pairs]]
    b_token = _unrelated_word_cosine(full_words, prompts, sample) if full_words is not None else None
    return _summarise_disentanglement(cells, b_pooled, b_token)


def _unrelated_word_cosine(words: list[dict], prompts: list[str], pairs) -> float:
    """Mean cosine between different words of unrelated prompts: the token-aligned floor."""
    total, count = 0.0, 0
    for i, j in pairs:
        keys_i, keys_j = list(words[i]), list(words[j])
        if not keys_i or not keys_j:
            continue
        vec_i = F.normalize(torch.stack([words[i][w] for w in keys_i]).float(), dim=-1, eps=1e-12)
        vec_j = F.normalize(torch.stack([words[j][w] for w in keys_j]).float(), dim=-1, eps=1e-12)
        text_i = [prompts[i].split()[w].lower().strip(",;:.!?") for w in keys_i]
        text_j = [prompts[j].split()[w].lower().strip(",;:.!?") for w in keys_j]
        different = torch.tensor([[a != b for b in text_j] for a in text_i])
        total += float((vec_i @ vec_j.T)[different].sum())
        count += int(different.sum())
    return total / max(count, 1)


def corrected(s: float, b: float) -> float:
    """(s - b) / (1 - b): 1 = unchanged, 0 = as similar as unrelated text."""
    return (s - b) / (1 - b) if b < 1 else 0.0


def _summarise_disentanglement(cells, b_pooled: float, b_token: float | None) -> dict[str, Any]:
    breakdown, pooled_all, token_all = {}, [], []
    for (mode, ratio), cell in cells.items():
        pooled = float(np.mean(cell["pooled"]))
        token = float(np.mean(cell["token"])) if cell["token"] else None
        breakdown.setdefault(mode, {})[f"{ratio:g}"] = {
            "pooled": pooled, "pooled_corrected": corrected(pooled, b_pooled), "pairs": len(cell["pooled"]),
            "token": token, "token_corrected": None if token is None or b_token is None else corrected(token, b_token)}
        pooled_all.append(pooled)
        if token is not None:
            token_all.append(token)
    pooled_mean = float(np.mean(pooled_all))
    token_mean = float(np.mean(token_all)) if token_all and b_token is not None else None
    return {"pooled": pooled_mean, "pooled_corrected": corrected(pooled_mean, b_pooled), "baseline_pooled": b_pooled,
            "token": token_mean, "token_corrected": None if token_mean is None else corrected(token_mean, b_token),
            "baseline_token": b_token, "breakdown": breakdown}


# ---------------------------------------------------------------- the evaluation

def evaluate_encoders(cfg: EncoderEvalConfig, device: str = "cpu",
                      candidates: list[Candidate] | None = None) -> dict[str, Any]:
    """Score every candidate and baseline; returns the JSON-ready result with the selection decision."""
    problems = cfg.validate()
    if problems:
        raise ValueError("invalid encoder evaluation config: " + "; ".join(problems))
    candidates = candidates or build_candidates(cfg, device)
    disc = cfg.discriminability
    retrieval = jsonl_retrieval_set(disc) if disc.data else scene_retrieval_set(disc)
    prompts, pairs = _disentanglement_prompts(cfg.disentanglement)
    rows = []
    for cand in candidates:
        started = time.perf_counter()
        pooled = _encode(cand, retrieval.captions).pooled
        rows.append({"name": cand.name, "kind": cand.kind, "fingerprint": cand.encoder.fingerprint(),
                     "discriminability": discriminability(pooled, retrieval),
                     "disentanglement": disentanglement(cand, prompts, pairs, cfg.disentanglement),
                     "seconds": round(time.perf_counter() - started, 2)})
    image_similarity = ("backbone " + disc.image_backbone) if disc.image_backbone else "scene ground truth"
    return {"encoders": rows, "selection": select(rows, cfg.selection),
            "setup": {"captions": len(retrieval.captions), "images": int(retrieval.image_similarity.shape[0]),
                      "image_similarity": image_similarity, "disentanglement_prompts": len(prompts),
                      "unrelated_pairs": len(pairs),
                      "prompt_source": cfg.disentanglement.prompt_file or "scene descriptions",
                      "thresholds": cfg.selection.__dict__.copy()}}


def select(rows: list[dict], cfg: SelectionConfig) -> dict[str, Any]:
    baselines = [r for r in rows if r["kind"] == "baseline"]
    best_disc = max((r["discriminability"]["score"] for r in baselines), default=float("-inf"))
    best_dis = max((r["disentanglement"]["pooled_corrected"] for r in baselines), default=float("-inf"))
    verdicts, passed = {}, []
    for row in rows:
        if row["kind"] != "candidate":
            continue
        disc, dis = row["discriminability"]["score"], row["disentanglement"]["pooled_corrected"]
        reasons = []
        if disc < cfg.min_discriminability:
            reasons.append(f"discriminability {disc:.3f} < {cfg.min_discriminability}")
        if dis < cfg.min_disentanglement:
            reasons.append(f"corrected disentanglement {dis:.3f} < {cfg.min_disentanglement}")
        if cfg.beat_baselines and disc <= best_disc:
            reasons.append(f"discriminability {disc:.3f} does not beat the best baseline's {best_disc:.3f}")
        if cfg.beat_baselines and dis <= best_dis:
            reasons.append(f"corrected disentanglement {dis:.3f} does not beat the best baseline's {best_dis:.3f}")
        verdicts[row["name"]] = {"passed": not reasons, "reasons": reasons}
        if not reasons:
            passed.append(row)
    passed.sort(key=lambda r: (r["discriminability"]["score"], r["disentanglement"]["pooled_corrected"]), reverse=True)
    return {"selected": passed[0]["name"] if passed else None, "verdicts": verdicts}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def encoder_table(result: dict[str, Any]) -> str:
    """The markdown table of an `evaluate_encoders` result, then the decision."""
    lines = ["| encoder | kind | discriminability | R@1 | chance | disent. pooled | corrected | b | "
             "disent. token | corrected | b | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = result["selection"]["verdicts"]
    for row in result["encoders"]:
        d, s = row["discriminability"], row["disentanglement"]
        verdict = ("selected" if row["name"] == result["selection"]["selected"] else
                   "pass" if verdicts.get(row["name"], {}).get("passed") else
                   "fail" if row["kind"] == "candidate" else "reference")
        lines.append(f"| {row['name']} | {row['kind']} | {_fmt(d['score'])} | {_fmt(d['recall_at_1'])} | "
                     f"{_fmt(d['chance'])} | {_fmt(s['pooled'])} | {_fmt(s['pooled_corrected'])} | "
                     f"{_fmt(s['baseline_pooled'])} | {_fmt(s['token'])} | {_fmt(s['token_corrected'])} | "
                     f"{_fmt(s['baseline_token'])} | {verdict} |")
    selected = result["selection"]["selected"]
    lines.append("")
    lines.append(f"Selected: **{selected}**." if selected else "Selected: **none** - no candidate passed.")
    for name, verdict in verdicts.items():
        if verdict["reasons"]:
            lines.append(f"- {name}: " + "; ".join(verdict["reasons"]))
    return "\n".join(lines)
