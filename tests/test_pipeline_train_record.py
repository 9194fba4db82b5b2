"""A training step's run record holds the config that trains: a fine-tune or distillation takes
its architecture from init_from (emf_dist/train/driver.py resolve_model), and the record, the
config handed to training and a cached rerun's record all show that architecture, not the
config's default model section. Training itself is replaced by a stub here."""
from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from emf_dist.export import ExportInfo, SamplingInfo, export_model
from emf_dist.model import ModelConfig, VelocityNet
from emf_dist.text_encoder import TextEncoderConfig
from emf_dist.train import driver
from emf_dist.train.config import TrainConfig
from pipelines.run import run_pipeline
from pipelines.spec import load_spec

PARENT = {"single": ModelConfig(input_size=8, patch_size=2, width=32, depth=1, heads=2, prediction="data",
                                time_embedding="single"),
          "dual": ModelConfig(input_size=8, patch_size=4, width=32, depth=2, heads=2, time_embedding="dual")}


def parent_export(folder, embedding: str) -> str:
    model = PARENT[embedding]
    info = ExportInfo(model=model, text_encoder=TextEncoderConfig(max_length=8), encoder_fingerprint={},
                      sampling=SamplingInfo(mean_flow=embedding == "dual"))
    return export_model(VelocityNet(model), info, str(folder))


@pytest.fixture
def trained(monkeypatch, tmp_path) -> list[TrainConfig]:
    """Stub training: remembers the config it was handed and writes an empty export."""
    seen = []

    def train(cfg: TrainConfig) -> driver.TrainResult:
        seen.append(cfg)
        export = tmp_path / "exports" / cfg.name
        export.mkdir(parents=True)
        return driver.TrainResult(checkpoint=str(export), export=str(export), metrics={})

    monkeypatch.setattr(driver, "train", train)
    return seen


@pytest.mark.parametrize("mode, embedding", [("meanflow_finetune", "single"), ("meanflow_distill", "dual")])
def test_a_training_steps_record_shows_the_architecture_it_inherits(tmp_path, trained, mode, embedding):
    data = tmp_path / "shards"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    step = {"kind": "train", "config": {"mode": mode, "init_from": parent_export(tmp_path / "parent", embedding),
                                        "data": {"url": str(data)}, "encoder": {"max_length": 8},
                                        "model": {"checkpointing": False}}}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"name": "t", "storage": str(tmp_path / "runs"), "steps": {"tune": step}}))
    spec = load_spec(str(spec_file))
    expected = asdict(replace(PARENT[embedding], time_embedding="dual", checkpointing=False))
    assert expected != asdict(TrainConfig().model)  # the default would not pass for the parent's

    first = run_pipeline(spec, echo=lambda line: None)
    assert asdict(trained[0].model) == expected  # what training was handed
    assert driver.resolve_model(trained[0]) == trained[0]  # train() resolves once more: a no-op
    on_disk = json.loads((tmp_path / "runs" / "runs" / f"{first.run_id}.json").read_text())
    assert on_disk["steps"][0]["config"]["model"] == expected

    second = run_pipeline(spec, echo=lambda line: None)
    assert second.steps[0].status == "cached" and len(trained) == 1
    assert second.steps[0].config["model"] == expected
