"""The typed config of a distributed training run (`emf train CONFIG [overrides]`).

Everything is checked here, on the driver, before Ray starts a worker: field types (by
emf_dist.config), batch arithmetic, ZeRO options, and (in train.py) the dataset's manifest
against the model and encoder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from emf_dist.backbones.adapter import BackboneConfig
from emf_dist.meanflow import MeanFlowConfig
from emf_dist.model import ModelConfig
from emf_dist.split_distill import SplitDistillConfig
from emf_dist.storage import redact
from emf_dist.text_encoder import TextEncoderConfig
from emf_dist.time_sampling import TimeSamplerConfig


def _at_least(cfg, **bounds: int) -> list[str]:
    """Problems for integer fields below their lower bound (validate() of the sub-configs)."""
    return [f"{name} must be >= {low}, got {getattr(cfg, name)}" for name, low in bounds.items()
            if getattr(cfg, name) < low]


@dataclass
class DataConfig:
    url: str = ""                  # dataset folder holding manifest.json (local path or s3://...)
    samples_per_epoch: int = 0     # 0: the manifest's sample count
    shuffle_buffer: int = 256      # samples held per loader worker for shuffling
    loader_workers: int = 1        # DataLoader processes per training worker (0: in the training process)
    cache_mib: int = 0             # with loader_workers 0: keep decoded shards in memory up to this many MiB
    text_length: int | None = None  # expected L of the token states (None: take the manifest's)

    def validate(self) -> list[str]:
        problems = _at_least(self, samples_per_epoch=0, shuffle_buffer=1, loader_workers=0, cache_mib=0)
        if self.text_length is not None and self.text_length < 1:
            problems.append(f"text_length must be >= 1 (or null), got {self.text_length}")
        return problems


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    decay: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up, towards min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def validate(self) -> list[str]:
        problems = []
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a finite number > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.weight_decay >= 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if not self.grad_clip > 0:
            problems.append(f"grad_clip must be > 0, got {self.grad_clip}")
        return problems

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Linear warm-up, then constant / cosine / linear decay to min_lr_ratio at the last step."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


@dataclass
class ZeroConfig:
    stage: int = 2
    overlap_comm: bool = False
    contiguous_gradients: bool = True  # docs/findings.md §5: False skips the gradient all-reduce under gloo
    reduce_scatter: bool = True


@dataclass
class ScalingOptions:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0

    def validate(self) -> list[str]:
        problems = []
        if not self.cpus_per_worker > 0 or not self.gpus_per_worker >= 0:
            problems.append(f"cpus_per_worker must be > 0 and gpus_per_worker >= 0, got {self.cpus_per_worker}, "
                            f"{self.gpus_per_worker}")
        if self.use_gpu and not self.gpus_per_worker > 0:
            problems.append("use_gpu needs gpus_per_worker > 0")
        return problems


@dataclass
class FaultConfig:
    max_failures: int = 0           # Ray Train restarts of the worker group
    kill_rank: int = -1             # fault injection: this rank's process exits ...
    kill_at_step: int = -1          # ... right after this optimizer step (first attempt only)
    max_bad_steps_in_a_row: int = 5  # NaN/inf losses: skip the step; this many in a row stops the run
    nan_at_micro_batches: tuple[int, ...] = ()  # fault injection: rank 0's loss is NaN at these micro-batch
                                                # attempts (counted from 0 over the whole run, retries included)

    def validate(self) -> list[str]:
        return _at_least(self, max_failures=0, max_bad_steps_in_a_row=1)


@dataclass
class LoggingConfig:
    every: int = 10                 # optimizer steps between metric reports
    sample_every: int = 0           # steps between 1-step sample grids (0: never)
    sample_prompts: tuple[str, ...] = ("a red circle", "a blue square", "a green triangle", "a yellow circle")
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online iff WANDB_API_KEY is set
    wandb_project: str = "emf-dist"

    def validate(self) -> list[str]:
        return _at_least(self, every=1, sample_every=0)


@dataclass
class TrainConfig:
    name: str = "emf-run"           # run name: resuming uses the same name (and the same wandb run)
    storage_path: str = "~/emf_runs"  # local folder or s3://bucket/prefix for checkpoints and results
    # meanflow_finetune: a flow-matching export (init_from) converted to MeanFlow (model.time_embedding:
    # EMF's dual embedding, or the decoupled one, emf_dist/convert.py); meanflow_distill: a
    # MeanFlow export (init_from) whose 1-step query learns its own k-step samples (emf_dist/split_distill.py)
    mode: Literal["flow_matching", "meanflow", "meanflow_finetune", "meanflow_distill"] = "meanflow"
    # meanflow_finetune / meanflow_distill: an exported model folder (meanflow_distill: our DiT's or a
    # fine-tuned backbone's); meanflow_finetune and flow_matching (continued pretraining) also take a
    # diffusers SANA / SD3 pipeline or transformer folder, local or s3://... (emf_dist/train/pretrained.py),
    # whose backbone then becomes `model`
    init_from: str = ""
    emf_freeze: bool = True         # meanflow_finetune: train only what EMF trains (blocks, time embeddings,
                                    # final modulation); false trains every parameter
    steps: int = 100                # optimizer steps for the whole run (sets the progress and lr schedules)
    stop_after: int = 0             # end this invocation early after this step (checkpointed); rerun to go on
    micro_batch: int = 8            # samples per worker per forward
    grad_accum: int = 1
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    ema_decay: float = 0.999
    # Our DiT, or (resolved from a diffusers init_from by the driver) the pretrained backbone; set only
    # model.checkpointing for the latter
    model: ModelConfig | BackboneConfig = field(default_factory=lambda: ModelConfig(input_size=32, patch_size=4, width=128, depth=4,
                                                                   heads=4, text_dim=384, time_scale=1.0,
                                                                   checkpointing=True))
    objective: MeanFlowConfig = field(default_factory=lambda: MeanFlowConfig(time=TimeSamplerConfig.emf()))
    distill: SplitDistillConfig = field(default_factory=SplitDistillConfig)  # mode meanflow_distill's objective
    encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # must match the shards' fingerprint
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    scaling: ScalingOptions = field(default_factory=ScalingOptions)
    faults: FaultConfig = field(default_factory=FaultConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        # The objective's mode follows the run's: flow matching trains at r = t only, every other mode
        # is MeanFlow. Said once, in ``mode``.
        self.objective.mode = "flow_matching" if self.mode == "flow_matching" else "meanflow"

    @property
    def starts_from_export(self) -> bool:
        return self.mode in ("meanflow_finetune", "meanflow_distill")

    @property
    def round_steps(self) -> int:
        """Optimizer steps per distillation round (the whole run when it is one round)."""
        return self.steps // self.distill.rounds

    def distill_round(self, index: int) -> TrainConfig:
        """Round ``index`` (from 0) of a multi-round distillation as the one-round run it equals: its
        steps, its own seed (noise draws and data order), its own warm-up and decay, and its objective
        (SplitDistillConfig.round: the teacher guided in the first round only)."""
        return replace(self, seed=self.seed + index, steps=self.round_steps, stop_after=0,
                       distill=self.distill.round(index))

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * max(1, self.scaling.num_workers)

    def validate(self) -> list[str]:
        problems = []
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must lie in [0, 1) (the EMA keeps this share of its value each step), "
                            f"got {self.ema_decay}")
        if not self.name.strip() or "/" in self.name:
            problems.append(f"name must be a non-empty folder name without '/', got {self.name!r}")
        if not self.data.url:
            problems.append("data.url is required: the folder `emf prep` wrote (it holds manifest.json)")
        if self.steps < 1 or self.micro_batch < 1 or self.grad_accum < 1:
            problems.append(f"steps, micro_batch and grad_accum must be >= 1, got {self.steps}, "
                            f"{self.micro_batch}, {self.grad_accum}")
        if self.zero.stage not in (0, 1, 2, 3):
            problems.append(f"zero.stage must be 0, 1, 2 or 3, got {self.zero.stage}")
        if self.zero.stage == 3 and self.objective.jvp == "fused":
            problems.append("objective.jvp: fused reads whole weights inside the gradient pass, and ZeRO-3 partitions "
                            "them: use auto (the two-pass step under ZeRO-3) or explicit")
        if self.zero.stage == 3 and self.objective.identity == "lagrangian":
            problems.append("objective.identity: lagrangian takes du/dr by forward-mode AD through the module and is "
                            "not wired to ZeRO-3's partitioned weights: use ZeRO-0, 1 or 2, or identity: eulerian")
        if self.scaling.num_workers < 1:
            problems.append("scaling.num_workers must be >= 1")
        if self.starts_from_export and not self.init_from:
            wanted = "a flow-matching" if self.mode == "meanflow_finetune" else "a MeanFlow"
            problems.append(f"mode {self.mode} needs init_from: {wanted} model's export folder")
        if redact(self.init_from) != self.init_from:
            problems.append(f"init_from {redact(self.init_from)} carries credentials in its URL; take them out and "
                            "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or an instance role) in the environment")
        if self.mode == "meanflow" and self.init_from:
            problems.append("init_from is used by modes meanflow_finetune, meanflow_distill and (a diffusers "
                            "folder) flow_matching; mode meanflow trains from scratch")
        if (self.mode == "meanflow_finetune" and isinstance(self.model, ModelConfig)
                and self.model.time_embedding == "single"):
            problems.append("mode meanflow_finetune converts a flow-matching model to MeanFlow: model.time_embedding "
                            "is the conversion, dual (EMF's, the default) or decoupled (with model.decoder_depth)")
        if self.objective.velocity == "teacher" and self.mode != "meanflow_finetune":
            problems.append("objective.velocity: teacher takes the fine-tuning parent as the teacher: it needs "
                            f"mode meanflow_finetune and init_from (mode is {self.mode})")
        if self.distill.rounds > 1 and (self.mode != "meanflow_distill" or self.steps % self.distill.rounds):
            problems.append(f"distill.rounds {self.distill.rounds} splits a meanflow_distill run's steps evenly: "
                            f"it needs mode meanflow_distill (got {self.mode}) and steps divisible by it "
                            f"(got {self.steps})")
        if self.distill.adversarial and (self.mode != "meanflow_distill" or not isinstance(self.model, ModelConfig)):
            problems.append("distill.adversarial trains a critic on our DiT's 1-step samples: it needs mode "
                            f"meanflow_distill with an export of our DiT (mode is {self.mode})")
        if self.stop_after < 0 or self.stop_after > self.steps:
            problems.append(f"stop_after must lie in [0, steps={self.steps}], got {self.stop_after}")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            problems.append("checkpoint_every and keep_checkpoints must be >= 1")
        if self.data.cache_mib < 0 or (self.data.cache_mib and self.data.loader_workers):
            problems.append("data.cache_mib must be >= 0, and is only used with data.loader_workers: 0 (decoding "
                            f"in the training process); got cache_mib {self.data.cache_mib}, loader_workers "
                            f"{self.data.loader_workers}")
        if self.data.samples_per_epoch and self.data.samples_per_epoch < self.micro_batch * self.grad_accum:
            problems.append(f"data.samples_per_epoch {self.data.samples_per_epoch} is smaller than one worker's "
                            f"optimizer-step batch ({self.micro_batch} x {self.grad_accum})")
        if self.faults.kill_rank >= self.scaling.num_workers:
            problems.append(f"faults.kill_rank {self.faults.kill_rank} >= scaling.num_workers "
                            f"{self.scaling.num_workers}")
        if self.faults.kill_rank >= 0 and self.faults.max_failures < 1:
            problems.append("fault injection (faults.kill_rank) needs faults.max_failures >= 1 to recover")
        return problems
