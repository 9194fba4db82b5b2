from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from emf_dist.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    non_defaults,
    parse_cli,
    save_config,
    to_dict,
    validate_config,
)


@dataclass
class SamplerCfg:
    mu: float = -0.4
    sigma: float = 1.0
    kind: Literal["lognorm", "uniform"] = "lognorm"

    def validate(self) -> list[str]:
        return [] if self.sigma > 0 else [f"sigma must be > 0, got {self.sigma}"]


@dataclass
class ModelCfg:
    depth: int = 4
    width: int = 256
    dropout: float = 0.0
    name: Optional[str] = None
    patch: tuple[int, int] = (2, 2)

    def validate(self) -> list[str]:
        problems = []
        if self.depth < 1:
            problems.append(f"depth must be >= 1, got {self.depth}")
        if self.width % 64:
            problems.append(f"width must be a multiple of 64, got {self.width}")
        return problems


@dataclass
class JobCfg:
    model: ModelCfg = field(default_factory=ModelCfg)
    sampler: SamplerCfg = field(default_factory=SamplerCfg)
    urls: list[str] = field(default_factory=list)
    scales: tuple[float, ...] = (1.0,)
    weights: dict[str, float] = field(default_factory=dict)
    use_ema: bool = True
    lr: float | None = 1e-4


@dataclass
class ModelCfgWithANewField(ModelCfg):
    ema_warmup: int = 10  # what a later release might add


@dataclass
class NewerJobCfg(JobCfg):
    model: ModelCfgWithANewField = field(default_factory=ModelCfgWithANewField)


def problems_of(exc_info) -> list[str]:
    return str(exc_info.value).splitlines()


# --- building ---------------------------------------------------------------

def test_defaults_when_empty():
    cfg = from_dict(JobCfg, {})
    assert cfg == JobCfg()
    assert cfg.model.depth == 4 and cfg.sampler.kind == "lognorm"
    assert cfg.model is not JobCfg().model  # default_factory, not shared


def test_nested_values_and_coercion():
    cfg = from_dict(JobCfg, {"model": {"depth": 8, "dropout": 1, "patch": [4, 4]},
                             "scales": [1, 2.5], "weights": {"a": 2}})
    assert cfg.model.depth == 8 and cfg.model.width == 256
    assert cfg.model.dropout == 1.0 and isinstance(cfg.model.dropout, float)
    assert cfg.model.patch == (4, 4)
    assert cfg.scales == (1.0, 2.5) and cfg.weights == {"a": 2.0}


def test_unknown_key_suggests_and_lists_valid():
    with pytest.raises(ConfigError) as ei:
        from_dict(JobCfg, {"model": {"dpth": 3}})
    msg = str(ei.value)
    assert msg.startswith("model.dpth: unknown key; did you mean 'depth'?")
    assert "valid: depth, width, dropout, name, patch" in msg


def test_unknown_key_without_close_match():
    with pytest.raises(ConfigError, match=r"^zzz: unknown key \(valid: model,"):
        from_dict(JobCfg, {"zzz": 1})


@pytest.mark.parametrize("data, expected", [
    ({"model": {"depth": "abc"}}, "model.depth: expected int, got 'abc'"),
    ({"model": {"depth": True}}, "model.depth: expected int, got True"),
    ({"model": {"depth": 2.0}}, "model.depth: expected int, got 2.0"),
    ({"model": {"depth": None}}, "model.depth: expected int, got None"),
    ({"model": {"name": 3}}, "model.name: expected str, got 3"),
    ({"use_ema": 1}, "use_ema: expected bool, got 1"),
    ({"lr": "fast"}, "lr: expected float, got 'fast'"),
    ({"model": 5}, "model: expected a mapping for ModelCfg, got 5"),
    ({"urls": "a"}, "urls: expected list[str], got 'a'"),
    ({"urls": ["a", 2]}, "urls[1]: expected str, got 2"),
    ({"model": {"patch": [1, 2, 3]}}, "model.patch: expected 2 items, got 3"),
    ({"weights": {"a": "x"}}, "weights.a: expected float, got 'x'"),
])
def test_wrong_types(data, expected):
    with pytest.raises(ConfigError) as ei:
        from_dict(JobCfg, data)
    assert problems_of(ei) == [expected]


def test_optional_accepts_none():
    cfg = from_dict(JobCfg, {"lr": None, "model": {"name": None}})
    assert cfg.lr is None and cfg.model.name is None


def test_literal_error_lists_choices():
    with pytest.raises(ConfigError) as ei:
        from_dict(JobCfg, {"sampler": {"kind": "normal"}})
    assert problems_of(ei) == [
        "sampler.kind: expected one of 'lognorm', 'uniform', got 'normal'"]


def test_all_type_errors_reported_together():
    with pytest.raises(ConfigError) as ei:
        from_dict(JobCfg, {"model": {"depth": "x", "widht": 64}, "use_ema": "no"})
    assert problems_of(ei) == [
        "model.widht: unknown key; did you mean 'width'? "
        "(valid: depth, width, dropout, name, patch)",
        "model.depth: expected int, got 'x'",
        "use_ema: expected bool, got 'no'",
    ]
    assert len(ei.value.problems) == 3


# --- overrides ----------------------------------------------------------------

def test_override_value_parsing():
    data = apply_overrides({}, [
        "model.depth=12", "sampler.mu=-0.4", "use_ema=false", "urls=[a, b]",
        "model.name=null", "lr=3e-4", "model.name2=x=y"])
    assert data == {"model": {"depth": 12, "name": None, "name2": "x=y"},
                    "sampler": {"mu": -0.4}, "use_ema": False,
                    "urls": ["a", "b"], "lr": 3e-4}
    assert isinstance(data["lr"], float)


def test_overrides_do_not_mutate_input_and_last_wins():
    base = {"model": {"depth": 2}}
    out = apply_overrides(base, ["model.depth=3", "model.depth=5"])
    assert out == {"model": {"depth": 5}} and base == {"model": {"depth": 2}}


@pytest.mark.parametrize("bad", ["model.depth", "=3", "model..depth=3", "model.=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, [bad])


def test_override_through_scalar_is_error():
    with pytest.raises(ConfigError, match="model.depth.x: cannot set, model.depth is not a mapping"):
        apply_overrides({"model": {"depth": 2}}, ["model.depth.x=1"])


# --- files, validation --------------------------------------------------------

def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_yaml_then_overrides_precedence(tmp_path):
    p = write(tmp_path, "model:\n  depth: 6\n  width: 128\nlr: 1e-3\n")
    cfg = load_config(JobCfg, p, ["model.width=512"])
    assert cfg.model.depth == 6          # from YAML
    assert cfg.model.width == 512        # override beats YAML
    assert cfg.model.dropout == 0.0      # default
    assert cfg.lr == pytest.approx(1e-3)  # 1e-3 is a float, not a string


def test_validate_messages_with_paths_and_collected(tmp_path):
    p = write(tmp_path, "model:\n  depth: 0\n  width: 100\nsampler:\n  sigma: -1\n")
    with pytest.raises(ConfigError) as ei:
        load_config(JobCfg, p, ["use_ema=maybe"])
    assert sorted(problems_of(ei)) == sorted([
        "model: depth must be >= 1, got 0",
        "model: width must be a multiple of 64, got 100",
        "sampler: sigma must be > 0, got -1.0",
        "use_ema: expected bool, got 'maybe'",
    ])


def test_from_dict_does_not_validate_but_validate_config_does():
    cfg = from_dict(JobCfg, {"model": {"depth": 0}})
    assert cfg.model.depth == 0
    with pytest.raises(ConfigError, match="model: depth must be >= 1"):
        validate_config(cfg)


def test_round_trip(tmp_path):
    cfg = from_dict(JobCfg, {"model": {"depth": 8, "name": "dit", "patch": [1, 2]},
                             "urls": ["s3://x"], "scales": [0.5, 2.0],
                             "weights": {"a": 0.25}, "lr": None})
    plain = to_dict(cfg)
    assert plain["model"]["patch"] == [1, 2] and plain["scales"] == [0.5, 2.0]
    assert from_dict(JobCfg, plain) == cfg
    out = tmp_path / "sub" / "saved.yaml"
    save_config(cfg, out)
    assert out.read_text().startswith("model:\n  depth: 8\n")  # field order kept
    assert load_config(JobCfg, out) == cfg


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: cannot read config file")):
        load_config(JobCfg, missing)


def test_bad_yaml_and_non_mapping(tmp_path):
    p = write(tmp_path, "model: [1, 2\n")
    with pytest.raises(ConfigError, match=re.escape(f"{p}: invalid YAML")):
        load_config(JobCfg, p)
    p = write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping, got list"):
        load_config(JobCfg, p)


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(JobCfg, write(tmp_path, "")) == JobCfg()


def test_parse_cli(tmp_path):
    p = write(tmp_path, "model:\n  depth: 6\n")
    cfg = parse_cli(JobCfg, [str(p), "model.depth=7", "urls=[u]"])
    assert cfg.model.depth == 7 and cfg.urls == ["u"]
    assert parse_cli(JobCfg, ["model.depth=9"]).model.depth == 9
    assert parse_cli(JobCfg, []) == JobCfg()


@dataclass
class Required:
    name: str
    n: int | str = 1


def test_missing_required_and_multi_union():
    with pytest.raises(ConfigError, match="^name: missing required value$"):
        from_dict(Required, {})
    assert from_dict(Required, {"name": "a", "n": "all"}).n == "all"
    with pytest.raises(ConfigError, match=r"n: expected int \| str, got 1.5"):
        from_dict(Required, {"name": "a", "n": 1.5})


@dataclass
class _Inner:
    a: int = 1
    b: str = "x"


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=lambda: _Inner(a=5, b="job default"))


def test_partial_override_keeps_the_fields_own_default_instance():
    cfg = load_config(_Outer, None, ["inner.a=7"])
    assert cfg.inner == _Inner(a=7, b="job default")


@dataclass
class _Other:
    c: str
    a: int = 0


@dataclass
class _Either:
    inner: _Inner | _Other = field(default_factory=lambda: _Inner(a=5, b="job default"))


def test_a_union_field_takes_another_alternative_whole_and_overrides_its_default_partially():
    assert load_config(_Either, None, ["inner.a=7"]).inner == _Inner(a=7, b="job default")
    assert from_dict(_Either, {"inner": {"c": "other"}}).inner == _Other(c="other")


def test_non_defaults_keeps_only_what_differs_so_a_new_field_leaves_it_unchanged():
    job = from_dict(JobCfg, {"model": {"depth": 6, "width": 256}, "sampler": {}, "lr": 1e-4, "urls": ["a"]})
    assert non_defaults(job) == {"model": {"depth": 6}, "urls": ["a"]}
    assert non_defaults(JobCfg()) == {}
    assert non_defaults(from_dict(NewerJobCfg, {"model": {"depth": 6}, "urls": ["a"]})) == non_defaults(job)
    assert non_defaults(from_dict(NewerJobCfg, {"model": {"depth": 6, "ema_warmup": 3}}))["model"] == {
        "depth": 6, "ema_warmup": 3}
