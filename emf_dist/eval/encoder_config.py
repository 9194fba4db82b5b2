"""What `emf eval encoders` is told: the candidates, the reference baselines, each metric's
data and the selection thresholds (encoders.py runs it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from emf_dist.text_encoder import TextEncoderConfig

BASELINES = ("hashed_bow", "random_init")
MODES = ("word", "phrase", "sentence")


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
    # The thresholds sit between the packaged MiniLM's scores and the baselines' on the default scenes
    # (the encoder tables in docs/benchmarks.md).
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
