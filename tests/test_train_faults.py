"""Fault injection is planned once per rank, and absent where the rank injects nothing."""
from __future__ import annotations

import pytest

from emf_dist.config import from_dict
from emf_dist.train.config import TrainConfig
from emf_dist.train.faults import fault_injector


def config(tmp_path, **faults) -> TrainConfig:
    return from_dict(TrainConfig, {"name": "run", "storage_path": str(tmp_path), "data": {"url": "/nowhere"},
                                   "faults": faults})


class Exited(Exception):
    pass


def test_an_ordinary_run_has_no_injector_on_any_rank(tmp_path):
    assert fault_injector(config(tmp_path), 0) is None
    assert fault_injector(config(tmp_path), 1) is None


def test_only_rank_0_reads_nan_at_the_configured_attempts(tmp_path):
    cfg = config(tmp_path, nan_at_micro_batches=(1, 3))
    assert fault_injector(cfg, 1) is None
    injector = fault_injector(cfg, 0)
    assert [injector.poisons(attempt) for attempt in range(5)] == [False, True, False, True, False]
    injector.after_step(1)  # kills nothing


def test_the_killed_rank_exits_once_per_run(tmp_path, monkeypatch):
    def exit_(code):
        raise Exited(code)

    monkeypatch.setattr("emf_dist.train.faults.os._exit", exit_)
    cfg = config(tmp_path, kill_rank=1, kill_at_step=3, max_failures=1)
    assert fault_injector(cfg, 0) is None
    injector = fault_injector(cfg, 1)
    assert not injector.poisons(0)
    injector.after_step(2)
    with pytest.raises(Exited):
        injector.after_step(3)
    assert (tmp_path / "run" / ".fault_injected_rank1").read_bytes() == b"killed"
    fault_injector(cfg, 1).after_step(3)  # the replacement worker finds the marker and goes on
