"""The encoders under evaluation: the configured candidates and the reference baselines, each
behind one interface (encode, token_offsets, fingerprint)."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from emf_dist.eval.baselines import HashedBagOfWords, RandomInitEncoder
from emf_dist.eval.encoder_config import EncoderEvalConfig
from emf_dist.text_encoder import EncodedText, TextEncoder


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


def encode_float32(candidate: Candidate, texts: Sequence[str]) -> EncodedText:
    """The candidate's encoding of ``texts`` with token states and pooled vectors in float32."""
    enc = candidate.encoder.encode(list(texts))
    return EncodedText(enc.tokens.float(), enc.mask, enc.pooled.float(), enc.truncated)
