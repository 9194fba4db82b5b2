"""Training config mistakes are clear errors on the driver, before Ray starts any worker."""
from __future__ import annotations

from dataclasses import replace

import pytest

from emf_app.cli import main
from emf_dist.config import ConfigError, from_dict
from emf_dist.manifest import ImageSpec, Manifest, ShardEntry, check_compatible, read_manifest
from emf_dist.text_encoder import TextEncoder, TextEncoderConfig
from emf_dist.train.config import TrainConfig
from emf_dist.train.driver import check_data
from emf_dist.train.engine import deepspeed_config


def write_manifest(folder, encoder_fingerprint: dict, tokens=(8, 384), image=(3, 32, 32)) -> str:
    manifest = Manifest(version=1, shards=[ShardEntry("000000.tar", 4, 100, "0" * 64)], encoder=encoder_fingerprint,
                        image=ImageSpec(kind="png", resolution=image[1], shape=list(image)),
                        text_shapes={"tokens": list(tokens), "mask": [tokens[0]], "pooled": [tokens[1]]},
                        source={"kind": "scenes"})
    (folder / "manifest.json").write_text(manifest.to_json())
    (folder / "000000.tar").write_bytes(b"\0" * 100)  # the driver compares shard sizes with the manifest
    return str(folder)


def config(**over) -> TrainConfig:
    base = {"data": {"url": "/nowhere"}, "encoder": {"max_length": 8}}
    base.update(over)
    return from_dict(TrainConfig, base, validate=True)


def test_unknown_keys_and_bad_values_are_reported_together():
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, {"data": {"url": "x"}, "zero": {"stag": 2}, "micro_batch": "four"}, validate=True)
    text = str(err.value)
    assert "zero.stag" in text and "stage" in text  # the unknown key, with a suggestion
    assert "micro_batch" in text


def test_impossible_batch_arithmetic_and_fault_options_are_refused():
    with pytest.raises(ConfigError, match="samples_per_epoch 4 is smaller"):
        config(micro_batch=4, grad_accum=2, data={"url": "x", "samples_per_epoch": 4})
    with pytest.raises(ConfigError, match="kill_rank 2 >= scaling.num_workers 2"):
        config(faults={"kill_rank": 2, "kill_at_step": 1, "max_failures": 1})
    with pytest.raises(ConfigError, match="needs init_from: a flow-matching"):
        config(mode="meanflow_finetune")
    with pytest.raises(ConfigError, match="needs init_from: a MeanFlow"):
        config(mode="meanflow_distill")
    with pytest.raises(ConfigError, match="distill: teacher_steps must be >= 2"):
        config(mode="meanflow_distill", init_from="x", distill={"teacher_steps": 1})
    with pytest.raises(ConfigError, match="distill.rounds 2 splits .* needs mode meanflow_distill"):
        config(distill={"rounds": 2})
    with pytest.raises(ConfigError, match=r"distill.rounds 2 splits .* \(got 5\)"):
        config(mode="meanflow_distill", init_from="x", steps=5, distill={"rounds": 2})
    with pytest.raises(ConfigError, match="rounds must be >= 1"):
        config(mode="meanflow_distill", init_from="x", distill={"rounds": 0})
    with pytest.raises(ConfigError, match=r"distill.adversarial trains a critic .*\(mode is meanflow_finetune\)"):
        config(mode="meanflow_finetune", init_from="x", distill={"adversarial": 0.05})
    with pytest.raises(ConfigError, match="critic_lr > 0"):
        config(mode="meanflow_distill", init_from="x", distill={"adversarial": 0.05, "critic_lr": 0.0})
    with pytest.raises(ConfigError, match="velocity: teacher takes the fine-tuning parent"):
        config(objective={"velocity": "teacher"})
    with pytest.raises(ConfigError, match="only used with data.loader_workers: 0"):
        config(data={"url": "x", "cache_mib": 256, "loader_workers": 2})
    with pytest.raises(ConfigError, match="jvp: fused reads whole weights .* ZeRO-3 partitions them"):
        config(zero={"stage": 3}, objective={"jvp": "fused"})
    with pytest.raises(ConfigError, match="identity: lagrangian .* ZeRO-3"):
        config(zero={"stage": 3}, objective={"identity": "lagrangian"})
    with pytest.raises(ConfigError, match="jvp: fused has none"):
        config(objective={"jvp": "fused", "jvp_chunk": 4})


def test_encoder_fingerprint_mismatch_names_both_sides(tmp_path):
    fingerprint = TextEncoder(TextEncoderConfig(max_length=16)).fingerprint()
    url = write_manifest(tmp_path, fingerprint, tokens=(16, 384))
    with pytest.raises(ValueError, match=r"max_length 16 != 8"):
        check_data(config(data={"url": url}))


def test_shape_mismatch_between_shards_and_model(tmp_path):
    fingerprint = TextEncoder(TextEncoderConfig(max_length=8)).fingerprint()
    url = write_manifest(tmp_path, fingerprint, image=(3, 64, 64))
    with pytest.raises(ValueError, match=r"images/latents are \[3, 64, 64\] but the model takes \[3, 32, 32\]"):
        check_data(config(data={"url": url}))
    # A backbone with pooled text (SD3) checks the pooled width too; None: not checked.
    manifest = read_manifest(url)
    check_compatible(manifest, text_dim=384, text_length=8, in_channels=3, input_size=64, where=url, pooled_dim=None)
    with pytest.raises(ValueError, match=r"pooled vectors are \[384\] but the model takes \[16\]"):
        check_compatible(manifest, text_dim=384, text_length=8, in_channels=3, input_size=64, where=url, pooled_dim=16)


def test_missing_manifest_is_a_clear_cli_error(tmp_path, capsys):
    code = main(["train", f"data.url={tmp_path}", "encoder.max_length=8"])
    assert code == 3  # input/data
    assert "no manifest.json" in capsys.readouterr().err


def test_deepspeed_config_batch_arithmetic_and_zero3_linear():
    cfg = config(micro_batch=4, grad_accum=3, zero={"stage": 3})
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 24 == ds["train_micro_batch_size_per_gpu"] * 3 * 2
    assert ds["zero_optimization"]["memory_efficient_linear"] is False  # no jvp rule in DeepSpeed's linear


def test_learning_rate_schedule_warms_up_then_decays():
    cfg = config(steps=110, optim={"warmup_steps": 10, "decay": "cosine", "min_lr_ratio": 0.1})
    assert cfg.optim.lr_factor(0, cfg.steps) == pytest.approx(0.1)
    assert cfg.optim.lr_factor(9, cfg.steps) == pytest.approx(1.0)
    assert cfg.optim.lr_factor(60, cfg.steps) == pytest.approx(0.55)
    assert cfg.optim.lr_factor(110, cfg.steps) == pytest.approx(0.1)


@pytest.mark.parametrize("mode, export_embedding, message", [
    ("meanflow_finetune", "dual", "already a MeanFlow model"),
    ("meanflow_distill", "single", "needs a MeanFlow export"),
])
def test_a_run_from_the_wrong_kind_of_export_is_refused_on_the_driver(tmp_path, mode, export_embedding, message):
    from emf_dist.export import ExportInfo, SamplingInfo, export_model
    from emf_dist.model import ModelConfig, VelocityNet
    from emf_dist.train.driver import resolve_model
    model_cfg = ModelConfig(input_size=8, patch_size=2, width=32, depth=1, heads=2, text_dim=384,
                            time_embedding=export_embedding)
    info = ExportInfo(model=model_cfg, text_encoder=TextEncoderConfig(max_length=8), encoder_fingerprint={},
                      sampling=SamplingInfo(mean_flow=export_embedding == "dual"))
    folder = export_model(VelocityNet(model_cfg), info, str(tmp_path / "export"))
    with pytest.raises(ValueError, match=message):
        resolve_model(config(mode=mode, init_from=folder))
    other = "meanflow_distill" if mode == "meanflow_finetune" else "meanflow_finetune"
    resolved = resolve_model(config(mode=other, init_from=folder)).model  # the export's architecture, as MeanFlow
    assert resolved == replace(model_cfg, time_embedding="dual", checkpointing=TrainConfig().model.checkpointing)


def test_the_fine_tune_converts_by_its_model_time_embedding(tmp_path):
    """EMF's dual embedding by default, the decoupled one on request (checked against the export's depth),
    distillation keeps a decoupled export's; a single-embedding fine-tune is refused before any work."""
    from emf_dist.export import ExportInfo, SamplingInfo, export_model
    from emf_dist.model import ModelConfig, VelocityNet
    from emf_dist.train.driver import resolve_model
    parent = ModelConfig(input_size=8, patch_size=2, width=32, depth=3, heads=2, text_dim=384, time_embedding="single")
    info = ExportInfo(model=parent, text_encoder=TextEncoderConfig(max_length=8), encoder_fingerprint={},
                      sampling=SamplingInfo(mean_flow=False))
    folder = export_model(VelocityNet(parent), info, str(tmp_path / "fm"))
    decoupled = {"time_embedding": "decoupled", "decoder_depth": 1}
    resolved = resolve_model(config(mode="meanflow_finetune", init_from=folder, model=decoupled)).model
    assert (resolved.time_embedding, resolved.decoder_depth, resolved.depth) == ("decoupled", 1, 3)
    with pytest.raises(ValueError, match=r"depth 3.*decoder_depth"):
        resolve_model(config(mode="meanflow_finetune", init_from=folder, model={**decoupled, "decoder_depth": 4}))
    with pytest.raises(ConfigError, match="model.time_embedding is the conversion"):
        config(mode="meanflow_finetune", init_from=folder, model={"time_embedding": "single"})

    mf = replace(parent, time_embedding="decoupled", decoder_depth=1)
    mf_folder = export_model(VelocityNet(mf), replace(info, model=mf, sampling=SamplingInfo(mean_flow=True)),
                             str(tmp_path / "mf"))
    assert resolve_model(config(mode="meanflow_distill", init_from=mf_folder)).model == replace(
        mf, checkpointing=TrainConfig().model.checkpointing)


def test_distillation_rounds_guide_only_the_first_teacher():
    """A later round's teacher is the guided student already: guiding it again would compound the scale."""
    cfg = config(mode="meanflow_distill", init_from="/nowhere/export", steps=600, seed=4,
                 distill={"rounds": 3, "guidance": 1.5})
    rounds = [cfg.distill_round(index) for index in range(3)]
    assert [r.distill.guidance for r in rounds] == [1.5, 1.0, 1.0]
    assert [(r.seed, r.steps, r.distill.rounds) for r in rounds] == [(4, 200, 1), (5, 200, 1), (6, 200, 1)]
    assert "guidance" in str(pytest.raises(ConfigError, config, mode="meanflow_distill", init_from="/nowhere/export",
                                           distill={"guidance": 0.0}).value)
