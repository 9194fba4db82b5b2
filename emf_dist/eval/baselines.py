"""Reference encoders that make an encoder ranking meaningful, behind the same interface as real ones.

An encoder's discriminability or disentanglement alone says little: cosines of different
models live on different scales. Two baselines bracket what "good" means:

- `HashedBagOfWords`: no learning at all. Each word is a signed one-hot vector in a hashed
  space (the hashing trick); the pooled vector is the bag of words. It is perfectly
  "disentangled" word by word, but blind to word order and binding ("a red circle and a
  blue square" equals "a blue circle and a red square").
- `RandomInitEncoder`: a candidate's own architecture and tokenizer with freshly initialised
  weights, so what the pretrained weights add is what separates the two.

Both yield `EncodedText` (tokens, mask, pooled, truncated) and per-token character offsets,
the two things the evaluation in encoders.py reads from every candidate.
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

import torch
import torch.nn.functional as F

from emf_dist.text_encoder import EncodedText, TextEncoder, TextEncoderConfig

_WORD = re.compile(r"[A-Za-z0-9]+")


class HashedBagOfWords:
    name = "hashed-bow"

    def __init__(self, dim: int = 1024, max_length: int = 96):
        self.dim, self.max_length = dim, max_length

    def _bucket(self, word: str) -> tuple[int, float]:
        # blake2b, not hash(): Python salts str hashes per process, and results must be reproducible.
        digest = hashlib.blake2b(word.lower().encode(), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        return value % self.dim, 1.0 if (value >> 63) & 1 else -1.0

    def token_offsets(self, captions: Sequence[str]) -> list[list[tuple[int, int] | None]]:
        """Character span of each token position (None for padding): one token per word."""
        out = []
        for caption in captions:
            spans = [m.span() for m in _WORD.finditer(caption)][: self.max_length]
            out.append(spans + [None] * (self.max_length - len(spans)))
        return out

    def encode(self, captions: Sequence[str]) -> EncodedText:
        captions = list(captions)
        tokens = torch.zeros(len(captions), self.max_length, self.dim)
        mask = torch.zeros(len(captions), self.max_length, dtype=torch.bool)
        truncated = torch.zeros(len(captions), dtype=torch.bool)
        for row, caption in enumerate(captions):
            words = _WORD.findall(caption)
            truncated[row] = len(words) > self.max_length
            for pos, word in enumerate(words[: self.max_length]):
                bucket, sign = self._bucket(word)
                tokens[row, pos, bucket] = sign
                mask[row, pos] = True
        pooled = F.normalize(tokens.sum(1), dim=-1)  # the (signed, hashed) bag of words
        return EncodedText(tokens, mask, pooled, truncated)

    def fingerprint(self) -> dict:
        return {"name": self.name, "dim": self.dim, "max_length": self.max_length}


class RandomInitEncoder(TextEncoder):
    """`cfg`'s architecture and tokenizer with seeded random weights; everything else is TextEncoder's,
    so tokenisation, pooling and padding are exactly those of the pretrained candidate."""

    def __init__(self, cfg: TextEncoderConfig, seed: int = 0, device: str | torch.device = "cpu"):
        if cfg.backend != "transformers":
            raise ValueError("a random-init baseline needs backend='transformers' "
                             "(it builds the model from config.json)")
        self.seed = seed
        super().__init__(cfg, device)

    @property
    def name(self) -> str:
        return f"{self.cfg.name}-random-init"

    def _load(self) -> None:  # overrides TextEncoder._load: same classes, no pretrained weights
        import inspect

        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
        with torch.random.fork_rng(devices=[]):  # the weights depend on the seed, the caller's RNG is untouched
            torch.manual_seed(self.seed)
            model = AutoModel.from_config(config)
        self.model = model.get_encoder() if getattr(config, "is_encoder_decoder", False) else model
        self._forward_args = set(inspect.signature(self.model.forward).parameters)
        self.model.to(device=self.device, dtype=torch.float32).eval()

    def fingerprint(self) -> dict:
        fp = super().fingerprint()
        fp["weights_sha256"] = None  # not the folder's weights: say so, so no shard is ever matched to this
        fp["random_init_seed"] = self.seed
        return fp
