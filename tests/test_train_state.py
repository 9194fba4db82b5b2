"""A rank's TrainState in its checkpoint file (the JSON the old dict wrote, read back typed), and the
distillation files beside it: a later round's teacher, the adversarial critic with its Adam state."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from emf_dist.config import ConfigError
from emf_dist.critic import SceneCritic
from emf_dist.train.checkpoint import (
    load_critic,
    load_teacher,
    load_train_state,
    save_critic,
    save_teacher,
    save_train_state,
)
from emf_dist.train.setup import step_critic
from emf_dist.train.train_state import DataPosition, TrainState

# What the loop's dict of string keys wrote into state_rank<R>.safetensors before TrainState.
OLD_STATE = {"step": 6, "data": {"epoch": 1, "taken": 3}, "skipped_samples": 2, "bad_steps": 1, "attempts": 9}
TYPED = TrainState(step=6, data=DataPosition(epoch=1, taken=3), skipped_samples=2, bad_steps=1, attempts=9)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_a_checkpoint_written_by_the_dict_loop_loads_as_train_state(tmp_path):
    save_file({"generator": _generator(5).get_state()}, str(tmp_path / "state_rank1.safetensors"),
              metadata={"state": json.dumps(OLD_STATE)})
    generator = _generator(0)
    assert load_train_state(str(tmp_path), 1, generator) == TYPED
    assert torch.equal(generator.get_state(), _generator(5).get_state())


def test_train_state_writes_the_same_bytes_of_metadata_as_the_dict(tmp_path):
    save_train_state(str(tmp_path), 0, TYPED, _generator(5))
    with safe_open(str(tmp_path / "state_rank0.safetensors"), "pt") as f:
        assert f.metadata()["state"] == json.dumps(OLD_STATE)
    assert load_train_state(str(tmp_path), 0, _generator(0)) == TYPED


def test_a_fresh_state_and_a_state_with_an_unknown_key():
    assert TrainState().as_dict() == {"step": 0, "data": {"epoch": 0, "taken": 0}, "skipped_samples": 0,
                                      "bad_steps": 0, "attempts": 0}
    with pytest.raises(ConfigError, match="state.stepz"):
        TrainState.from_saved({**OLD_STATE, "stepz": 1})


def test_a_later_rounds_teacher_round_trips_and_a_missing_or_foreign_one_is_refused(tmp_path):
    teacher, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    save_teacher(str(tmp_path), teacher)
    load_teacher(str(tmp_path), other)
    assert torch.equal(other.weight, teacher.weight) and torch.equal(other.bias, teacher.bias)
    with pytest.raises(ValueError, match="does not match the run's model; differing parameters: .*0.weight"):
        load_teacher(str(tmp_path), torch.nn.Sequential(torch.nn.Linear(3, 2)))
    with pytest.raises(FileNotFoundError, match="inside a later distillation round but holds no teacher"):
        load_teacher(str(tmp_path / "empty"), other)


def test_the_critic_and_its_adam_state_round_trip_and_a_missing_one_is_refused(tmp_path):
    """A resumed critic takes the same next step as the one that was saved: weights, spectral-norm
    estimates and Adam moments all come back."""
    def critic_and_optimizer(seed):
        torch.manual_seed(seed)
        critic = SceneCritic(in_channels=3, input_size=8, text_dim=6, width=2)
        return critic, torch.optim.Adam(critic.parameters(), lr=1e-2, betas=(0.0, 0.99))

    def train_step(critic, optimizer):
        critic(torch.ones(2, 3, 8, 8), torch.ones(2, 6)).sum().backward()
        step_critic(critic, optimizer)

    saved, saved_optimizer = critic_and_optimizer(0)
    train_step(saved, saved_optimizer)
    save_critic(str(tmp_path), saved, saved_optimizer)
    resumed, resumed_optimizer = critic_and_optimizer(1)
    load_critic(str(tmp_path), resumed, resumed_optimizer)
    train_step(saved, saved_optimizer)
    train_step(resumed, resumed_optimizer)
    for (name, want), got in zip(saved.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(got, want), name
    with pytest.raises(FileNotFoundError, match="holds no critic.safetensors: it was written by a run without "
                                                "distill.adversarial"):
        load_critic(str(tmp_path / "empty"), resumed, resumed_optimizer)
