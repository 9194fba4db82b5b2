"""What every training loop builds from a TrainConfig: the model, the frozen teacher, the objective,
the optimizer and its learning-rate schedule.

The single-process loop (local.py) and the Ray/DeepSpeed worker (worker.py) both call these, so
the two differ only in how gradients are averaged and where batches come from
(tests/test_train_distributed.py holds them equal).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from emf_dist import storage
from emf_dist.backbones.adapter import BackboneConfig
from emf_dist.critic import SceneCritic
from emf_dist.manifest import read_manifest
from emf_dist.meanflow import MeanFlowLoss
from emf_dist.model import VelocityNet
from emf_dist.model_jvp import ParameterScope
from emf_dist.split_distill import SplitDistillLoss
from emf_dist.train.config import OptimConfig, TrainConfig
from emf_dist.train.shard_loader import BatchIterator, stream_spec


def build_model(cfg: TrainConfig, parent: VelocityNet | None) -> VelocityNet:
    """From scratch (seeded alike on every rank), the conversion of the exported FM parent (EMF's or the
    decoupled one, as ``model.time_embedding`` says), or (distillation)
    a copy of the exported MeanFlow model, every parameter trainable; a pretrained diffusers backbone as
    emf_dist/train/pretrained.py builds it."""
    torch.manual_seed(cfg.seed)
    if isinstance(cfg.model, BackboneConfig):
        from emf_dist.train.pretrained import build_backbone_model
        return build_backbone_model(cfg, parent)
    if cfg.mode == "meanflow_distill":
        model = VelocityNet(cfg.model)
        model.load_state_dict(parent.state_dict())
        return model
    if cfg.mode != "meanflow_finetune":
        return VelocityNet(cfg.model)
    from emf_dist.convert import freeze_for_emf_finetune, meanflow_from_flow_matching
    model = meanflow_from_flow_matching(parent.cfg, parent.state_dict(), cfg.model.time_embedding, cfg.model.decoder_depth)
    model.cfg.checkpointing = cfg.model.checkpointing
    if cfg.emf_freeze:
        freeze_for_emf_finetune(model)
    return model


def build_teacher(cfg: TrainConfig, parent: VelocityNet | None, device) -> VelocityNet | None:
    """The frozen parent that supplies v under ``objective.velocity: teacher``, or distillation's k-step
    samples (no optimizer, no ZeRO: it is only ever run forward, in every rank, so each keeps a full copy)."""
    if cfg.mode != "meanflow_distill" and cfg.objective.velocity != "teacher":
        return None
    return parent.to(device).eval().requires_grad_(False)


def build_critic(cfg: TrainConfig, teacher: VelocityNet | None, device="cpu") -> SceneCritic | None:
    """Adversarial distillation's critic (distill.adversarial > 0), shaped after the teacher's input and
    text, seeded alike on every rank; None otherwise. It lives for the whole run, across rounds."""
    if cfg.mode != "meanflow_distill" or not cfg.distill.adversarial:
        return None
    torch.manual_seed(cfg.seed + 1)  # not the student's seed: the two start independent
    model = teacher.cfg
    return SceneCritic(model.in_channels, model.input_size, model.text_dim, cfg.distill.critic_width).to(device)


def build_critic_optimizer(critic: SceneCritic, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam without momentum, the usual choice for a GAN's discriminator; fresh each round, as the student's."""
    return torch.optim.Adam(critic.parameters(), lr=cfg.distill.critic_lr, betas=(0.0, 0.99))


def step_critic(critic: SceneCritic, optimizer: torch.optim.Optimizer) -> None:
    """The critic's optimizer step from its (rank-averaged) gradient, then its spectral-norm estimate's
    one power-iteration step, which must follow every weight update."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    critic.refine_spectral_norms()


def build_objective(cfg: TrainConfig, teacher: VelocityNet | None, parameters_of: ParameterScope | None = None,
                    critic: SceneCritic | None = None) -> MeanFlowLoss | SplitDistillLoss:
    """``parameters_of``: how the JVP pass reaches partitioned parameters (the engine's, under ZeRO-3);
    ``critic``: build_critic's, for adversarial distillation."""
    if cfg.mode == "meanflow_distill":
        return SplitDistillLoss(cfg.distill, teacher, critic)
    return MeanFlowLoss(cfg.objective, teacher=teacher, parameters_of=parameters_of)


def build_optimizer(model: nn.Module, optim: OptimConfig, total_steps: int):
    """AdamW over the trainable parameters and the warm-up + decay schedule (stepped once per optimizer step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: optim.lr_factor(step, total_steps))
    return params, optimizer, schedule


def objective_generator(cfg: TrainConfig, rank: int, device="cpu") -> torch.Generator:
    """The RNG of the objective's (t, r), noise and text dropout draws on one rank."""
    return torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)


def build_batches(cfg: TrainConfig, rank: int, world: int, epoch: int = 0, taken: int = 0) -> BatchIterator:
    """One rank's endless batch stream over the dataset's shards, from a resumable position."""
    options = storage.storage_options(cfg.data.url)
    manifest = read_manifest(cfg.data.url, options)
    spec = stream_spec(manifest, cfg.data.url, micro_batch=cfg.micro_batch, world_size=world, rank=rank,
                       samples_per_epoch=cfg.data.samples_per_epoch, shuffle_buffer=cfg.data.shuffle_buffer,
                       seed=cfg.seed, storage_options=options)
    return BatchIterator(spec, cfg.data.loader_workers, epoch=epoch, taken=taken, cache_mib=cfg.data.cache_mib)
