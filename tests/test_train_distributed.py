"""Distributed training on real Ray workers with real DeepSpeed engines, on shards from `emf prep`.

One local Ray instance and one prepared dataset serve the whole module (starting either is
the slow part on a 2-core machine); every run is 2 workers on gloo with a tiny model.
"""
from __future__ import annotations

import glob
import os
from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from emf_dist.config import from_dict
from emf_dist.export import load_model
from emf_dist.model import VelocityNet
from emf_dist.storage import Store
from emf_dist.train.checkpoint import CRITIC_FILE, TEACHER_FILE, consolidated_weights
from emf_dist.train.config import TrainConfig
from emf_dist.train.driver import train
from emf_dist.train.local import train_local
from emf_dist.train.loss_curve import read_history
from emf_dist.train.setup import build_batches, build_critic, build_model, build_objective
from tests.s3_server import s3_server

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


SECRET = "train-s3-secret-never-stored-7Qx"


@pytest.fixture(scope="module")
def s3():
    """A real S3 API server on 127.0.0.1; started before Ray so that workers inherit its endpoint."""
    with s3_server("emf-train", SECRET) as fs:
        yield fs


@pytest.fixture(scope="module")
def ray_session(s3):
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(ray_session, tmp_path_factory):
    from data_prep.config import PrepConfig
    from data_prep.job import run_prep
    out = str(tmp_path_factory.mktemp("shards"))
    cfg = from_dict(PrepConfig, {"out": out, "samples_per_shard": 32, "source": {"count": 96},
                                 "encoder": {"max_length": 8}, "progress": False}, validate=True)
    run_prep(cfg, echo=lambda _: None)
    return out


def run_config(dataset: str, storage: str, name: str, **over) -> TrainConfig:
    base = {"name": name, "storage_path": storage, "steps": 4, "micro_batch": 4, "checkpoint_every": 2,
            "encoder": {"max_length": 8}, "data": {"url": dataset, "loader_workers": 0, "shuffle_buffer": 8},
            "model": {"width": 32, "depth": 2, "heads": 2},
            "optim": {"lr": 1e-3, "warmup_steps": 1},
            "objective": {"time": {"r_neq_t": 0.5, "r_neq_t_end": 0.5}},
            "logging": {"every": 2, "wandb": "disabled"}, "zero": {"stage": 2}}
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            base.setdefault(section, {})[field] = value
        else:
            base[key] = value
    return from_dict(TrainConfig, base, validate=True)


@pytest.fixture(scope="module")
def zero2(dataset, tmp_path_factory):
    """The module's reference run: ZeRO-2 on two workers, sample grids, and one NaN loss (the second
    micro-batch's) that every rank skips. The resume test continues a run of this same config."""
    storage = tmp_path_factory.mktemp("zero2")
    return storage, train(zero2_config(dataset, storage, "zero2"))


def zero2_config(dataset, storage, name: str, **over) -> TrainConfig:
    return run_config(dataset, str(storage), name, logging__sample_every=2, faults__nan_at_micro_batches=(1,), **over)


def test_two_workers_zero2_agree_checkpoint_and_skip_a_nan_loss(dataset, zero2):
    storage, result = zero2
    assert result.metrics["step"] == 4 and result.metrics["bad_steps"] == 1
    assert torch.isfinite(torch.tensor(result.metrics["loss"]))
    assert result.metrics["rank_param_spread"] == 0.0  # every rank holds the same weights
    steps = sorted(os.path.basename(p) for p in glob.glob(str(storage / "zero2" / "step_*")))
    assert steps == ["step_00000002", "step_00000004"]
    last = storage / "zero2" / "step_00000004"
    assert {"state_rank0.safetensors", "state_rank1.safetensors", "ema.safetensors"} <= set(os.listdir(last))
    # DeepSpeed's own zero_to_fp32 reads our checkpoint into a loadable state dict.
    weights = consolidated_weights(str(last))
    model = VelocityNet(run_config(dataset, str(storage), "zero2").model)
    model.load_state_dict(weights)
    assert (storage / "zero2" / "samples" / "step_00000004.png").exists()
    exported = load_file(str(storage / "zero2" / "export" / "model.safetensors"))
    assert exported.keys() == weights.keys()


def test_resume_equals_uninterrupted_run(dataset, zero2, tmp_path):
    storage, straight = zero2
    train(zero2_config(dataset, tmp_path, "resumed", stop_after=2))
    resumed = train(zero2_config(dataset, tmp_path, "resumed"))
    assert resumed.metrics["step"] == 4 and resumed.metrics["bad_steps"] == 1  # the skip is not repeated
    a = consolidated_weights(straight.checkpoint)
    b = consolidated_weights(resumed.checkpoint)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    # The loss curve of the resumed run is the uninterrupted one's: each step once, same losses.
    curves = [read_history(Store(str(folder))) for folder in (storage / "zero2", tmp_path / "resumed")]
    assert [row["step"] for row in curves[1]] == [2, 4]
    assert [row["loss"] for row in curves[1]] == pytest.approx([row["loss"] for row in curves[0]], abs=1e-5)
    assert Image.open(tmp_path / "resumed" / "loss.png").size[0] > 0


def test_killed_worker_is_replaced_and_the_run_finishes(dataset, tmp_path):
    result = train(run_config(dataset, str(tmp_path), "faulty", faults__kill_rank=1, faults__kill_at_step=3,
                              faults__max_failures=1))
    assert result.metrics["step"] == 4
    assert (tmp_path / "faulty" / ".fault_injected_rank1").exists()


# Three of each rank's four rows per step r != t: the hand-written JVP pass runs at every step, beside
# flow-matching rows.
MOSTLY_JVP = dict(objective__time={"r_neq_t": 0.75, "r_neq_t_end": 0.75}, steps=3, checkpoint_every=3)


@pytest.fixture(scope="module")
def zero0(dataset, tmp_path_factory):
    """Two ZeRO-0 workers: the reference of the ZeRO-3 run and the local loop's counterpart."""
    cfg = run_config(dataset, str(tmp_path_factory.mktemp("z0")), "z0", zero__stage=0, **MOSTLY_JVP)
    return cfg, train(cfg)


def test_zero3_meanflow_step_matches_zero0(dataset, zero0, tmp_path):
    """Every step runs the hand-written JVP pass on ZeRO-3's partitioned parameters, gathered piece
    by piece. (Forward-mode AD through ZeRO-3's hooked modules, the backbones' path, is held to
    ZeRO-0 in tests/test_pretrained_distributed.py.)"""
    zero0 = zero0[1]
    zero3 = train(run_config(dataset, str(tmp_path), "z3", zero__stage=3, **MOSTLY_JVP))
    a, b = consolidated_weights(zero0.checkpoint), consolidated_weights(zero3.checkpoint)
    for name in a:  # float32 sums reduced in a different order: agreement to ~1e-6 after 3 Adam steps
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    # ZeRO-0 reports the norm itself (DeepSpeed keeps it only in its ZeRO optimizers): the same value
    assert zero0.metrics["grad_norm"] > 0
    assert zero0.metrics["grad_norm"] == pytest.approx(zero3.metrics["grad_norm"], rel=1e-3)


def test_single_process_loop_equals_two_zero0_workers(zero0):
    """The local loop is the reference: the same TrainConfig, the workers' batch streams, the same
    parameters after a few MeanFlow steps (JVP rows, text dropout, clipping, warm-up included)."""
    cfg, result = zero0
    distributed = consolidated_weights(result.checkpoint)
    model = build_model(cfg, None)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    streams = [build_batches(cfg, rank, cfg.scaling.num_workers) for rank in range(cfg.scaling.num_workers)]
    train_local(model, build_objective(cfg, None), streams, cfg)
    moved = max(float((p.detach() - initial[name]).abs().max()) for name, p in model.named_parameters())
    assert moved > 1e-3  # three Adam steps at lr 1e-3 move the weights: the comparison is not trivial
    for name, param in model.named_parameters():  # float32 all-reduce vs local sum: ~1e-7 apart
        torch.testing.assert_close(param.detach(), distributed[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("adversarial", [0.0, 0.5])
def test_distillation_rounds_in_one_run_equal_chained_runs_and_resume_inside_a_round(dataset, zero0, tmp_path,
                                                                                     adversarial):
    """Two rounds in one worker group, stopped inside the second round and resumed, against the local
    loop run round by round: each round from the one before's EMA weights, which are also its teacher.
    With a critic (distill.adversarial), it is one for the whole run, replicated on both ranks, and the
    checkpoint carries it and its optimizer across the stop."""
    start = zero0[1].export
    cfg = run_config(dataset, str(tmp_path), "rounds", mode="meanflow_distill", init_from=start, steps=4,
                     checkpoint_every=1, distill={"teacher_steps": 2, "rounds": 2, "adversarial": adversarial})
    train(replace(cfg, stop_after=3))
    run = tmp_path / "rounds"
    assert not (run / "step_00000002" / TEACHER_FILE).exists()  # the first round's teacher is the export
    assert (run / "step_00000003" / TEACHER_FILE).exists()
    assert (run / "step_00000003" / CRITIC_FILE).exists() == bool(adversarial)
    result = train(cfg)
    assert result.metrics["step"] == 4
    assert ("critic_loss" in result.metrics) == bool(adversarial)

    teacher, _ = load_model(start)
    initial = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    critic = build_critic(cfg, teacher)
    for index in range(cfg.distill.rounds):  # the oracle: one-round runs chained
        round_cfg = cfg.distill_round(index)
        streams = [build_batches(round_cfg, rank, cfg.scaling.num_workers) for rank in range(cfg.scaling.num_workers)]
        student = build_model(round_cfg, teacher)
        objective = build_objective(round_cfg, teacher.eval().requires_grad_(False), critic=critic)
        trained = train_local(student, objective, streams, round_cfg)
        trained["ema"].copy_to(teacher)
    exported = load_file(str(run / "export" / "model.safetensors"))
    moved = max(float((p.detach() - initial[name]).abs().max()) for name, p in teacher.named_parameters())
    assert moved > 1e-4  # the comparison is not trivial
    for name, param in teacher.named_parameters():  # ZeRO-2's reduce-scatter vs a local sum: ~1e-7 apart
        torch.testing.assert_close(exported[name], param.detach(), rtol=1e-4, atol=1e-6, msg=name)


def test_nan_losses_in_a_row_stop_the_run_and_keep_the_last_checkpoint(dataset, tmp_path):
    with pytest.raises(Exception, match="non-finite losses in a row"):
        train(run_config(dataset, str(tmp_path), "nan-many", faults__nan_at_micro_batches=(2, 3, 4),
                         faults__max_bad_steps_in_a_row=3))
    # The checkpoint before the failure is intact and loadable.
    consolidated_weights(str(tmp_path / "nan-many" / "step_00000002"))


def test_shards_and_checkpoints_on_s3(dataset, s3, tmp_path):
    s3.put(dataset, "emf-train/shards", recursive=True)
    result = train(run_config("s3://emf-train/shards", "s3://emf-train/runs", "on-s3", steps=2))
    assert result.metrics["step"] == 2
    run = "emf-train/runs/on-s3"
    assert s3.exists(f"{run}/step_00000002/ds") and s3.exists(f"{run}/export/model.safetensors")
    # Credentials come from the environment and are written nowhere.
    for path in s3.find(run):
        assert SECRET.encode() not in s3.cat_file(path), path
