"""The per-worker training loop that Ray Train runs on every rank.

    model (plain PyTorch) -> DeepSpeed engine -> MeanFlow step from emf_dist.meanflow (or the
    one-step distillation step from emf_dist.split_distill), unchanged:
    the JVP pass runs on engine.module (forward-mode AD does not run through the engine), the
    gradient pass through the engine, which reduces gradients across ranks (docs/findings.md §11).

Checkpoints hold everything a bit-exact continuation needs (engine, EMA, the sampling RNG,
the data position), and every rank reports the same number of times (ray.train.report is a
barrier). A loss that is NaN/inf on any rank is skipped on all ranks (they agree through an
all-reduce); too many in a row stop the run before the next checkpoint could store damage.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time

import torch
import torch.distributed as dist

from emf_dist import storage
from emf_dist.config import from_dict
from emf_dist.ema import EMA
from emf_dist.model import VelocityNet
from emf_dist.train.checkpoint import (
    load_checkpoint,
    load_critic,
    load_teacher,
    save_checkpoint,
    save_critic,
    save_teacher,
    saved_step,
)
from emf_dist.train.config import TrainConfig
from emf_dist.train.engine import build_engine, jvp_parameter_scope
from emf_dist.train.faults import fault_injector
from emf_dist.train.run_logger import RunLogger
from emf_dist.train.setup import (
    build_batches,
    build_critic,
    build_critic_optimizer,
    build_model,
    build_objective,
    build_teacher,
    objective_generator,
    step_critic,
)
from emf_dist.train.train_state import DataPosition, TrainState


class TooManyBadSteps(RuntimeError):
    pass


def load_parent(cfg: TrainConfig) -> VelocityNet:
    """The export a run starts from (cfg.init_from, a local folder or s3:// URL): meanflow_finetune's
    flow-matching parent, meanflow_distill's MeanFlow model, or a pretrained diffusers transformer."""
    from emf_dist.train.pretrained import load_backbone_parent, parent_is_diffusers_folder
    if parent_is_diffusers_folder(cfg):
        return load_backbone_parent(cfg)
    from emf_dist.export import load_model  # our DiT's export, or a backbone's (meanflow_distill)
    with storage.local_folder(cfg.init_from) as folder:
        parent, _ = load_model(folder)
    return parent


def _gathered(engine):
    """Full parameters for a moment: ZeRO-3 holds only a shard of each on every rank."""
    if engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def _any_rank(flag: bool, device) -> bool:
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _average_over_ranks(module: torch.nn.Module) -> None:
    """A replicated module's gradients averaged over the ranks in one all-reduce (what DDP does)."""
    params = list(module.parameters())
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for param, grad in zip(params, flat.split([p.numel() for p in params])):
        param.grad = grad.view_as(param)


def _mean_over_ranks(values: list[float], device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


class Trainer:
    """One rank's state; ``run`` trains until cfg.steps optimizer steps are done.

    A multi-round distillation (cfg.distill.rounds) builds a fresh student, EMA, engine, objective
    RNG and batch stream for every round, from the round before's EMA weights, which also become the
    frozen teacher: each round is the run its one-round config (cfg.distill_round) would make."""

    def __init__(self, cfg: TrainConfig, sample_text: dict | None):
        import ray.train
        self.cfg = cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        os.environ.setdefault("LOCAL_RANK", str(ctx.get_local_rank()))
        self.on_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
        self.device = ray.train.torch.get_device() if self.on_gpu else torch.device("cpu")
        # The init_from export; in distillation also the teacher, whose weights each new round replaces.
        self.parent = load_parent(cfg) if cfg.init_from else None
        # Adversarial distillation's critic: small, replicated on every rank, kept across rounds.
        self.critic = build_critic(cfg, self.parent, self.device)
        self.grad_norm = 0.0  # of the last optimizer step; ZeRO-0 only (stages >= 1 keep their own)
        self.faults = fault_injector(cfg, self.rank)  # None in an ordinary run
        self.state = TrainState()
        checkpoint = ray.train.get_checkpoint()
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as folder:
            self._start_round(self._round_of(saved_step(folder, self.rank)) if folder else 0, folder)
            if folder:
                self.state = load_checkpoint(folder, self.engine, self.ema, self.rank, self.generator)
                if self.critic is not None:
                    load_critic(folder, self.critic, self.critic_optimizer)
                if self.rank == 0:
                    print(f"resumed from step {self.state.step}", flush=True)
        self._open_batches()
        self.logger = RunLogger(cfg, self.rank, sample_text, resumed_at=self.state.step)

    def _round_cfg(self) -> TrainConfig:
        return self.cfg.distill_round(self.round) if self.cfg.distill.rounds > 1 else self.cfg

    def _round_of(self, step: int) -> int:
        """The round whose steps end at ``step`` (a checkpoint at a round's last step is that round's)."""
        return max(0, step - 1) // self.cfg.round_steps

    def _start_round(self, index: int, checkpoint: str | None = None) -> None:
        """Build the round's student, EMA, engine, objective and RNG. A later round starts from the
        teacher's weights: the round before's EMA, or, resuming inside it, the checkpoint's copy."""
        self.round = index
        cfg = self._round_cfg()
        if index and checkpoint:
            load_teacher(checkpoint, self.parent)
        self.engine = None  # the last round's ZeRO buffers go before the next round's are made
        model = build_model(cfg, self.parent).to(self.device)
        # On the device (an update per step reads every weight) and before ZeRO-3 partitions them.
        self.ema = EMA(model, cfg.ema_decay)
        self.engine = build_engine(model, cfg, self.world, self.on_gpu)
        self.engine.train()
        self.objective = build_objective(cfg, build_teacher(cfg, self.parent, self.device), jvp_parameter_scope(cfg),
                                         self.critic)
        self.critic_optimizer = build_critic_optimizer(self.critic, cfg) if self.critic is not None else None
        self.generator = objective_generator(cfg, self.rank, self.device)

    def _open_batches(self) -> None:
        """The round's batch stream from the state's position (each round reads in its own order)."""
        self.batches = build_batches(self._round_cfg(), self.rank, self.world, epoch=self.state.data.epoch,
                                     taken=self.state.data.taken)
        self.batches.skipped = self.state.skipped_samples

    def _next_round(self) -> None:
        """The round that ended hands its EMA weights on, as the next round's start and teacher."""
        self.state.skipped_samples = self.batches.skipped  # counted over the run, across rounds
        self.state.data = DataPosition()
        self.ema.copy_to(self.parent)
        self._start_round(self.round + 1)
        self._open_batches()
        if self.rank == 0:
            print(f"distillation round {self.round + 1}/{self.cfg.distill.rounds} from step {self.state.step}",
                  flush=True)

    def _micro_step(self, progress: float) -> tuple[float, float, float] | None:
        """Forward + backward of one micro-batch; None (and no backward) if any rank's loss is bad."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in next(self.batches).items()}
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.on_gpu)
        with autocast:
            loss, stats = self.objective(self.engine, batch["image"], batch["tokens"], batch["mask"],
                                         batch["pooled"], progress, net=self.engine.module, generator=self.generator)
        injected = self.faults is not None and self.faults.poisons(self.state.attempts)
        self.state.attempts += 1
        bad_here = injected or not bool(torch.isfinite(loss.detach()))
        if _any_rank(bad_here, self.device):
            return None
        self.engine.backward(loss)
        if self.engine.zero_optimization_stage() == 0 and self.engine.is_gradient_accumulation_boundary() \
                and self._reports_at(self.state.step + 1):
            # DeepSpeed records the global norm only in its ZeRO optimizers; here the gradients are
            # already all-reduced, and engine.step() is about to clip and zero them. Only the
            # steps whose metrics are reported need it.
            self.grad_norm = float(torch.nn.utils.get_total_norm(
                [p.grad for p in self.engine.module.parameters() if p.grad is not None]))
        self.engine.step()
        critic = float(stats["critic"]) if "critic" in stats else 0.0  # part of the loss, reported on its own
        return float(loss.detach()) - critic, stats["jvp_seconds"], critic

    def _optimizer_step(self) -> tuple[float, float, float]:
        """grad_accum good micro-batches (bad ones are replaced); returns (loss, JVP seconds, critic loss)."""
        losses, jvp, critic, bad_in_a_row = [], 0.0, 0.0, 0
        while len(losses) < self.cfg.grad_accum:
            result = self._micro_step(self._progress())
            if result is None:
                self.state.bad_steps += 1
                bad_in_a_row += 1
                if bad_in_a_row >= self.cfg.faults.max_bad_steps_in_a_row:
                    raise TooManyBadSteps(
                        f"{bad_in_a_row} non-finite losses in a row at step {self.state.step}: stopping. "
                        f"The last good checkpoint is intact; lower optim.lr or check the data, then rerun "
                        f"with the same name to resume from it.")
                continue
            bad_in_a_row = 0
            losses.append(result[0])
            jvp += result[1]
            critic += result[2] / self.cfg.grad_accum
        if self.critic is not None:  # the engine stepped the student; the critic's gradient is ours to reduce
            _average_over_ranks(self.critic)
            step_critic(self.critic, self.critic_optimizer)
        with _gathered(self.engine):
            self.ema.update(self.engine.module)
        self.state.step += 1
        return sum(losses) / len(losses), jvp, critic

    def _progress(self) -> float:
        """Of the round (the run, when it is one round): what the objective's schedules follow."""
        return (self.state.step - self.round * self.cfg.round_steps) / self.cfg.round_steps

    def _checkpoint(self, metrics: dict) -> None:
        import ray.train

        from emf_dist.config import to_dict
        self.state.data = DataPosition(**self.batches.position())
        self.state.skipped_samples = self.batches.skipped
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(folder, self.engine, self.ema, self.rank, self.state, self.generator,
                            config=to_dict(self.cfg))
            if self.round and self.rank == 0:  # a later round's teacher is no export: keep it for a resume
                save_teacher(folder, self.parent)
            if self.critic is not None and self.rank == 0:  # every rank holds the same critic
                save_critic(folder, self.critic, self.critic_optimizer)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"step_{self.state.step:08d}")

    def run(self) -> None:
        import ray.train
        cfg, window = self.cfg, {"loss": 0.0, "jvp": 0.0, "critic": 0.0, "seconds": 0.0, "steps": 0}
        while self.state.step < self._last_step():
            if self.state.step == (self.round + 1) * cfg.round_steps:
                self._next_round()
            start = time.perf_counter()
            loss, jvp, critic = self._optimizer_step()
            window["loss"] += loss
            window["jvp"] += jvp
            window["critic"] += critic
            window["seconds"] += time.perf_counter() - start
            window["steps"] += 1
            step = self.state.step
            if self.faults is not None:
                self.faults.after_step(step)
            if not self._reports_at(step):
                continue
            due_checkpoint = step % cfg.checkpoint_every == 0 or step == self._last_step()
            metrics = self._metrics(window)
            window = dict.fromkeys(window, 0.0)
            if cfg.logging.sample_every and step % cfg.logging.sample_every == 0:
                with _gathered(self.engine):
                    self.logger.sample_grid(self.engine.module, step)
            self.logger.log(metrics)
            if due_checkpoint:
                self.logger.write_curve()
                metrics["rank_param_spread"] = self._check_ranks_agree()
                self._checkpoint(metrics)
            else:
                ray.train.report(metrics)
        self.logger.finish()

    def _check_ranks_agree(self) -> float:
        """All ranks must hold the same weights (docs/findings.md §5: some gloo paths silently skip the
        all-reduce). Compares a float64 fingerprint of the parameters across ranks; raises on a split."""
        with _gathered(self.engine):
            fingerprint = torch.stack([
                torch.stack([p.detach().double().sum(), (p.detach().double() * (1 + torch.arange(
                    p.numel(), device=p.device, dtype=torch.float64).view(p.shape) % 7)).sum()])
                for p in self.engine.module.parameters()]).flatten()
        gathered = [torch.empty_like(fingerprint) for _ in range(self.world)]
        dist.all_gather(gathered, fingerprint)
        spread = max(float((g - gathered[0]).abs().max()) for g in gathered)
        if spread != 0.0:
            raise RuntimeError(f"ranks hold different parameters after step {self.state.step} (max fingerprint "
                               f"difference {spread:.3e}): the gradient all-reduce did not happen; check the ZeRO "
                               "options (zero.contiguous_gradients / reduce_scatter, docs/findings.md §5)")
        return spread

    def _last_step(self) -> int:
        return self.cfg.stop_after or self.cfg.steps

    def _reports_at(self, step: int) -> bool:
        """Whether metrics go out after optimizer step ``step`` (a log line or a checkpoint)."""
        cfg, last = self.cfg, self._last_step()
        return step % cfg.logging.every == 0 or step % cfg.checkpoint_every == 0 or step == last

    def _grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return self.grad_norm if norm is None else float(norm)

    def _metrics(self, window: dict) -> dict:
        steps = max(1, window["steps"])
        loss, seconds, jvp, skipped, critic = _mean_over_ranks(
            [window["loss"] / steps, window["seconds"], window["jvp"], float(self.batches.skipped),
             window["critic"] / steps], self.device)
        samples = steps * self.cfg.global_batch
        metrics = {"step": self.state.step, "loss": loss, "grad_norm": self._grad_norm(),
                   "lr": self.engine.get_lr()[0], "samples_per_s": samples / max(seconds, 1e-9),
                   "jvp_share": jvp / max(seconds, 1e-9), "memory_mib": _memory_mib(self.device),
                   "skipped_samples": int(skipped * self.world), "bad_steps": self.state.bad_steps}
        if self.critic is not None:  # the critic's hinge loss; "loss" is the student's alone
            metrics["critic_loss"] = critic
        return metrics


def _memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def quiet_ray_train_reports() -> None:
    """Ray Train V2 logs every ray.train.report at INFO on every rank, with the whole metrics dict:
    two such lines per progress line bury it. Its warnings stay. (Its logger is named after the
    module's file; another Ray layout simply keeps the lines.)"""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_worker(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker: the config arrives as a plain dict (validated on the driver)."""
    quiet_ray_train_reports()
    cfg = from_dict(TrainConfig, loop_config["train"], validate=True)
    Trainer(cfg, loop_config.get("sample_text")).run()
