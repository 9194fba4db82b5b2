"""EMF's text-encoder selection: discriminability and disentanglement, against reference baselines.

EMF picks the encoder before any fine-tuning because at one step the network cannot refine
a vague condition: the encoding must tell different prompts apart (discriminability.py) and
must change gracefully when parts of a prompt go away (disentanglement.py). Every candidate
and reference baseline (encoder_candidates.py) is scored on both, configured by
encoder_config.py; encoder_table.py prints the result.

Selection: a candidate passes if it reaches both configurable thresholds (discriminability,
corrected pooled disentanglement) and, by default, beats every reference baseline on both;
the passing candidate with the highest discriminability is selected.

The names of the pieces stay importable from here, where callers have always found them.
"""

from __future__ import annotations

import time
from typing import Any

from emf_dist.eval.discriminability import RetrievalSet, discriminability, jsonl_retrieval_set, scene_retrieval_set
from emf_dist.eval.disentanglement import (
    corrected,
    disentanglement,
    disentanglement_prompts,
    reduce_prompt,
    units,
    word_vectors,
)
from emf_dist.eval.encoder_candidates import Candidate, build_candidates, encode_float32
from emf_dist.eval.encoder_config import (
    BASELINES,
    MODES,
    DiscriminabilityConfig,
    DisentanglementConfig,
    EncoderEvalConfig,
    SelectionConfig,
)
from emf_dist.eval.encoder_table import encoder_table
from emf_dist.eval.scene_truth import describe, scene_facts, scene_similarity

__all__ = ["BASELINES", "MODES", "Candidate", "DiscriminabilityConfig", "DisentanglementConfig",
           "EncoderEvalConfig", "RetrievalSet", "SelectionConfig", "build_candidates", "corrected", "describe",
           "discriminability", "disentanglement", "encoder_table", "evaluate_encoders", "jsonl_retrieval_set",
           "reduce_prompt", "scene_facts", "scene_retrieval_set", "scene_similarity", "select", "units",
           "word_vectors"]


def evaluate_encoders(cfg: EncoderEvalConfig, device: str = "cpu",
                      candidates: list[Candidate] | None = None) -> dict[str, Any]:
    """Score every candidate and baseline; returns the JSON-ready result with the selection decision."""
    problems = cfg.validate()
    if problems:
        raise ValueError("invalid encoder evaluation config: " + "; ".join(problems))
    candidates = candidates or build_candidates(cfg, device)
    disc = cfg.discriminability
    retrieval = jsonl_retrieval_set(disc) if disc.data else scene_retrieval_set(disc)
    prompts, pairs = disentanglement_prompts(cfg.disentanglement)
    rows = []
    for cand in candidates:
        started = time.perf_counter()
        pooled = encode_float32(cand, retrieval.captions).pooled
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
