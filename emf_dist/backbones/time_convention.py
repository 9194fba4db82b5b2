"""How our time t maps to a diffusers flow model's timestep input, read from the scheduler config.

Our path is z_t = (1 - t) x + t e (data at t = 0) with velocity v = e - x. A diffusers
flow-matching model is trained on x_sigma = (1 - sigma) x + sigma e, takes
timestep = sigma * num_train_timesteps and predicts e - x: the same path and the same sign, so
sigma = t and the prediction is our instantaneous velocity u(z, t, t) as it is.

The scheduler's shift (``shift``, ``flow_shift``, or the resolution-dependent
``use_dynamic_shifting``) is a sampling-schedule choice: it warps which sigmas a sampler visits,
sigma' = s sigma / (1 + (s - 1) sigma), and the model is then called at timestep
sigma' * num_train_timesteps. It does not change what the model computes at a given sigma, so the
mapping t -> timestep ignores it. It is kept here (and ``shifted`` applies it) only for a sampler
or a time sampler that wants to visit the parent's sigmas.

Schedulers of another path (DDPM / DDIM / Euler with epsilon or v prediction on a
variance-preserving path, TrigFlow's SCM) have no such mapping and are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# diffusers' flow-matching default when a folder has no scheduler: FlowMatchEulerDiscreteScheduler()
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000

# Schedulers whose model input is timestep = sigma * num_train_timesteps on the flow path.
FLOW_MATCH_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
# Multistep solvers that run the flow path only with prediction_type "flow_prediction" and
# use_flow_sigmas (SANA's pipelines ship DPMSolverMultistepScheduler so configured).
FLOW_CAPABLE_SOLVERS = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
# Options of those solvers that replace the flow sigmas by a VP-derived table (timestep != sigma * N).
_NON_FLOW_SIGMA_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


@dataclass(frozen=True)
class FlowTimeConvention:
    num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS
    # SanaTransformer2DModel.config.timestep_scale: SANA's pipeline multiplies the timestep by it.
    timestep_scale: float = 1.0
    shift: float = 1.0  # the scheduler's static shift (sampling only, see the module docstring)
    dynamic_shifting: bool = False  # the shift depends on the image size (sampling only)
    source: str = ("default: no scheduler config, diffusers' flow-matching "
                   f"num_train_timesteps={DEFAULT_NUM_TRAIN_TIMESTEPS}")

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The transformer's ``timestep`` input for our time t (= sigma), or for an interval t - r."""
        return t * (self.num_train_timesteps * self.timestep_scale)

    def shifted(self, t: torch.Tensor, shift: float | None = None) -> torch.Tensor:
        """The scheduler's shifted sigma s t / (1 + (s - 1) t), for samplers that follow its schedule."""
        s = self.shift if shift is None else shift
        return s * t / (1 + (s - 1) * t)


def convention_from_scheduler_config(config: dict, timestep_scale: float = 1.0) -> FlowTimeConvention:
    """Check a scheduler config describes the flow path and read its timestep convention."""
    name = config.get("_class_name", "<no _class_name>")
    if name in FLOW_MATCH_SCHEDULERS:
        if config.get("invert_sigmas", False):
            raise ValueError(f"{name} with invert_sigmas=True runs the path backwards (data at sigma = 1); "
                             "it does not map onto z_t = (1 - t) x + t e")
        shift = float(config.get("shift", 1.0))
    elif name in FLOW_CAPABLE_SOLVERS:
        prediction = config.get("prediction_type", "epsilon")
        if prediction != "flow_prediction" or not config.get("use_flow_sigmas", False):
            raise ValueError(f"{name} with prediction_type={prediction!r} and use_flow_sigmas="
                             f"{config.get('use_flow_sigmas', False)} is a diffusion (VP) scheduler, not a flow: "
                             "only prediction_type 'flow_prediction' with use_flow_sigmas=True maps onto our path")
        on = [option for option in _NON_FLOW_SIGMA_OPTIONS if config.get(option, False)]
        if on:
            raise ValueError(f"{name} with {', '.join(on)} derives its timesteps from a VP sigma table, "
                             "not timestep = sigma * num_train_timesteps")
        shift = float(config.get("flow_shift", 1.0))
    else:
        raise ValueError(f"cannot map scheduler {name!r} onto the flow path z_t = (1 - t) x + t e: supported are "
                         f"{', '.join(FLOW_MATCH_SCHEDULERS)} and {', '.join(FLOW_CAPABLE_SOLVERS)} "
                         "(with prediction_type 'flow_prediction', use_flow_sigmas=True)")
    return FlowTimeConvention(
        num_train_timesteps=int(config.get("num_train_timesteps", DEFAULT_NUM_TRAIN_TIMESTEPS)),
        timestep_scale=float(timestep_scale),
        shift=shift,
        dynamic_shifting=bool(config.get("use_dynamic_shifting", False)),
        source=f"scheduler config ({name})",
    )


def read_time_convention(scheduler_dir: str | Path | None, timestep_scale: float = 1.0) -> FlowTimeConvention:
    """From ``scheduler_dir/scheduler_config.json``; the documented default when there is no such folder."""
    if scheduler_dir is None or not (Path(scheduler_dir) / "scheduler_config.json").is_file():
        return FlowTimeConvention(timestep_scale=float(timestep_scale))
    with open(Path(scheduler_dir) / "scheduler_config.json") as f:
        return convention_from_scheduler_config(json.load(f), timestep_scale)
