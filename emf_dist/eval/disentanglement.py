"""Disentanglement: how gracefully an encoding changes when parts of a prompt go away.

A prompt loses words, phrases or sentences (10%, 30%, 50% of them, fixed seeds). The cosine
between the full and reduced encodings is measured on the pooled vector and token-aligned:
each surviving word's token states (averaged over its tokens) against the same word's in the
full prompt. Raw cosines are not comparable across encoders (an LLM's unrelated prompts can
sit at 0.8), so each is also reported baseline-corrected, (s - b) / (1 - b), with b the mean
cosine of unrelated prompts (pooled) or of different words from unrelated prompts
(token-aligned): 1 = unchanged by the deletion, 0 = as far apart as unrelated text.
"""

from __future__ import annotations

import bisect
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from emf_dist.eval.encoder_candidates import Candidate, encode_float32
from emf_dist.eval.encoder_config import MODES, DisentanglementConfig
from emf_dist.eval.scene_truth import describe, generated_scenes, scene_facts, scene_similarity

# A phrase starts after punctuation or at one of these words: a deterministic stand-in for a parser
# that is good enough to cut "a red circle | to the left | of a blue square".
_PHRASE_STARTS = frozenset("and with that which where while on in at to of near next above below beside "
                           "behind under over together".split())


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


def disentanglement_prompts(cfg: DisentanglementConfig) -> tuple[list[str], list[tuple[int, int]]]:
    """The prompts and every pair of unrelated ones (different content)."""
    if cfg.prompt_file:
        with open(cfg.prompt_file) as f:
            prompts = [line.strip() for line in f if line.strip()][: cfg.prompts]
        differ = lambda i, j: prompts[i] != prompts[j]  # noqa: E731
    else:
        scenes = generated_scenes(cfg.prompts, 32, cfg.seed)
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
    full = encode_float32(candidate, prompts)
    red = encode_float32(candidate, [r[3] for r in reductions])
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
