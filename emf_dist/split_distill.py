"""One-step distillation of a MeanFlow model into itself, by interval splitting.

The average velocity over [0, 1] is the mean of the average velocities over any split of
[0, 1] taken along the trajectory (the integral is additive; SplitMeanFlow's identity):

    u(z_1, 0, 1) = (1/k) sum_i u(z_{t_i}, t_{i+1}, t_i),   t_i = 1 - i/k,

so for an exact MeanFlow model the k-step sample x_k and the 1-step sample z_1 - u(z_1, 0, 1)
coincide. A trained one does not: its 4-step samples are better than its 1-step ones (the
1-step map blends two layouts or two colors where 4 steps decide). Here a frozen copy of the
model (the teacher) samples in k steps and the student's 1-step query regresses on it:

    loss = adaptive-weighted || u(z_1, 0, 1) - sg(z_1 - x_k(z_1)) ||^2,   z_1 ~ N(0, I)

Only captions are needed (the batch's images serve only the critic below). Every row is the 1-step
query; the other intervals are not trained. With ``guidance`` w != 1 the teacher takes its k
steps with classifier-free guidance, u_uncond + w (u_cond - u_uncond), so the student's 1-step
query learns the guided k-step sample at one evaluation (guidance distillation, as SANA-Sprint
and rCM distil a guided teacher); rows whose text is dropped stay unguided, so the null
condition keeps its meaning. With ``adversarial`` lambda > 0 a small critic (emf_dist/critic.py)
also judges the 1-step samples against the batch's images, and the student adds lambda times its
hinge term (adversarial distillation, as ADD and SANA-Sprint's LADD), which penalises the blends
the regression settles on. A fixed teacher saturates, so training runs in rounds, each round's
result the next round's teacher (``SplitDistillConfig.rounds``; what rounds and the critic do to
1, 2 and 4 steps on the demo recipe: docs/benchmarks.md).

``split_average_velocity`` is the identity itself, for any split of any interval per row; the
MeanFlow objective's split rows (MeanFlowConfig.split_share) use it with the network as its own
teacher and one split point.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from emf_dist.critic import SceneCritic, critic_loss, generator_loss
from emf_dist.samplers import VelocityOf, conditioned


@torch.no_grad()
def split_average_velocity(velocity_of: VelocityOf, z: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """The average velocity of a flow over [times[-1], times[0]] (per row), split at the times between.

    ``velocity_of(z, r, t)``: a MeanFlow network's prediction, its text bound (emf_dist.samplers.conditioned).
    ``times`` [k + 1, B] runs down, t_0 > t_1 > ... > t_k, per row; from ``z`` = z_{t_0} it takes the
    MeanFlow steps z_{i+1} = z_i - (t_i - t_{i+1}) u_i, u_i = u(z_i, t_{i+1}, t_i), and returns their
    length-weighted mean sum_i (t_i - t_{i+1}) u_i / (t_0 - t_k): for an exact average-velocity field
    this is u(z_{t_0}, t_k, t_0) whatever the split (SplitMeanFlow's interval splitting consistency).
    The weighted sum rather than (z_0 - z_k) / (t_0 - t_k) keeps short intervals exact in low precision.
    No gradients."""
    expand = lambda s: s.view(-1, 1, 1, 1).to(z.dtype)  # noqa: E731
    total = torch.zeros_like(z)
    for t_now, t_next in zip(times[:-1], times[1:]):
        u = velocity_of(z, t_next, t_now)
        total = total + expand(t_now - t_next) * u
        z = z - expand(t_now - t_next) * u
    return total / expand(times[0] - times[-1])


@dataclass
class SplitDistillConfig:
    teacher_steps: int = 4  # k: the teacher's MeanFlow steps over [0, 1]
    adaptive_p: float = 0.5  # adaptive loss weight 1/(err^2 + c)^p, as in the MeanFlow objective
    adaptive_c: float = 1e-3
    text_drop: float = 0.1  # rows whose text is replaced by the null condition, for teacher and student alike
    # The teacher's classifier-free guidance scale over its k steps (1: none), in the first round only:
    # a later round's teacher is the guided student already, and guiding it again compounds the scale
    # round after round (docs/benchmarks.md). Above 1 the teacher evaluates each step twice,
    # conditional and unconditional, in one doubled batch.
    guidance: float = 1.0
    # Rounds in one run: the run's steps split evenly, each round's EMA weights the next round's start
    # and teacher (a fixed teacher saturates). Each round is the run a one-round config would make,
    # seeded seed + round (TrainConfig.distill_round), so R rounds equal R chained runs.
    rounds: int = 1
    # The weight lambda of the critic's term in the student's loss (0: no critic), the critic's width
    # (channels of its first convolution) and its Adam learning rate. The critic persists across rounds.
    adversarial: float = 0.0
    critic_width: int = 16
    critic_lr: float = 2e-4

    def round(self, index: int) -> SplitDistillConfig:
        """Round ``index`` (from 0) as a one-round objective: guided in the first round only."""
        return replace(self, rounds=1, guidance=self.guidance if index == 0 else 1.0)

    def validate(self) -> list[str]:
        problems = []
        if self.teacher_steps < 2:
            problems.append(f"teacher_steps must be >= 2 (1 would distil the model's 1-step sample into "
                            f"itself), got {self.teacher_steps}")
        if not 0.0 <= self.text_drop < 1.0:
            problems.append(f"text_drop must lie in [0, 1), got {self.text_drop}")
        if self.guidance <= 0:
            problems.append(f"guidance must be > 0 (1 = no guidance), got {self.guidance}")
        if self.rounds < 1:
            problems.append(f"rounds must be >= 1, got {self.rounds}")
        if self.adversarial < 0 or self.critic_width < 1 or self.critic_lr <= 0:
            problems.append(f"need adversarial >= 0, critic_width >= 1 and critic_lr > 0, got {self.adversarial}, "
                            f"{self.critic_width}, {self.critic_lr}")
        if self.adaptive_p < 0 or self.adaptive_c <= 0:
            problems.append(f"need adaptive_p >= 0 and adaptive_c > 0, got {self.adaptive_p}, {self.adaptive_c}")
        return problems


class SplitDistillLoss:
    """Callable objective with MeanFlowLoss's signature: ``loss, stats = objective(model, x, tokens, mask,
    pooled, progress)``. ``teacher`` is a frozen MeanFlow model (the student's starting weights); ``critic``
    is needed when cfg.adversarial > 0. The returned loss then also holds the critic's own hinge loss, on
    its weights alone, so one backward gives both networks their gradients; the training loop steps the
    critic's optimizer."""

    def __init__(self, cfg: SplitDistillConfig, teacher: nn.Module, critic: SceneCritic | None = None):
        if cfg.adversarial > 0 and critic is None:
            raise ValueError(f"distill.adversarial {cfg.adversarial} needs a critic (emf_dist/critic.py)")
        self.cfg, self.teacher, self.critic = cfg, teacher, critic if cfg.adversarial > 0 else None

    def __call__(self, model, x, text_tokens, text_mask, text_pooled, progress: float = 0.0, *,
                 net: nn.Module | None = None, generator: torch.Generator | None = None):
        cfg, batch, device = self.cfg, x.shape[0], x.device
        text = (text_tokens, text_mask, text_pooled)
        drop = torch.rand(batch, generator=generator, device=device) < cfg.text_drop
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        times = torch.linspace(1.0, 0.0, cfg.teacher_steps + 1, device=device)[:, None].expand(-1, batch)
        # The teacher's k steps share its text (conditioned): for our DiT it is projected once, not k times.
        teacher = conditioned(self.teacher, *text, cfg.guidance, drop, noise.dtype)
        target = split_average_velocity(teacher, noise, times)  # z_1 - x_k

        u = model(noise, torch.zeros(batch, device=device), torch.ones(batch, device=device), *text, drop)
        precision = torch.promote_types(u.dtype, torch.float32)  # reduce bf16 outputs in float32
        err = (u.to(precision) - target.to(precision)).pow(2).flatten(1).mean(1)
        weight = (err.detach() + cfg.adaptive_c).pow(-cfg.adaptive_p)
        loss = (weight * err).mean()
        stats = {"mse": err.mean().detach(), "jvp_rows": 0, "jvp_seconds": 0.0}
        # The 1-step sample z_1 - u is judged on rows that kept their caption (there is none to judge against
        # otherwise); a micro-batch with none left gives the critic no gradient this time.
        keep = ~drop
        if self.critic is None or not keep.any():
            return loss, stats
        sample, real, pooled = (noise - u)[keep], x[keep].to(u.dtype), text_pooled[keep].to(u.dtype)
        student_term = generator_loss(self.critic, sample, pooled)
        critic_term = critic_loss(self.critic, real, sample.detach(), pooled)
        stats.update(adversarial=student_term.detach(), critic=critic_term.detach())
        return loss + cfg.adversarial * student_term + critic_term, stats
