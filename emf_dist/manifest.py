"""The shard dataset contract between data prep (writer) and training (reader).

A prepared dataset is a folder (local path or any fsspec URL) holding WebDataset tars
named ``NNNNNN.tar`` and a ``manifest.json`` written last. Every sample in a tar has a
dot-free key and these members (the part after the key's first dot is the extension):

    <key>.png          RGB uint8 image, square, ``image.resolution`` px     (image.kind == "png")
    <key>.rgb.npy      the same as a raw uint8 array [H, W, 3]               (image.kind == "uint8")
    <key>.latent.npy   VAE latent [C, h, w] float16, (mean - image.shift_factor) * image.scale_factor
                       (image.kind == "latent")
    <key>.txt          the caption, UTF-8
    <key>.json         metadata: the source's fields (for generated scenes: task, objects)
    <key>.tokens.npy   token states [L, D] float16 (zeros where the mask is False)
    <key>.mask.npy     padding mask [L] bool, True = real token
    <key>.pooled.npy   pooled text vector [D] float16

``.npy`` members are plain numpy arrays (no object dtype), so they load with
``allow_pickle=False``. Each append writes new shards and the next manifest version; older
versions stay readable as ``manifests/vNNNNNN.json`` (scheduled retraining compares them).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

from emf_dist.errors import InputError

FORMAT = "emf-shards"
MANIFEST_NAME = "manifest.json"
IMAGE_MEMBERS = {"png": "png", "uint8": "rgb.npy", "latent": "latent.npy"}
TEXT_MEMBERS = ("tokens.npy", "mask.npy", "pooled.npy")


@dataclass
class ShardEntry:
    name: str           # "000012.tar", relative to the dataset folder
    samples: int
    bytes: int
    sha256: str
    version: int = 1    # the manifest version that added this shard


@dataclass
class ImageSpec:
    kind: str = "png"                  # one of IMAGE_MEMBERS
    resolution: int = 32               # pixel side length of the (cropped) images
    shape: list[int] = field(default_factory=list)  # stored array shape: [3, H, W] for pixels, [C, h, w] latents
    scale_factor: float | None = None  # VAE latent scale (latents only)
    vae: str | None = None             # where the VAE came from (latents only)
    vae_sha256: str | None = None      # hash of the VAE weights (latents only): appends must use the same VAE
    shift_factor: float | None = None  # subtracted before scaling (latents only; SD3/FLUX VAEs)
    vae_class: str | None = None       # the diffusers autoencoder class (latents only)

    def vae_info(self):
        """The VAE these latents need, as emf_dist.vae.VaeInfo (latents only)."""
        from emf_dist.vae import VaeInfo
        return VaeInfo(source=self.vae or "", class_name=self.vae_class or "AutoencoderKL",
                       sha256=self.vae_sha256 or "", scaling_factor=self.scale_factor or 1.0,
                       shift_factor=self.shift_factor)


@dataclass
class Manifest:
    version: int
    shards: list[ShardEntry]
    encoder: dict[str, Any]            # TextEncoder.fingerprint()
    image: ImageSpec
    text_shapes: dict[str, list[int]]  # {"tokens": [L, D], "mask": [L], "pooled": [D]}
    source: dict[str, Any]             # what was read: kind, location, options
    skipped: dict[str, int] = field(default_factory=dict)  # bad inputs by reason, over all versions
    truncated: int = 0                 # captions longer than L tokens, over all versions
    created: str = ""                  # ISO time of this version
    format: str = FORMAT
    # numpy dtype names of the stored arrays: {"tokens", "mask", "pooled", "image"}
    dtypes: dict[str, str] = field(default_factory=dict)

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> str:
        data = asdict(self)
        data["total_samples"] = self.total_samples
        data["total_bytes"] = self.total_bytes
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"{where} is not an emf-dist shard manifest (format={data.get('format')!r}, "
                             f"expected {FORMAT!r})")
        totals = {"total_samples": data.pop("total_samples", None), "total_bytes": data.pop("total_bytes", None)}
        data["shards"] = [ShardEntry(**s) for s in data["shards"]]
        data["image"] = ImageSpec(**data["image"])
        manifest = cls(**data)
        manifest.check_consistent(where, **totals)
        return manifest

    def check_consistent(self, where: str, total_samples: int | None = None, total_bytes: int | None = None) -> None:
        """Refuse a manifest that cannot be right: a shard listed twice (two writers raced), negative
        counts, or totals that disagree with its shard list. Training on it would see every such
        sample twice, or fewer than promised, without a word."""
        problems = []
        names = [s.name for s in self.shards]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            problems.append(f"{len(twice)} shards are listed more than once ({', '.join(twice[:3])})")
        if any(s.samples < 1 or s.bytes < 1 for s in self.shards):
            problems.append("a shard has no samples or no bytes")
        if total_samples is not None and total_samples != self.total_samples:
            problems.append(f"total_samples is {total_samples} but its shards hold {self.total_samples}")
        if total_bytes is not None and total_bytes != self.total_bytes:
            problems.append(f"total_bytes is {total_bytes} but its shards hold {self.total_bytes}")
        if problems:
            raise InputError(f"{where} is inconsistent: {'; '.join(problems)}. Prepare the dataset again into a "
                             "new folder (two preps may have written it at the same time)")

    def shard_urls(self, dataset_url: str) -> list[str]:
        base = dataset_url.rstrip("/")
        return [f"{base}/{s.name}" for s in self.shards]


def read_manifest(dataset_url: str, storage_options: dict | None = None) -> Manifest:
    """The latest manifest of the dataset at ``dataset_url``; a clear error when there is none."""
    url = f"{dataset_url.rstrip('/')}/{MANIFEST_NAME}"
    try:
        with fsspec.open(url, "r", **(storage_options or {})) as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST_NAME} under {dataset_url}: run `emf prep` to create the "
                                "dataset, or wait for a running prep job to finish (the manifest is written last)"
                                ) from None
    return Manifest.from_json(text, where=url)


def check_shard_files(manifest: Manifest, dataset_url: str, storage_options: dict | None = None) -> None:
    """Every listed shard is present with its recorded size (one listing of the folder): a shard
    truncated or replaced by a copy would otherwise train as fewer samples, counted only as skips."""
    fs, root = fsspec.core.url_to_fs(dataset_url, **(storage_options or {}))
    try:
        sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size") for e in fs.ls(root, detail=True)}
    except FileNotFoundError:
        sizes = {}
    wrong = [(s.name, s.bytes, sizes.get(s.name)) for s in manifest.shards if sizes.get(s.name) != s.bytes]
    if wrong:
        shown = "; ".join(f"{n}: {'missing' if have is None else f'{have} bytes'}, manifest says {want}"
                          for n, want, have in wrong[:3])
        raise InputError(f"{len(wrong)} of {len(manifest.shards)} shards under {dataset_url} do not match the "
                         f"manifest ({shown}): copy the dataset again, or prepare it again")


def check_compatible(manifest: Manifest, *, text_dim: int, text_length: int | None, in_channels: int,
                     input_size: int, where: str, pooled_dim: int | None = None) -> None:
    """Raise ValueError naming both sides when shards cannot feed a model of this shape
    (``pooled_dim`` None: the pooled vector is not checked)."""
    problems = []
    tokens = manifest.text_shapes.get("tokens", [])
    if len(tokens) != 2 or tokens[1] != text_dim:
        problems.append(f"token states are {tokens} but the model's text_dim is {text_dim}")
    pooled = manifest.text_shapes.get("pooled", [])
    if pooled_dim is not None and pooled != [pooled_dim]:
        problems.append(f"pooled vectors are {pooled} but the model takes [{pooled_dim}]")
    if text_length is not None and tokens and tokens[0] != text_length:
        problems.append(f"token length is {tokens[0]} but the config asks for {text_length}")
    shape = manifest.image.shape
    if len(shape) != 3 or shape[0] != in_channels or shape[1] != input_size:
        problems.append(f"images/latents are {shape} but the model takes [{in_channels}, {input_size}, {input_size}]")
    if problems:
        raise ValueError(f"the dataset at {where} does not fit this model: " + "; ".join(problems))
