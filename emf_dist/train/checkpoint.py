"""Training checkpoints: DeepSpeed's own shards plus our state, loaded without unpickling code.

A checkpoint folder (one per reported step, in the run's storage) holds:

    latest, ds/...                 DeepSpeed's checkpoint (tag "ds"): every rank's ZeRO shard;
                                   DeepSpeed's zero_to_fp32 consolidates it as usual
    ema.safetensors                the EMA weights (rank 0)
    state_rank<R>.safetensors      per rank: its sampling RNG state, and as metadata its
                                   TrainState (JSON: the step, the data position, the counters)
    teacher.safetensors            distillation after its first round: the round's frozen teacher
                                   (rank 0; the first round's is the init_from export)
    critic.safetensors             adversarial distillation: the critic and its Adam state (rank 0)
    train_config.json              the run's config (rank 0), for people and tools

DeepSpeed loads its files with ``torch.load(weights_only=False)``. ``safe_torch_load`` forces
``weights_only=True`` for the duration of a load and allowlists only the few plain data
classes DeepSpeed stores (loss-scaler settings, the ZeRO stage enum, fragment addresses), so
a tampered checkpoint cannot run code.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
from safetensors.torch import load_file, save_file

from emf_dist.ema import EMA
from emf_dist.train.train_state import TrainState

DS_TAG = "ds"
TEACHER_FILE = "teacher.safetensors"
CRITIC_FILE = "critic.safetensors"
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def safe_torch_load():
    """Every torch.load inside runs with weights_only=True (DeepSpeed calls it by attribute)."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


def save_checkpoint(folder: str, engine, ema: EMA | None, rank: int, state: TrainState,
                    generator: torch.Generator, config: dict | None = None) -> None:
    """Write this rank's part of a checkpoint into ``folder`` (a local folder per rank)."""
    engine.save_checkpoint(folder, tag=DS_TAG)
    save_train_state(folder, rank, state, generator)
    if rank == 0:
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.shadow.items()}, os.path.join(folder, "ema.safetensors"),
                      metadata={"decay": str(ema.decay), "updates": str(ema.updates)})
        if config is not None:
            with open(os.path.join(folder, "train_config.json"), "w") as f:
                json.dump(config, f, indent=1)


def load_checkpoint(folder: str, engine, ema: EMA | None, rank: int, generator: torch.Generator) -> TrainState:
    """Restore engine, EMA and RNG from ``folder``; returns the saved state (step, data position, ...)."""
    if not os.path.exists(_state_file(folder, rank)):
        raise FileNotFoundError(f"checkpoint {folder} has no state for rank {rank}: it was written by fewer "
                                "workers; resume with the same scaling.num_workers")
    with safe_torch_load():
        path, _ = engine.load_checkpoint(folder, tag=DS_TAG)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint under {folder}/{DS_TAG}")
    state = load_train_state(folder, rank, generator)
    if ema is not None:
        load_ema(folder, ema)
    return state


def _state_file(folder: str, rank: int) -> str:
    return os.path.join(folder, f"state_rank{rank}.safetensors")


def save_train_state(folder: str, rank: int, state: TrainState, generator: torch.Generator) -> None:
    """The rank's RNG state as a tensor and its TrainState as JSON metadata, in one safetensors file."""
    save_file({"generator": generator.get_state()}, _state_file(folder, rank),
              metadata={"state": json.dumps(state.as_dict())})


def load_train_state(folder: str, rank: int, generator: torch.Generator) -> TrainState:
    """Restore the rank's RNG from ``save_train_state``'s file and return its TrainState."""
    generator.set_state(load_file(_state_file(folder, rank))["generator"])
    return _saved_state(folder, rank)


def _saved_state(folder: str, rank: int) -> TrainState:
    from safetensors import safe_open
    with safe_open(_state_file(folder, rank), "pt") as f:
        return TrainState.from_saved(json.loads(f.metadata()["state"]))


def saved_step(folder: str, rank: int) -> int:
    """The optimizer step a checkpoint was written at, read before anything is built to load it into."""
    return _saved_state(folder, rank).step


def save_teacher(folder: str, teacher: torch.nn.Module) -> None:
    save_file({name: p.detach().contiguous() for name, p in teacher.named_parameters()},
              os.path.join(folder, TEACHER_FILE))


def load_teacher(folder: str, teacher: torch.nn.Module) -> None:
    """Copy ``save_teacher``'s weights into ``teacher`` (the same architecture); every parameter must be there."""
    path = os.path.join(folder, TEACHER_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {folder} is inside a later distillation round but holds no "
                                f"{TEACHER_FILE}: it was not written by this version's multi-round run")
    weights, params = load_file(path), dict(teacher.named_parameters())
    if weights.keys() != params.keys():
        raise ValueError(f"{path} does not match the run's model; differing parameters: "
                         f"{sorted(weights.keys() ^ params.keys())[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])


def save_critic(folder: str, critic: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The critic's weights and buffers, and its Adam state keyed by parameter name."""
    tensors = {f"module.{k}": v.detach().contiguous() for k, v in critic.state_dict().items()}
    for name, param in critic.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"adam.{name}.{key}"] = torch.as_tensor(value).detach().contiguous()
    save_file(tensors, os.path.join(folder, CRITIC_FILE))


def load_critic(folder: str, critic: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore ``save_critic``'s file into a critic of the same shape and its optimizer."""
    path = os.path.join(folder, CRITIC_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {folder} holds no {CRITIC_FILE}: it was written by a run without "
                                "distill.adversarial; resume with the config it was written with")
    tensors = load_file(path)
    critic.load_state_dict({k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")})
    for name, param in critic.named_parameters():
        if f"adam.{name}.step" in tensors:  # Adam keeps its step count on the CPU, the moments by the weight
            optimizer.state[param] = {key: tensors[f"adam.{name}.{key}"].to(param.device if key != "step" else "cpu")
                                      for key in ADAM_STATE}


def load_ema(folder: str, ema: EMA) -> None:
    from safetensors import safe_open
    path = os.path.join(folder, "ema.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    ema.load_state_dict({"decay": float(meta["decay"]), "updates": int(meta["updates"]), "shadow": load_file(path)})


def consolidated_weights(folder: str) -> dict[str, torch.Tensor]:
    """Full float32 weights of a checkpoint: DeepSpeed's own zero_to_fp32 for ZeRO 1-3 shards;
    stage 0 keeps the whole model in mp_rank_00_model_states.pt already."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    whole_model = os.path.join(folder, DS_TAG, "mp_rank_00_model_states.pt")
    with safe_torch_load():
        if os.path.exists(whole_model):
            states = torch.load(whole_model, map_location="cpu")
            if states.get("param_shapes") is None:  # not partitioned: ZeRO stage 0
                return {k: v.float() for k, v in states["module"].items()}
        return get_fp32_state_dict_from_zero_checkpoint(folder, tag=DS_TAG)
