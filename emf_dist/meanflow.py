"""The MeanFlow objective (and flow matching, its r = t special case), in two passes.

Flow path z_t = (1 - t) x + t e, data at t = 0, noise at t = 1, velocity v = e - x. The
network predicts the average velocity u(z_t, r, t) over [r, t]; the MeanFlow identity gives
its regression target

    u_tgt = v - (t - r) du/dt,        du/dt = J_z u . v + d_t u     (tangents (v, 0, 1) for (z, r, t))

and the loss is the adaptive-weighted ||u - sg(u_tgt)||^2, weight 1 / (||err||^2 + c)^p.

Because u_tgt is stop-gradient, du/dt needs no gradients, only u does. Our DiT computes both in
one pass by default (``jvp: fused``): the gradient pass's forward carries the hand-written tangent
of the rows with r != t along, without gradients (rows with r = t have target v and need no
derivative), so the JVP costs the tangent, not a second forward. Where that pass cannot run (the
gradient pass below float32, ZeRO-3's partitioned weights, or JVP chunks) the step runs in two
passes (docs/findings.md §3):
  1. du/dt by a JVP under no_grad (our DiT: the same hand-written pass; any other network:
     forward-mode AD), in float32 even under bf16 autocast, on the rows with r != t only;
  2. an ordinary forward with gradients (and activation checkpointing, if the model has it on).

Velocity source. MeanFlow regresses on the conditional velocity v = e - x of one noise draw;
fine-tuning from a flow-matching parent can instead take the parent's prediction of the
(marginal) velocity at (z_t, t) as v, ``velocity: teacher``. The identity and the loss are
unchanged; the target loses the variance of e - x, which is what long intervals (one-step
sampling) are slowest to average out (its effect on 1-step quality: docs/benchmarks.md). It
costs one no-grad forward of the parent per step.

Tangent (``tangent``). du/dt is the derivative along dz/dt; MeanFlow takes v itself as that
tangent. ``tangent: model`` takes the network's own velocity u(z_t, t, t) at the row's condition
instead (no gradients), as improved MeanFlow does (iMF, arXiv 2512.02012): the derivative then runs
along the ODE the network itself samples, and the target's only noisy term is v. The loss is iMF's
loss on V = u + (t - r) sg(du/dt) against v, written as ||u - sg(v - (t - r) du/dt)||^2 (the same
value and gradient). It costs one more no-grad forward on the JVP rows.

Identity (``identity``). MeanFlow's identity is Eulerian: it differentiates u in the start time, along
the flow at the start point, which brings in the network's spatial Jacobian J_z u. The flow map
x_r = z_t - (t - r) u(z_t, r, t) also obeys the Lagrangian identity: its end point moves with the
flow as r moves, dx_r/dr = v(x_r, r), that is

    u_tgt = v(x_r, r) + (t - r) du/dr,        du/dr: tangents (0, 1, 0) for (z, r, t)

with v at the point where the step lands: the teacher's velocity (``velocity: teacher``) or the
network's own u(x_r, r, r), Lagrangian self-distillation (Boffi, Albergo, Vanden-Eijnden, "How to
build a consistency model", arXiv 2505.18825, where it trains more stably than the Eulerian and
progressive forms). No spatial derivative: du/dr is forward-mode AD in r alone, then one no-grad
forward at the end point. ``identity: lagrangian`` applies it to the JVP rows; the split rows keep
their split target. Its measurement against the Eulerian identity: docs/benchmarks.md.

Classifier-free guidance: text is dropped to the model's null condition at rate
``text_drop``; with guidance folded into training (MeanFlow's recipe) the velocity becomes
v_g = w v + (1 - w - k) u_uncond + k u_cond for the rows that keep their text, u_* being the
network's own predictions at r = t, so 1-step sampling needs one network evaluation. With a
teacher, guidance uses the teacher's predictions: v_g = w v_cond + (1 - w) v_uncond.

Interval splitting (SplitMeanFlow, ``split_share``). The average velocity is additive over a split
r < s < t of its interval,

    (t - r) u(z_t, r, t) = (s - r) u(z_s, r, s) + (t - s) u(z_t, s, t),   z_s = z_t - (t - s) u(z_t, s, t),

so the network's own two shorter predictions (no gradients) give a target for the long one with no
JVP. That share of the r != t rows, the longest intervals of the batch, regresses on it, s uniform
in (r, t) as in the paper: long intervals are where the JVP target is poorest and where one-step
sampling asks, and rows with ``time.full_interval`` at (0, 1) are the longest of all, so they take
the split target first. Those rows need no velocity v: the target is the field the network has
learnt, which with folded guidance is already the guided one for rows that keep their text, and
both predictions take the row's own text or null condition. The rest of the objective (r = t
rows, the other r != t rows, the loss weight) is unchanged; split_share 0 is the objective
without it, draw for draw. ``split_steps`` k > 2 cuts a split row's interval at k - 1 points drawn
uniformly in (r, t) and walks the network's k steps through them, the same identity applied k - 1
times.

AlphaFlow's curriculum (``alpha``, emf_dist/alpha_flow.py). While its alpha is above 0 the JVP rows
take AlphaFlow's consistency-step target instead: alpha of the interval walked with v, the rest with
the network's own average velocity, which is trajectory flow matching at alpha = 1 and MeanFlow's
target in the limit alpha -> 0. No JVP runs while alpha > 0; the split rows keep their split target.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn

from emf_dist.alpha_flow import AlphaCurriculum, alpha_flow_target, alpha_row_weight
from emf_dist.model import VelocityNet
from emf_dist.model_jvp import ParameterScope, velocity_and_tangent
from emf_dist.samplers import cond_and_uncond
from emf_dist.split_distill import split_average_velocity
from emf_dist.time_sampling import TimeSamplerConfig, sample_times


@dataclass
class MeanFlowConfig:
    mode: Literal["meanflow", "flow_matching"] = "meanflow"  # flow_matching: r = t always, no JVP
    time: TimeSamplerConfig = field(default_factory=TimeSamplerConfig)  # (r, t) law and its schedule
    adaptive_p: float = 1.0  # adaptive loss weight 1/(err^2 + c)^p; 0 gives the plain squared error
    adaptive_c: float = 1e-3  # c above (MeanFlow's PyTorch code: 1e-3; its JAX code: 1e-2)
    text_drop: float = 0.1  # probability of replacing a row's text by the null condition
    guidance_w: float = 1.0  # w in v_g = w v + (1 - w - k) u_uncond + k u_cond; w = 1, k = 0: no folding
    guidance_k: float = 0.0  # k above
    velocity: Literal["data", "teacher"] = "data"  # v = e - x, or the fine-tuning parent's prediction at (z_t, t)
    tangent: Literal["velocity", "model"] = "velocity"  # du/dt along v, or along the network's own u(z_t, t, t)
    # How du/dt is computed. "fused": our DiT's hand-written tangent inside the gradient pass (module
    # docstring: needs that pass in float32 or wider, or jvp_float32 off, whole weights and no
    # jvp_chunk); "explicit": the same pass on its own, before the gradient pass; "forward_ad":
    # PyTorch's forward-mode AD, for any network (the diffusers backbones); "auto": fused for our DiT
    # where it can run, else explicit; forward_ad for other networks.
    jvp: Literal["auto", "fused", "explicit", "forward_ad", "finite_difference"] = "auto"
    # Step of the central finite difference. The time embedding's frequencies reach 1000 rad per
    # unit t, so the difference is exact only in float64 with a tiny step: an oracle, not a default.
    fd_eps: float = 1e-4
    jvp_float32: bool = True  # run the JVP pass in float32 with autocast off (bf16 JVPs diverge)
    # Rows of the JVP pass computed at once (0: all rows at once). Per row the float32 pass with its
    # tangents can hold more than the checkpointed gradient pass (our DiT; not SANA-1.6B: "the memory
    # plan" in docs/benchmarks.md); chunks bound it, at one more, smaller pass per chunk (under
    # ZeRO-3 one more gather of the weights each).
    jvp_chunk: int = 0
    # Share of the r != t rows, the longest intervals first, whose target is the interval-splitting one
    # built from the network's own predictions instead of the JVP (module docstring). The JVP rows left
    # on the shorter intervals anchor that self-referential target: without them it diverges
    # (docs/benchmarks.md, "interval splitting inside the fine-tune").
    split_share: float = 0.0
    # Sub-intervals of a split row: its target is the network's own split_steps-step walk over [r, t],
    # cut at split_steps - 1 points drawn uniformly in (r, t) (2: SplitMeanFlow's one split point).
    split_steps: int = 2
    # The identity the JVP rows' target comes from (module docstring): MeanFlow's Eulerian one, du/dt
    # along the flow at the start point, or the Lagrangian one, du/dr at the end point with the
    # velocity evaluated where the step lands.
    identity: Literal["eulerian", "lagrangian"] = "eulerian"
    # AlphaFlow's curriculum over training progress (module docstring); the default keeps alpha at 0,
    # MeanFlow's own target.
    alpha: AlphaCurriculum = field(default_factory=AlphaCurriculum)

    @property
    def folds_guidance(self) -> bool:
        return self.guidance_w != 1.0 or self.guidance_k != 0.0

    def validate(self) -> list[str]:
        problems = []
        if not 0.0 <= self.text_drop < 1.0:
            problems.append(f"text_drop must lie in [0, 1), got {self.text_drop}")
        if self.folds_guidance and self.text_drop == 0.0:
            problems.append("folding guidance into the target needs text_drop > 0 to learn the unconditional velocity")
        if self.velocity == "teacher" and self.guidance_k != 0.0:
            problems.append("guidance_k weighs the student's own conditional prediction; with velocity: teacher "
                            "guidance is w v_cond + (1 - w) v_uncond of the teacher: set guidance_k to 0")
        if self.adaptive_p < 0 or self.adaptive_c <= 0:
            problems.append(f"need adaptive_p >= 0 and adaptive_c > 0, got {self.adaptive_p}, {self.adaptive_c}")
        if not 0.0 <= self.split_share <= 1.0:
            problems.append(f"split_share is a share of the r != t rows and must lie in [0, 1], got {self.split_share}")
        if self.split_share > 0 and self.mode == "flow_matching":
            problems.append("split_share splits intervals r < t; flow matching trains at r = t only: set it to 0")
        if self.split_steps < 2:
            problems.append(f"split_steps counts the sub-intervals of a split row and must be >= 2, "
                            f"got {self.split_steps}")
        if self.identity == "lagrangian":
            if self.mode == "flow_matching":
                problems.append("identity: lagrangian shapes the r != t rows' target; flow matching has none: "
                                "use eulerian")
            if self.tangent == "model":
                problems.append("tangent is the direction of the Eulerian identity's du/dt; the Lagrangian one "
                                "differentiates in r alone: leave tangent at velocity")
            if self.jvp in ("fused", "explicit"):
                problems.append(f"jvp: {self.jvp} is our DiT's tangent along z and t; the Lagrangian identity's du/dr "
                                "is taken by forward-mode AD: use auto or forward_ad")
            if self.folds_guidance and self.velocity != "teacher":
                problems.append("with identity: lagrangian the velocity at the end point is the network's own unless "
                                "velocity: teacher, and folded guidance needs the teacher's there")
        problems += self.alpha.validate()
        if self.alpha.enabled:
            if self.mode == "flow_matching":
                problems.append("alpha shapes the r != t rows' target; flow matching has none: leave alpha at 0")
            if self.identity == "lagrangian" or self.tangent == "model":
                problems.append("alpha replaces the JVP rows' target while it is above 0; with identity: lagrangian "
                                "or tangent: model the two would take turns on the same rows: use one of them")
        if self.tangent == "model" and self.mode == "flow_matching":
            problems.append("tangent is the JVP's direction on r != t rows; flow matching has none: leave it at velocity")
        if self.fd_eps <= 0:
            problems.append(f"fd_eps must be > 0, got {self.fd_eps}")
        if self.jvp_chunk < 0:
            problems.append(f"jvp_chunk must be >= 0 (rows of the JVP pass at once; 0: all), got {self.jvp_chunk}")
        if self.jvp == "fused" and self.jvp_chunk:
            problems.append("jvp_chunk splits a JVP pass of its own; jvp: fused has none: use explicit (or auto)")
        return problems


def _row_slice(values: tuple, rows: slice) -> tuple:
    return tuple(None if value is None else value[rows] for value in values)


def jvp_method(net: nn.Module, cfg: MeanFlowConfig) -> str:
    """The method of the two-pass step's JVP that ``cfg.jvp`` resolves to for ``net``."""
    if cfg.jvp in ("auto", "fused"):
        return "explicit" if isinstance(net, VelocityNet) else "forward_ad"
    if cfg.jvp == "explicit" and not isinstance(net, VelocityNet):
        raise ValueError(f"objective.jvp: explicit is written for our DiT, not {type(net).__name__}; "
                         "use forward_ad (or auto)")
    return cfg.jvp


def fused_step_blockers(net: nn.Module, z: torch.Tensor, cfg: MeanFlowConfig, partitioned: bool) -> list[str]:
    """Why the fused step cannot run here (empty: it can). ``partitioned``: ZeRO-3's parameters."""
    blockers = []
    if not isinstance(net, VelocityNet):
        blockers.append(f"its tangent rules are written for our DiT, not {type(net).__name__}")
    if partitioned:
        blockers.append("it reads whole weights, and ZeRO-3 partitions them")
    if cfg.jvp_chunk:
        blockers.append("jvp_chunk splits a JVP pass of its own")
    below_float32 = torch.is_autocast_enabled(z.device.type) or z.dtype not in (torch.float32, torch.float64)
    if cfg.jvp_float32 and below_float32:
        blockers.append("the gradient pass runs below float32 (autocast or half inputs) and jvp_float32 asks for a "
                        "float32 JVP")
    return blockers


def time_derivative(net: nn.Module, z, r, t, velocity, text: tuple, drop, cfg: MeanFlowConfig,
                    parameters_of: ParameterScope | None = None) -> torch.Tensor:
    """du/dt along the flow: the JVP of u(z, r, t) with tangents (velocity, 0, 1). No gradients.
    ``parameters_of`` makes partitioned (ZeRO-3) parameters present for the explicit pass."""
    if 0 < cfg.jvp_chunk < z.shape[0]:  # rows are independent: chunks of them bound the pass's memory
        whole, chunks = replace(cfg, jvp_chunk=0), []
        for start in range(0, z.shape[0], cfg.jvp_chunk):
            rows = slice(start, start + cfg.jvp_chunk)
            z_rows, r_rows, t_rows, v_rows, drop_rows = _row_slice((z, r, t, velocity, drop), rows)
            chunks.append(time_derivative(net, z_rows, r_rows, t_rows, v_rows, _row_slice(text, rows), drop_rows,
                                          whole, parameters_of))
        return torch.cat(chunks)
    method = jvp_method(net, cfg)
    with torch.no_grad():
        if method == "finite_difference":
            eps = cfg.fd_eps
            ahead = net(z + eps * velocity, r, t + eps, *text, drop)
            behind = net(z - eps * velocity, r, t - eps, *text, drop)
            return (ahead - behind) / (2 * eps)
        precision = contextlib.nullcontext()
        if cfg.jvp_float32:
            z, r, t, velocity = z.float(), r.float(), t.float(), velocity.float()
            precision = torch.autocast(z.device.type, enabled=False)
        if method == "explicit":
            with precision:
                return velocity_and_tangent(net, z, r, t, *text, drop, velocity, torch.ones_like(t), parameters_of)[1]
        with precision, fwAD.dual_level():
            u = net(fwAD.make_dual(z, velocity), r, fwAD.make_dual(t, torch.ones_like(t)), *text, drop)
            return fwAD.unpack_dual(u).tangent


def jvp_direction(net: nn.Module, z, t, v, text: tuple, drop, cfg: MeanFlowConfig) -> torch.Tensor:
    """The tangent of z that du/dt runs along: v, or (``tangent: model``) the network's own velocity."""
    if cfg.tangent == "velocity":
        return v
    with torch.no_grad():
        return net(z, t, t, *text, drop).to(v.dtype)


def meanflow_target(v, r, t, du_dt) -> torch.Tensor:
    """MeanFlow's sg target v - (t - r) du/dt."""
    return v - (t - r).view(-1, 1, 1, 1).to(v.dtype) * du_dt.to(v.dtype)


def jvp_target(net: nn.Module, z, r, t, v, text: tuple, drop, cfg: MeanFlowConfig,
               parameters_of: ParameterScope | None = None) -> torch.Tensor:
    """The target by a JVP pass of its own (the two-pass step)."""
    tangent = jvp_direction(net, z, t, v, text, drop, cfg)
    return meanflow_target(v, r, t, time_derivative(net, z, r, t, tangent, text, drop, cfg, parameters_of))


def end_time_derivative(net: nn.Module, z, r, t, text: tuple, drop,
                        cfg: MeanFlowConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """u(z, r, t) and du/dr, its derivative in the end time (tangents (0, 1, 0) on (z, r, t)), by forward-mode
    AD: our DiT's hand-written tangent runs along z and t only. No gradients."""
    precision = contextlib.nullcontext()
    if cfg.jvp_float32:
        z, r, t = z.float(), r.float(), t.float()
        precision = torch.autocast(z.device.type, enabled=False)
    with torch.no_grad(), precision, fwAD.dual_level():
        primal, tangent = fwAD.unpack_dual(net(z, fwAD.make_dual(r, torch.ones_like(r)), t, *text, drop))
    return primal, tangent


def lagrangian_target(net: nn.Module, teacher: nn.Module | None, z, r, t, text: tuple, drop,
                      cfg: MeanFlowConfig) -> torch.Tensor:
    """sg target of u(z_t, r, t) from the Lagrangian identity u = v(x_r, r) + (t - r) du/dr at the step's end
    point x_r = z_t - (t - r) u, v the teacher's velocity there or (no teacher) the network's own u(x_r, r, r)."""
    u, du_dr = end_time_derivative(net, z, r, t, text, drop, cfg)
    gap = (t - r).view(-1, 1, 1, 1).to(u.dtype)
    end = (z - gap * u).to(z.dtype)
    if teacher is not None:
        v_end = teacher_velocity(teacher, end, r, text, drop, cfg)
    else:
        with torch.no_grad():
            v_end = net(end, r, r, *text, drop)
    return (v_end.to(u.dtype) + gap * du_dr).to(z.dtype)


def split_rows(r: torch.Tensor, t: torch.Tensor, share: float) -> torch.Tensor:
    """Indices of round(share x the number of r != t rows) rows, the longest intervals t - r (ties in row order)."""
    count = round(share * int((r != t).sum()))
    longest_first = torch.where(r != t, t - r, -1.0).argsort(descending=True, stable=True)
    return longest_first[:count]


def split_target(net: nn.Module, z, r, t, split_points, text: tuple, drop) -> torch.Tensor:
    """sg target of u(z_t, r, t): the network's own u over the sub-intervals of [r, t] cut at
    s_j = t - f_j (t - r), ``split_points`` [B, k - 1] holding the fractions f_j in (0, 1)."""
    fractions = split_points.sort(dim=1).values.T  # [k - 1, B], ascending: the cut points run from t down to r
    cuts = t - fractions * (t - r)
    # Through net's forward at every sub-interval, not samplers.conditioned: under ZeRO-3 the forward is
    # what gathers the weights.
    velocity_of = lambda z, r, t: net(z, r, t, *text, drop)  # noqa: E731
    return split_average_velocity(velocity_of, z, torch.cat([t[None], cuts, r[None]]))


def guided_velocity(net: nn.Module, z, t, v, text: tuple, drop, cfg: MeanFlowConfig) -> torch.Tensor:
    """MeanFlow's training-time guidance: v_g for rows that keep their text, v for dropped rows."""
    if not cfg.folds_guidance:
        return v
    with torch.no_grad():
        u_cond, u_uncond = cond_and_uncond(net, z, t, t, *text)
    w, k = cfg.guidance_w, cfg.guidance_k
    v_guided = w * v + (1 - w - k) * u_uncond + k * u_cond
    return torch.where(drop[:, None, None, None], v, v_guided.to(v.dtype))


def teacher_velocity(teacher: nn.Module, z, t, text: tuple, drop, cfg: MeanFlowConfig) -> torch.Tensor:
    """The teacher's velocity at (z_t, t): guided (w v_cond + (1 - w) v_uncond) for rows that keep their
    text when guidance is folded, unconditional for dropped rows."""
    with torch.no_grad():
        if not cfg.folds_guidance:
            return teacher(z, t, t, *text, drop)
        v_cond, v_uncond = cond_and_uncond(teacher, z, t, t, *text)
    w = cfg.guidance_w
    return torch.where(drop[:, None, None, None], v_uncond, w * v_cond + (1 - w) * v_uncond)


class MeanFlowLoss:
    """Callable objective: ``loss, stats = objective(model, x, tokens, mask, pooled, progress)``.

    ``model`` runs the gradient pass and may be a wrapper (DeepSpeed engine, DDP) that syncs
    gradients; ``net`` (default: model) is the plain module used for the no-grad passes,
    since forward-mode AD does not run through such wrappers (docs/findings.md §11). ``teacher``
    (frozen, no gradients) supplies v when ``cfg.velocity`` is "teacher". ``parameters_of``: see
    time_derivative (the trainer's ZeRO-3 gather).
    """

    def __init__(self, cfg: MeanFlowConfig, teacher: nn.Module | None = None,
                 parameters_of: ParameterScope | None = None):
        if (cfg.velocity == "teacher") != (teacher is not None):
            raise ValueError(f"velocity: {cfg.velocity} " + ("needs a teacher model (the fine-tuning parent)"
                             if teacher is None else "takes no teacher model"))
        self.cfg, self.teacher, self.parameters_of = cfg, teacher, parameters_of

    def _fuses(self, net: nn.Module, z: torch.Tensor) -> bool:
        if self.cfg.jvp not in ("auto", "fused") or self.cfg.identity == "lagrangian":
            return False
        blockers = fused_step_blockers(net, z, self.cfg, partitioned=self.parameters_of is not None)
        if blockers and self.cfg.jvp == "fused":
            raise ValueError("objective.jvp: fused cannot run here: " + "; ".join(blockers)
                             + ". Use auto (two passes where fusing cannot run) or explicit")
        return not blockers

    def _fused_pass(self, model, net, z, r, t, v, text: tuple, drop, jvp_mask):
        """u of every row, with gradients, and the JVP rows' target, in one pass. The pass's tangent
        covers its first rows, so the JVP rows go first and u comes back in the batch's order."""
        order = torch.cat([jvp_mask.nonzero().squeeze(1), (~jvp_mask).nonzero().squeeze(1)])
        z, r, t, v, drop, *text = (a.index_select(0, order) for a in (z, r, t, v, drop, *text))
        n = int(jvp_mask.sum())
        first = lambda a: a[:n]  # noqa: E731
        direction = jvp_direction(net, first(z), first(t), first(v), tuple(map(first, text)), first(drop), self.cfg)
        u, du_dt = model(z, r, t, *text, drop, tangent=(direction, torch.ones_like(first(t))))
        return u.index_select(0, order.argsort()), meanflow_target(first(v), first(r), first(t), du_dt)

    def __call__(self, model, x, text_tokens, text_mask, text_pooled, progress: float = 0.0, *,
                 net: nn.Module | None = None, generator: torch.Generator | None = None):
        cfg, net = self.cfg, net if net is not None else model
        batch, device = x.shape[0], x.device
        text = (text_tokens, text_mask, text_pooled)

        r, t = sample_times(cfg.time, batch, progress, device=device, generator=generator)
        if cfg.mode == "flow_matching":
            r = t
        drop = torch.rand(batch, generator=generator, device=device) < cfg.text_drop
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        if cfg.split_share > 0:  # drawn only then, so that split_share 0 keeps the draws of the plain objective
            split_points = torch.rand(batch, cfg.split_steps - 1, generator=generator, device=device)
        split = split_rows(r, t, cfg.split_share)
        expand = lambda s: s.view(-1, 1, 1, 1).to(x.dtype)  # noqa: E731
        z = (1 - expand(t)) * x + expand(t) * noise
        if self.teacher is not None:
            v = teacher_velocity(self.teacher, z, t, text, drop, cfg).to(x.dtype)
        else:
            v = guided_velocity(net, z, t, noise - x, text, drop, cfg)

        target = v
        if len(split):
            rows = lambda a: a.index_select(0, split)  # noqa: E731
            split_u = split_target(net, rows(z), rows(r), rows(t), rows(split_points), tuple(map(rows, text)),
                                   rows(drop))
            target = target.index_copy(0, split, split_u.to(target.dtype))
        jvp_mask = r != t
        jvp_mask[split] = False
        alpha = cfg.alpha.at(progress)
        alpha_rows = jvp_mask.nonzero().squeeze(1) if alpha > 0 else jvp_mask.new_zeros(0, dtype=torch.long)
        if len(alpha_rows):  # AlphaFlow's target replaces the JVP's on these rows
            rows = lambda a: a.index_select(0, alpha_rows)  # noqa: E731
            alpha_u = alpha_flow_target(net, rows(z), rows(r), rows(t), rows(v), alpha, tuple(map(rows, text)),
                                        rows(drop))
            target = target.index_copy(0, alpha_rows, alpha_u.to(target.dtype))
            jvp_mask[alpha_rows] = False
        jvp_rows = jvp_mask.nonzero().squeeze(1)
        jvp_start = time.perf_counter()
        fused = bool(len(jvp_rows)) and self._fuses(net, z)
        if fused:
            u, row_target = self._fused_pass(model, net, z, r, t, v, text, drop, jvp_mask)
            target = target.index_copy(0, jvp_rows, row_target)
            jvp_seconds = time.perf_counter() - jvp_start  # the whole forward, the tangent on the way
        else:
            if len(jvp_rows):
                rows = lambda a: a.index_select(0, jvp_rows)  # noqa: E731
                if cfg.identity == "lagrangian":
                    row_target = lagrangian_target(net, self.teacher, rows(z), rows(r), rows(t), tuple(map(rows, text)),
                                                   rows(drop), cfg)
                else:
                    row_target = jvp_target(net, rows(z), rows(r), rows(t), rows(v), tuple(map(rows, text)),
                                            rows(drop), cfg, self.parameters_of)
                target = target.index_copy(0, jvp_rows, row_target)
            jvp_seconds = time.perf_counter() - jvp_start  # host time: on CUDA only meaningful after a sync
            u = model(z, r, t, *text, drop)
        precision = torch.promote_types(u.dtype, torch.float32)  # reduce bf16 outputs in float32
        err = (u.to(precision) - target.detach().to(precision)).pow(2).flatten(1).mean(1)
        weight = (err.detach() + cfg.adaptive_c).pow(-cfg.adaptive_p)
        if len(alpha_rows):  # their gradient kept at MeanFlow's scale (emf_dist/alpha_flow.py)
            weight[alpha_rows] *= alpha_row_weight(alpha, cfg.adaptive_p)
        loss = (weight * err).mean()
        return loss, {"mse": err.mean().detach(), "jvp_rows": len(jvp_rows), "jvp_seconds": jvp_seconds,
                      "split_rows": len(split), "fused": fused, "alpha": alpha}
