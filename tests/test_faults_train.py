"""`emf train` checks that run on the driver, before Ray starts a worker: numeric ranges, damaged
init_from exports, a resumed name with another config, shard files that disagree with the
manifest; the skipped-sample count in the result; Ray's loopback flag for drivers."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from emf_app.cli import main
from emf_dist.config import load_config, to_dict
from emf_dist.errors import InputError
from emf_dist.ray_env import LOOPBACK_VAR, is_loopback, prepare_driver
from emf_dist.text_encoder import TextEncoder, TextEncoderConfig
from emf_dist.train.config import TrainConfig
from emf_dist.train.driver import TrainResult, resolve_model
from emf_dist.train.resume_check import check_resume
from tests.helpers import export_tiny


@pytest.mark.parametrize("override, words", [
    ("optim.lr=-1", "lr must be a finite number > 0"),
    ("optim.lr=.nan", "lr must be a finite number > 0"),
    ("ema_decay=2", "ema_decay must lie in [0, 1)"),
    ("optim.betas=[0.9, 1.0]", "betas must be two numbers in [0, 1)"),
    ("optim.grad_clip=0", "grad_clip must be > 0"),
    ("data.shuffle_buffer=0", "shuffle_buffer must be >= 1"),
    ("scaling.cpus_per_worker=0", "cpus_per_worker must be > 0"),
    ("faults.max_bad_steps_in_a_row=0", "max_bad_steps_in_a_row must be >= 1"),
    ("logging.every=0", "every must be >= 1"),
])
def test_numeric_ranges_fail_on_the_driver_with_exit_2(tmp_path, capsys, override, words):
    assert main(["train", f"data.url={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(TextEncoderConfig(max_length=8))


def distill_config(init_from, **overrides) -> TrainConfig:
    return load_config(TrainConfig, None, ["data.url=unused", "mode=meanflow_distill", f"init_from={init_from}",
                                           *[f"{k}={v}" for k, v in overrides.items()]])


def test_init_from_with_damaged_or_resized_weights_is_refused(tmp_path, encoder):
    good = export_tiny(tmp_path / "good", encoder)
    assert resolve_model(distill_config(good)).model.width == 32
    weights = good / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\xff" * 8
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="model.safetensors is damaged.*sha256"):
        resolve_model(distill_config(good))
    weights.write_bytes(bytes(data[:len(data) * 6 // 10]))  # truncated
    with pytest.raises(InputError, match="model.safetensors is damaged"):
        resolve_model(distill_config(good))
    resized = export_tiny(tmp_path / "resized", encoder)
    info = json.loads((resized / "emf_model.json").read_text())
    info["model"]["width"] = 64
    del info["weights"]  # an older export: shapes are checked against the model config
    (resized / "emf_model.json").write_text(json.dumps(info))
    with pytest.raises(InputError, match="does not fit the model"):
        resolve_model(distill_config(resized))


def test_init_from_whose_tensors_differ_from_the_record(tmp_path, encoder):
    model = export_tiny(tmp_path / "m", encoder)
    save_file({"x": torch.zeros(2)}, str(model / "model.safetensors"))
    info = json.loads((model / "emf_model.json").read_text())
    info["weights"]["bytes"] = os.path.getsize(model / "model.safetensors")
    (model / "emf_model.json").write_text(json.dumps(info))
    with pytest.raises(InputError, match="does not fit the shapes recorded"):
        resolve_model(distill_config(model))


def saved_run(tmp_path, cfg: TrainConfig, step: int = 10):
    folder = tmp_path / "runs" / cfg.name / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "train_config.json").write_text(json.dumps(to_dict(cfg)))


def train_config(tmp_path, *overrides) -> TrainConfig:
    return load_config(TrainConfig, None, ["data.url=unused", f"storage_path={tmp_path / 'runs'}", *overrides])


def test_resuming_a_name_with_another_model_is_refused(tmp_path, capsys):
    saved_run(tmp_path, train_config(tmp_path))
    check_resume(train_config(tmp_path, "steps=500"))  # a longer run resumes fine
    with pytest.raises(ValueError, match=r"model.width 128 -> 256.*another name="):
        check_resume(train_config(tmp_path, "model.width=256"))
    check_resume(train_config(tmp_path, "model.width=256", "name=wider"))  # a new name is a new run
    assert main(["train", "data.url=unused", f"storage_path={tmp_path / 'runs'}", "scaling.num_workers=3"]) == 2
    assert "scaling.num_workers 2 -> 3" in capsys.readouterr().err


def test_shards_that_disagree_with_the_manifest_stop_the_driver(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "000000.tar").write_bytes(b"x" * 600)  # recorded 1000 bytes: truncated to 60%
    manifest = {"format": "emf-shards", "version": 1, "encoder": {}, "text_shapes": {}, "source": {},
                "image": {"shape": [3, 32, 32]}, "shards": [{"name": "000000.tar", "samples": 10, "bytes": 1000,
                                                              "sha256": "x"}]}
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", f"data.url={data}", f"storage_path={tmp_path / 'runs'}"]) == 3
    assert "000000.tar: 600 bytes, manifest says 1000" in capsys.readouterr().err


def test_the_summary_carries_the_skipped_samples():
    result = TrainResult("ckpt", "export", {"step": 10, "skipped_samples": 7})
    assert result.skipped_samples == 7 and "skipped 7 unreadable samples: some shards are damaged" in result.summary()
    assert "skipped 0 unreadable samples;" in TrainResult("c", "e", {"step": 1}).summary()


def test_loopback_drivers_get_the_flag_ray_needs(monkeypatch):
    from ray._private import ray_constants

    assert is_loopback("127.0.0.1:6379") and is_loopback("ray://localhost:10001") and is_loopback("[::1]:6379")
    assert not is_loopback("10.0.0.5:6379") and not is_loopback("auto") and not is_loopback(None)
    monkeypatch.delenv(LOOPBACK_VAR, raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    prepare_driver("10.0.0.5:6379")
    assert LOOPBACK_VAR not in os.environ and ray_constants.ENABLE_RAY_CLUSTER
    prepare_driver("127.0.0.1:6379")
    assert os.environ[LOOPBACK_VAR] == "0" and not ray_constants.ENABLE_RAY_CLUSTER
