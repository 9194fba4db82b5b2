"""The step kinds a pipeline can run, each a thin adapter over an existing entry point.

    prep            data_prep.job.run_prep(PrepConfig)             outputs: out, manifest_version
    train           emf_dist.train.driver.train(TrainConfig)       outputs: export, checkpoint, run
    eval_encoders   `emf eval encoders` (emf_app.cli.main)         outputs: report, metrics, selected
    eval_benchmark  `emf eval benchmark` (emf_app.cli.main)        outputs: report, metrics, model
    command         any program (argv, no shell)                   outputs: dir + the ones it declares

A kind says which URLs in its config are its inputs (their content identity goes into the
step's fingerprint, see run.py), where its outputs go by default (the step's own folder), and
how to run. Each kind calls the library function its `emf` command calls, so a step and the
command behave alike; pipelines sit below the command line and never call it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable

from emf_dist import storage
from emf_dist.config import ConfigError, from_dict

INFO_FILES = ("manifest.json", "emf_model.json")  # the files that say what a dataset / model folder holds


class StepFailed(RuntimeError):
    pass


@dataclass
class StepContext:
    name: str                       # the step's name in the spec
    dir: str                        # the step's own folder (URL)
    echo: Callable[[str], None] = print


@dataclass
class EncoderEvalStepConfig:
    eval: dict[str, Any] = field(default_factory=dict)  # EncoderEvalConfig fields (emf_dist/eval/encoder_config.py)
    device: str = "cpu"
    out: str = ""                   # report folder (default: the step's folder)
    # EMF chooses the encoder before any fine-tuning: stop the pipeline when no candidate passes.
    require_selection: bool = True


@dataclass
class BenchmarkStepConfig:
    model: str = ""                 # exported model folder or URL, e.g. ${steps.finetune.export}
    baseline: str = ""              # optional second model, e.g. the flow-matching parent
    eval: dict[str, Any] = field(default_factory=dict)  # EvalConfig fields (emf_dist/eval/run.py)
    out: str = ""                   # report folder (default: the step's folder)

    def validate(self) -> list[str]:
        return [] if self.model else ["model is required: an exported model folder"]


@dataclass
class CommandStepConfig:
    argv: list[str] = field(default_factory=list)  # the program and its arguments; EMF_STEP_DIR holds step.dir
    inputs: list[str] = field(default_factory=list)  # URLs whose content is part of the fingerprint
    outputs: dict[str, str] = field(default_factory=dict)  # named outputs for later steps (may use ${step.dir})

    def validate(self) -> list[str]:
        return [] if self.argv else ["argv is required"]


class Kind:
    outputs: tuple[str, ...] = ()
    url_outputs: tuple[str, ...] = ()  # must still exist for a cached result to be reused
    incremental = False                # runs every time (it skips finished work itself); stable folder

    def parse(self, raw: dict) -> Any:
        raise NotImplementedError

    def output_names(self, raw: dict) -> tuple[str, ...]:
        return self.outputs

    def inputs(self, cfg) -> list[str]:
        return []

    def defaults(self, step_dir: str, name: str) -> dict:
        return {"out": step_dir}

    def resolved(self, cfg) -> Any:
        """The config as the step will run it, for the run record: what its entry point derives
        from the config before running (nothing, for most kinds)."""
        return cfg

    def run(self, cfg, ctx: StepContext) -> dict[str, Any]:
        raise NotImplementedError


class PrepKind(Kind):
    """Appending is prep's own job: it lists the source, finds nothing new in a second and returns
    without starting Ray, so the pipeline always asks it. Later steps see the dataset's manifest
    (its content identity) change only when prep wrote a new version."""
    outputs = ("out", "manifest_version")
    incremental = True

    def parse(self, raw: dict):
        from data_prep.config import PrepConfig
        return from_dict(PrepConfig, raw, validate=True)

    def run(self, cfg, ctx: StepContext) -> dict[str, Any]:
        from data_prep.job import run_prep
        join_cluster_if_in_job()
        summary = run_prep(cfg, echo=ctx.echo)
        return {"out": cfg.out, "manifest_version": summary.version}


class TrainKind(Kind):
    outputs = ("export", "checkpoint", "run")
    url_outputs = ("export",)

    def parse(self, raw: dict):
        from emf_dist.train.config import TrainConfig
        return from_dict(TrainConfig, raw, validate=True)

    def inputs(self, cfg) -> list[str]:
        return [cfg.data.url] + ([cfg.init_from] if cfg.init_from else [])

    def defaults(self, step_dir: str, name: str) -> dict:
        # A folder per fingerprint: a changed config trains afresh, a rerun of a failed step resumes
        # from its checkpoints (Ray Train resumes a run with the same storage_path and name).
        return {"storage_path": step_dir, "name": name}

    def resolved(self, cfg):
        # A fine-tune or distillation trains init_from's architecture, not the config's model section.
        from emf_dist.train.driver import resolve_model
        return resolve_model(cfg)

    def run(self, cfg, ctx: StepContext) -> dict[str, Any]:
        from emf_dist.train.driver import train
        join_cluster_if_in_job()
        result = train(cfg)
        checkpoint = result.checkpoint
        if storage.is_remote(cfg.storage_path) and "://" not in checkpoint:  # pyarrow paths drop the scheme
            checkpoint = f"{cfg.storage_path.split('://')[0]}://{checkpoint}"
        return {"export": result.export, "checkpoint": checkpoint, "run": storage.join(cfg.storage_path, cfg.name)}


class EncoderEvalKind(Kind):
    outputs = ("report", "metrics", "selected")
    url_outputs = ("report",)

    def parse(self, raw: dict):
        from emf_dist.eval.encoder_config import EncoderEvalConfig
        cfg = from_dict(EncoderEvalStepConfig, raw, validate=True)
        from_dict(EncoderEvalConfig, cfg.eval, path="eval", validate=True)  # fail at load, not after an hour
        return cfg

    def run(self, cfg: EncoderEvalStepConfig, ctx: StepContext) -> dict[str, Any]:
        from emf_dist.eval.encoder_config import EncoderEvalConfig
        from emf_dist.eval.run import run_encoder_job
        with storage.output_folder(cfg.out) as out:
            result = run_encoder_job(from_dict(EncoderEvalConfig, cfg.eval, path="eval", validate=True), out, cfg.device)
        selected = result["selection"]["selected"]
        if selected is None and cfg.require_selection:
            report = storage.join(cfg.out, "report.md")
            raise StepFailed(f"no candidate text encoder passed the selection; see {report}")
        return {"report": cfg.out, "metrics": storage.join(cfg.out, "metrics.json"), "selected": selected or ""}


class BenchmarkKind(Kind):
    outputs = ("report", "metrics", "model")
    url_outputs = ("report",)

    def parse(self, raw: dict):
        from emf_dist.eval.run import EvalConfig
        cfg = from_dict(BenchmarkStepConfig, raw, validate=True)
        from_dict(EvalConfig, cfg.eval, path="eval", validate=True)
        return cfg

    def inputs(self, cfg: BenchmarkStepConfig) -> list[str]:
        return [cfg.model] + ([cfg.baseline] if cfg.baseline else [])

    def run(self, cfg: BenchmarkStepConfig, ctx: StepContext) -> dict[str, Any]:
        from emf_dist.eval.run import EvalConfig, run_benchmark_job
        roles = {"model": cfg.model, **({"baseline": cfg.baseline} if cfg.baseline else {})}
        with contextlib.ExitStack() as stack:
            dirs = {role: stack.enter_context(storage.local_folder(url)) for role, url in roles.items()}
            out = stack.enter_context(storage.output_folder(cfg.out))
            run_benchmark_job(dirs, from_dict(EvalConfig, cfg.eval, path="eval", validate=True), out)
        return {"report": cfg.out, "metrics": storage.join(cfg.out, "metrics.json"), "model": cfg.model}


class CommandKind(Kind):
    outputs = ("dir",)

    def parse(self, raw: dict):
        return from_dict(CommandStepConfig, raw, validate=True)

    def output_names(self, raw: dict) -> tuple[str, ...]:
        return ("dir", *dict(raw.get("outputs") or {}))

    def inputs(self, cfg: CommandStepConfig) -> list[str]:
        return list(cfg.inputs)

    def defaults(self, step_dir: str, name: str) -> dict:
        return {}

    def run(self, cfg: CommandStepConfig, ctx: StepContext) -> dict[str, Any]:
        if not storage.is_remote(ctx.dir):
            os.makedirs(ctx.dir, exist_ok=True)
        ctx.echo(f"  $ {' '.join(cfg.argv)}")
        code = subprocess.call(cfg.argv, env={**os.environ, "EMF_STEP_DIR": ctx.dir})
        if code != 0:
            raise StepFailed(f"{cfg.argv[0]} exited with code {code}")
        return {"dir": ctx.dir, **cfg.outputs}


KINDS: dict[str, Kind] = {"prep": PrepKind(), "train": TrainKind(), "eval_encoders": EncoderEvalKind(),
                          "eval_benchmark": BenchmarkKind(), "command": CommandKind()}


def step_config_problems(kind: str, config: dict) -> list[str]:
    """Parse a step's config now, so a typo in the last step fails before the first one runs."""
    try:
        KINDS[kind].parse(dict(config))
    except ConfigError as err:
        return err.problems
    return []


# ---------------------------------------------------------------- helpers


def join_cluster_if_in_job() -> None:
    """Inside a Ray job (or with RAY_ADDRESS set) every step works on that cluster: prep would
    otherwise start a private local instance. An initialised Ray is reused by prep and train."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        return
    import ray

    from emf_dist.ray_env import init_driver
    if not ray.is_initialized():
        init_driver(address, log_to_driver=True)


def artifact_identity(url: str) -> str:
    """What a step's input holds, as a hash: a dataset by its manifest (which lists every shard's
    sha256), a model folder by its description and weights' checksums, anything else by its files'
    names, sizes and storage checksums (S3 ETags, local size + mtime)."""
    fs, path = storage.filesystem(url)
    path = path.rstrip("/")
    if not fs.exists(path):
        raise StepFailed(f"input {url} does not exist")
    digest = hashlib.sha256()
    if fs.isfile(path):
        digest.update(f"{fs.size(path)}:{fs.checksum(path)}".encode())
        return digest.hexdigest()
    manifest = f"{path}/manifest.json"
    # A dataset's manifest names every shard with its sha256; its plan and state files do not matter.
    files = [manifest] if fs.exists(manifest) else sorted(fs.find(path))
    for name in files:
        is_info = os.path.basename(name) in INFO_FILES
        stamp = fs.cat_file(name) if is_info else f"{fs.size(name)}:{fs.checksum(name)}".encode()
        digest.update(name[len(path):].lstrip("/").encode() + b"\0" + stamp + b"\0")
    return digest.hexdigest()
