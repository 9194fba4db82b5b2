"""Every manifest under cluster/ parses, carries what KubeRay / the Ray launcher require, keeps
token authentication on, and runs `emf` commands that exist with configs that validate.

The KubeRay checks follow the CRD fields the operator rejects or needs (ray.io/v1; KubeRay 1.5.1
for authOptions, 1.6 for RayCronJob); the launcher config goes through Ray's own validator, the
one `ray up` runs. Entrypoints are parsed by emf's own parser and their dotted overrides are
loaded into the real config classes, so a renamed command, flag or config key fails here.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from emf_app.cli import build_parser
from emf_dist.config import parse_cli

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
MANIFESTS = sorted(CLUSTER.rglob("*.yaml"))
RAY_VERSION = "2.60.0"  # pyproject.toml pins ray[...]==2.60.0; the cluster must run the same Ray


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            docs.append((path.name, doc))
            if doc.get("kind") == "ConfigMap":  # templates shipped inside ConfigMaps (cronjob-retrain.yaml)
                docs += [(f"{path.name}:{key}", d) for key, text in doc.get("data", {}).items()
                         if key.endswith((".yaml", ".yml")) for d in yaml.safe_load_all(text)]
    return docs


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in documents() if doc.get("kind") == kind]


def test_every_manifest_parses_and_the_expected_ones_exist():
    assert {p.name for p in MANIFESTS} >= {"raycluster-gpu.yaml", "rayjob-train.yaml", "rayjob-pipeline.yaml",
                                           "raycronjob-retrain.yaml", "cronjob-retrain.yaml", "aws-gpu.yaml"}
    for path in MANIFESTS:
        assert all(isinstance(d, dict) for d in yaml.safe_load_all(path.read_text())), path


def check_ray_cluster_spec(where: str, spec: dict) -> None:
    assert spec["rayVersion"] == RAY_VERSION, where
    assert spec["authOptions"]["mode"] == "token", f"{where}: token authentication must stay on"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    groups = spec["workerGroupSpecs"]
    assert groups, where
    for group in groups:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", group["groupName"]), where
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
        assert isinstance(group["rayStartParams"], dict), where
    for pod in [head["template"]] + [g["template"] for g in groups]:
        containers = pod["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers), where
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in groups for c in g["template"]["spec"]["containers"]]
    assert any(gpus), f"{where}: GPU training needs a worker group with nvidia.com/gpu limits"


def test_ray_clusters_jobs_and_cron_jobs_have_what_kuberay_requires():
    checked = 0
    for name, doc in of_kind("RayCluster"):
        assert doc["apiVersion"] == "ray.io/v1"
        check_ray_cluster_spec(name, doc["spec"])
        checked += 1
    for name, doc in of_kind("RayJob"):
        assert doc["apiVersion"] == "ray.io/v1" and (doc["metadata"].get("name") or doc["metadata"].get("generateName"))
        assert doc["spec"]["entrypoint"].strip(), name
        check_ray_cluster_spec(name, doc["spec"]["rayClusterSpec"])
        checked += 1
    for name, doc in of_kind("RayCronJob"):
        assert doc["apiVersion"] == "ray.io/v1"
        assert len(doc["spec"]["schedule"].split()) == 5, name
        check_ray_cluster_spec(name, doc["spec"]["jobTemplate"]["rayClusterSpec"])
        checked += 1
    assert checked == 5  # 1 RayCluster, 3 RayJobs (one inside the CronJob's ConfigMap), 1 RayCronJob


def test_the_plain_cron_job_creates_the_rayjob_template_it_mounts():
    (_, cron), = of_kind("CronJob")
    assert len(cron["spec"]["schedule"].split()) == 5 and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    command = pod["containers"][0]["command"]
    (config_map,) = [v["configMap"]["name"] for v in pod["volumes"]]
    (_, template_map), = [(n, d) for n, d in of_kind("ConfigMap") if d["metadata"]["name"] == config_map]
    assert command[:2] == ["kubectl", "create"] and Path(command[-1]).name in template_map["data"]
    (_, role), = of_kind("Role")
    assert {"create"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"] == ["rayjobs"]
    (_, binding), = of_kind("RoleBinding")
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]


def entrypoints() -> list[tuple[str, str]]:
    found = [(name, doc["spec"]["entrypoint"]) for name, doc in of_kind("RayJob")]
    found += [(name, doc["spec"]["jobTemplate"]["entrypoint"]) for name, doc in of_kind("RayCronJob")]
    return found


@pytest.mark.parametrize("where,entrypoint", entrypoints())
def test_entrypoints_run_emf_commands_that_exist_with_valid_configs(where, entrypoint):
    argv = shlex.split(entrypoint)
    assert argv[0] == "emf", f"{where}: entrypoints call the emf command line"
    args = build_parser().parse_args(argv[1:])  # unknown commands and flags exit here
    if args.command == "train":
        from emf_dist.train.config import TrainConfig
        parse_cli(TrainConfig, args.config)
    elif args.command == "retrain":
        from pipelines.registry import ModelVersion
        from pipelines.retrain import RetrainConfig, retrain_spec
        cfg = parse_cli(RetrainConfig, args.config)
        retrain_spec(cfg, ModelVersion(model="s3://m/mf", base="s3://m/fm", dataset=cfg.dataset, manifest_version=1))
    elif args.command == "pipeline":
        from pipelines.spec import load_spec
        load_spec(args.spec, args.overrides)
    else:
        pytest.fail(f"{where}: unexpected command {args.command!r}")


def test_launcher_config_passes_rays_own_validation_with_token_auth_and_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "launcher" / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "~/.ray/auth_token" in config["file_mounts"]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # AWS GPU families


def test_dockerfile_builds_on_the_pinned_ray_and_installs_emf_dist():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{RAY_VERSION}-") and "FROM ${RAY_IMAGE}" in text
    for package in ("emf_dist", "data_prep", "pipelines", "cluster"):
        assert re.search(rf"^COPY .*\b{package}\b", text, re.M), package
    assert re.search(r"^RUN pip install --no-cache-dir \.$", text, re.M)
    assert "RAY_AUTH_MODE=token" in text and "RAY_AUTH_TOKEN=" not in text  # auth on, no token baked in
    pinned = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (CLUSTER.parent / "pyproject.toml").read_text()).group(1)
    assert pinned == RAY_VERSION
