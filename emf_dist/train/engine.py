"""One DeepSpeed engine per worker, built from the typed TrainConfig.

The model and the loss stay plain PyTorch; this file only wraps them: ZeRO stage, gradient
accumulation, clipping, AdamW and the learning-rate schedule. Weights stay float32 inside
DeepSpeed; on GPU the worker runs the gradient pass under bf16 autocast instead of DeepSpeed's
bf16 mode, so the JVP pass can run in float32 on the same weights without copying the model
(docs/findings.md §12). The optimizer and scheduler are torch objects handed to DeepSpeed, so the same
config runs on CPU (gloo) and GPU (NCCL) without DeepSpeed's CUDA-only fused optimizers.
"""
from __future__ import annotations

import os

import torch.nn as nn

from emf_dist.meanflow import jvp_method
from emf_dist.train.config import TrainConfig
from emf_dist.train.setup import build_optimizer


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    zero = {"stage": cfg.zero.stage, "overlap_comm": cfg.zero.overlap_comm,
            "contiguous_gradients": cfg.zero.contiguous_gradients, "reduce_scatter": cfg.zero.reduce_scatter}
    if cfg.zero.stage == 3:
        # Its custom linear Function has no forward-mode rule; plain F.linear does (docs/findings.md §4).
        zero["memory_efficient_linear"] = False
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": False},  # see the module docstring: bf16 comes from autocast
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _skip_shared_memory_comm_build() -> None:
    """DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce on CPU at start-up that
    only its inference all-reduce uses (training's collectives go through torch.distributed,
    gloo here): a minute of g++ per worker start on a 2-core machine, redone whenever two
    processes' compile flags differ (docs/benchmarks.md). Marking the op incompatible skips it;
    DeepSpeed keeps that probe result in this module-level dict for the process's lifetime."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def build_engine(model: nn.Module, cfg: TrainConfig, world_size: int, on_gpu: bool):
    """deepspeed.initialize over the trainable parameters; torch.distributed must already be up."""
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_shared_memory_comm_build()
    import deepspeed

    params, optimizer, schedule = build_optimizer(model, cfg.optim, cfg.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=schedule, config=deepspeed_config(cfg, world_size),
                                           dist_init_required=False)
    if cfg.zero.stage == 3 and cfg.objective.mode != "flow_matching" \
            and jvp_method(engine.module, cfg.objective) == "forward_ad":
        from emf_dist.train.zero3_forward_ad import enable_forward_ad
        enable_forward_ad(engine.module)
    return engine


def jvp_parameter_scope(cfg: TrainConfig):
    """What the hand-written JVP pass needs to read partitioned parameters: ZeRO-3's gather, else nothing."""
    if cfg.zero.stage == 3:
        from emf_dist.train.zero3_gather import gathered
        return gathered
    return None
