"""Pipeline specs: YAML -> typed, validated dataclasses (through emf_dist.config).

A spec names its steps in run order, each with a kind and that kind's config::

    name: emf
    storage: s3://bucket/emf            # steps' outputs, the step cache, run records, the lock
    vars: {dataset: s3://bucket/data}   # values for ${vars.NAME}
    steps:
      prep:     {kind: prep, config: {out: "${vars.dataset}", source: {count: 20000}}}
      pretrain: {kind: train, config: {mode: flow_matching, data: {url: "${steps.prep.out}"}}}
    job: {env_vars: [AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY]}   # how `emf submit` runs it

Steps are a mapping so that dotted overrides reach into them (``steps.pretrain.config.steps=500``).
String values may hold references, resolved just before the step runs:

    ${steps.NAME.OUTPUT}   an output of an earlier step (kinds list their outputs in steps.py)
    ${vars.NAME}           a value from ``vars``
    ${storage}             the pipeline's storage URL
    ${step.dir}            this step's own folder in storage

Secrets never belong here: a spec is copied into every run record. Name environment
variables in ``job.env_vars`` instead; `emf submit` passes their values sealed.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from emf_dist import storage
from emf_dist.config import ConfigError, load_config
from pipelines.steps import KINDS, step_config_problems

SPECS_DIR = Path(__file__).parent / "specs"
REFERENCE = re.compile(r"\$\{([^}]*)\}")
StepKind = Literal["prep", "train", "eval_encoders", "eval_benchmark", "command"]
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass
class StepSpec:
    kind: StepKind
    # The kind's config as plain YAML: PrepConfig (prep), TrainConfig (train), or the step configs in
    # pipelines/steps.py (eval_encoders, eval_benchmark, command). Strings may hold ${...} references.
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobSpec:
    """How `emf submit` runs this pipeline as one Ray job."""
    working_dir: str = "."          # uploaded to the cluster; relative to where `emf submit` runs
    excludes: list[str] = field(default_factory=lambda: [
        ".git", ".venv", "**/__pycache__", "*.egg-info", ".pytest_cache", "emf-demo", "emf-runs", "emf-data"])
    pip: list[str] = field(default_factory=list)  # extra requirements the job installs (the image holds ours)
    # NAMES of environment variables copied from the submitter's environment into the job. Their values
    # are sealed with the cluster's auth token (cluster/sealed_env.py), so no spec, log or record holds them.
    env_vars: list[str] = field(default_factory=lambda: [
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
        "AWS_DEFAULT_REGION", "WANDB_API_KEY", "HF_TOKEN"])
    entrypoint_num_cpus: float = 0.0  # reserved for the driver; the steps request their own resources
    entrypoint_num_gpus: float = 0.0


@dataclass
class PipelineSpec:
    name: str = "pipeline"
    storage: str = "emf-runs"       # local folder or s3://bucket/prefix
    vars: dict[str, Any] = field(default_factory=dict)  # a reference that is a whole string takes the value's type
    steps: dict[str, StepSpec] = field(default_factory=dict)
    job: JobSpec = field(default_factory=JobSpec)

    def validate(self) -> list[str]:
        problems = []
        if not self.steps:
            problems.append("steps: a pipeline needs at least one step")
        if not self.storage.strip():
            problems.append("storage: a local folder or s3://bucket/prefix is required")
        seen: list[str] = []
        for name, step in self.steps.items():
            if not _NAME.match(name):
                problems.append(f"steps.{name}: step names are lower-case letters, digits, '_' and '-'")
            problems += [f"steps.{name}.config: {p}" for p in self._reference_problems(step.config, seen)]
            problems += [f"steps.{name}.config.{p}" for p in step_config_problems(step.kind, step.config)]
            seen.append(name)
        bad_env = [n for n in self.job.env_vars if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", n)]
        if bad_env:
            problems.append(f"job.env_vars holds names of environment variables, not values: {bad_env}")
        return problems

    def _reference_problems(self, config: Any, earlier: list[str]) -> list[str]:
        problems = []
        for ref in references(config):
            parts = ref.split(".")
            if parts[0] == "steps":
                if len(parts) != 3 or parts[1] not in earlier:
                    problems.append(f"${{{ref}}}: not an output of an earlier step (earlier: {earlier or 'none'})")
                elif parts[2] not in (outputs := _outputs_of(self.steps[parts[1]])):
                    problems.append(f"${{{ref}}}: step {parts[1]} has no output {parts[2]!r} (it has {outputs})")
            elif parts[0] == "vars":
                if len(parts) != 2 or parts[1] not in self.vars:
                    problems.append(f"${{{ref}}}: no such var (set it with vars.{parts[-1]}=...)")
            elif ref not in ("storage", "step.dir"):
                problems.append(f"${{{ref}}}: unknown reference (use steps.NAME.OUTPUT, vars.NAME, storage, step.dir)")
        return problems


def _outputs_of(step: StepSpec) -> tuple[str, ...]:
    return KINDS[step.kind].output_names(step.config)


def references(value: Any) -> list[str]:
    """Every ${...} reference in a nested config."""
    if isinstance(value, str):
        return REFERENCE.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in references(v)]
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in references(v)]
    return []


def resolve(value: Any, lookup: dict[str, Any], keep: tuple[str, ...] = ()) -> Any:
    """Replace references by their values; a string that is exactly one reference takes the value's type."""
    if isinstance(value, str):
        whole = REFERENCE.fullmatch(value)
        if whole and whole.group(1) in lookup:
            return lookup[whole.group(1)]

        def one(match: re.Match) -> str:
            key = match.group(1)
            if key in keep:
                return match.group(0)
            if key not in lookup:
                raise ConfigError(f"${{{key}}}: no value for this reference when the step runs")
            return str(lookup[key])
        return REFERENCE.sub(one, value)
    if isinstance(value, dict):
        return {k: resolve(v, lookup, keep) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [resolve(v, lookup, keep) for v in value]
    return value


def spec_path(name_or_path: str) -> Path:
    """A spec file, or the name of a packaged one (``emf``, ``retrain``: pipelines/specs/NAME.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = SPECS_DIR / f"{name_or_path}.yaml"
    if os.sep not in name_or_path and packaged.is_file():
        return packaged
    known = sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))
    raise ConfigError(f"{name_or_path}: no such spec file, and not a packaged spec (packaged: {known})")


def load_spec(name_or_path: str, overrides: list[str] = ()) -> PipelineSpec:
    """Load, apply dotted overrides, validate the spec and every step's config (references left as text)."""
    spec = load_config(PipelineSpec, spec_path(name_or_path), list(overrides))
    if not storage.is_remote(spec.storage):
        spec.storage = storage.local_path(spec.storage)  # a job or a later run from elsewhere finds the same folder
    return spec
