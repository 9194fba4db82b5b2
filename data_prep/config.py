"""`emf prep` configuration: typed dataclasses, validated before any Ray work starts.

Each stage owns its config next to its code (SourceConfig in sources/config.py, ImageConfig in
images.py, so loader and writer processes never import torch); the job's config is here.

A config file is optional: the defaults shard 10,000 generated scenes into ``emf-data/``
with the packaged all-MiniLM-L6-v2. Everything can be set with dotted overrides::

    emf prep out=s3://bucket/scenes source.count=100000 encoder.max_length=16

Credentials never go in here: object-store endpoints and keys come from the environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ...), which s3fs and
botocore read themselves, so a saved config or manifest cannot leak them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from data_prep.images import ImageConfig
from data_prep.sources import SourceConfig
from emf_dist.text_encoder import TextEncoderConfig

__all__ = ["ImageConfig", "PrepConfig", "RayConfig", "SourceConfig"]


@dataclass
class RayConfig:
    # An existing cluster ("auto", "ray://head:10001"); None starts a private local instance.
    address: str | None = None
    # Local instance only: logical CPUs (None = this machine's core count).
    num_cpus: int | None = None
    # Encoder actors; each loads the text encoder (and VAE) once and keeps it for the whole job.
    encoders: int = 1
    encoder_cpus: float = 1.0
    # GPUs per encoder actor; > 0 runs the encoder and VAE on CUDA.
    encoder_gpus: float = 0.0
    # torch threads per encoder actor; None = encoder_cpus rounded (Ray's own convention).
    # More threads than reserved cores makes a shared CPU much slower, not faster.
    encoder_threads: int | None = None
    # Loader actors (read, check, decode and resize items) and shard-writer tasks.
    loaders: int = 1
    loader_cpus: float = 0.5
    writers: int = 1
    writer_cpus: float = 0.5
    # Forward the workers' stdout/stderr (model-loading chatter) to this terminal.
    worker_logs: bool = False

    def validate(self) -> list[str]:
        problems = []
        for name in ("encoders", "loaders", "writers"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("encoder_cpus", "loader_cpus", "writer_cpus", "encoder_gpus"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if self.encoder_threads is not None and self.encoder_threads < 1:
            problems.append("encoder_threads must be >= 1 (or null)")
        if self.address is None:
            # Actors hold their CPUs for the whole job: if the pool does not fit, Ray Data waits forever.
            cpus = self.num_cpus or os.cpu_count() or 1
            need = self.encoders * self.encoder_cpus + self.loaders * self.loader_cpus + self.writer_cpus
            if need > cpus:
                problems.append(f"the stages need {need:g} CPUs (encoders*encoder_cpus + loaders*loader_cpus "
                                f"+ writer_cpus) but the local Ray instance has {cpus}: lower them or raise num_cpus")
        return problems

    def needs(self) -> dict[str, float]:
        """Resources the actor pools hold for the whole job, plus one writer."""
        return {"CPU": self.encoders * self.encoder_cpus + self.loaders * self.loader_cpus + self.writer_cpus,
                "GPU": self.encoders * self.encoder_gpus}

    def threads(self) -> int:
        return self.encoder_threads or max(1, round(self.encoder_cpus))


@dataclass
class PrepConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    # Destination dataset: a local folder or any fsspec URL (s3://bucket/prefix).
    out: str = "emf-data"
    # Source items per shard; a shard holds fewer when some of its items are skipped.
    samples_per_shard: int = 1000
    encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # Captions per encoder forward pass.
    encode_batch_size: int = 64
    image: ImageConfig = field(default_factory=ImageConfig)
    # Captions longer than this many characters are skipped as "caption_too_long" (captions
    # longer than encoder.max_length tokens are kept, truncated, and counted).
    max_caption_chars: int = 1000
    # Stop at the first bad input with an error naming it, instead of skipping and counting.
    strict: bool = False
    progress: bool = True
    ray: RayConfig = field(default_factory=RayConfig)
    # A second prep into the same dataset waits this long for the first to finish, then refuses.
    lock_wait_s: float = 0.0
    # A prep killed without releasing its lock blocks the next one for at most this long.
    lock_ttl_s: float = 60.0
    # Testing only: once this run has finished N shards, writers die halfway through writing
    # the next, as a killed job would. The run fails; a rerun must finish only the missing shards.
    crash_after_shards: int | None = None

    def validate(self) -> list[str]:
        problems = []
        if not self.out.strip():
            problems.append("out must be a folder or URL")
        if self.samples_per_shard < 1:
            problems.append("samples_per_shard must be >= 1")
        if self.encode_batch_size < 1:
            problems.append("encode_batch_size must be >= 1")
        if self.max_caption_chars < 1:
            problems.append("max_caption_chars must be >= 1")
        if self.encoder.dtype == "bfloat16":
            problems.append("encoder.dtype bfloat16 cannot be stored in .npy files: use float16 or float32")
        if self.source.kind == "scenes" and self.source.scenes.resolution != self.image.resolution:
            problems.append(f"image.resolution {self.image.resolution} != source.scenes.resolution "
                            f"{self.source.scenes.resolution}: resizing generated scenes would blur the exact "
                            "colors their ground truth relies on; set both to the same size")
        if self.lock_wait_s < 0 or self.lock_ttl_s <= 0:
            problems.append(f"lock_wait_s must be >= 0 and lock_ttl_s > 0, got {self.lock_wait_s}, {self.lock_ttl_s}")
        if self.crash_after_shards is not None and self.crash_after_shards < 0:
            problems.append("crash_after_shards must be >= 0")
        return problems
