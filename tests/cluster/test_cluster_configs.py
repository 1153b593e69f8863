"""Every file in cluster/ loads and carries the fields our code and Ray/KubeRay rely on.

    pytest tests/cluster -q
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


ALL_YAML = sorted(p for p in CLUSTER.rglob("*.yaml"))


def test_cluster_folder_has_what_operators_need():
    names = {p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*") if p.is_file()}
    for required in ["aws.yaml", "gcp.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml",
                     "head-up.sh", "head-down.sh", "Dockerfile"]:
        assert required in names, f"cluster/{required} is missing"
    kinds = {d.get("kind") for p in ALL_YAML for d in _yaml_docs(p)}
    assert {"RayCluster", "RayJob", "RayService", "CronJob"} <= kinds, kinds


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_every_yaml_loads(path):
    docs = _yaml_docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)


def _launcher_files():
    return [p for p in ALL_YAML if any("provider" in d for d in _yaml_docs(p))]


@pytest.mark.parametrize("path", _launcher_files(), ids=lambda p: p.name)
def test_launcher_config(path):
    (cfg,) = _yaml_docs(path)
    assert cfg["provider"]["type"] in {"aws", "gcp"}
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"].get("CPU") == 0, "head must not run training work"
    total_max = 0
    gpu_types = []
    for name, t in types.items():
        assert "node_config" in t, f"{name}: node_config missing"
        assert 0 <= t["min_workers"] <= t["max_workers"], f"{name}: min_workers > max_workers"
        total_max += t["max_workers"]
        nc = t["node_config"]
        if cfg["provider"]["type"] == "aws":
            if re.match(r"^(g\d|p\d)", nc["InstanceType"]):
                gpu_types.append(name)
        elif nc.get("guestAccelerators"):
            gpu_types.append(name)
            assert {"onHostMaintenance": "TERMINATE"} in nc["scheduling"], "GCP GPU VMs need onHostMaintenance TERMINATE"
    assert gpu_types, "a GPU worker type is required"
    assert cfg["max_workers"] >= max(types[t]["max_workers"] for t in gpu_types)
    head_cmd = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmd, "the dashboard (Jobs API) must stay on loopback"
    assert "RAY_AUTH_MODE=token" in head_cmd
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["worker_start_ray_commands"] if "ray start" in c)
    setup = " ".join(cfg["setup_commands"])
    assert "torch==2.13.0" in setup and "constraints.txt" in setup


def _k8s_docs(kind):
    return [(p, d) for p in ALL_YAML for d in _yaml_docs(p) if d.get("kind") == kind]


def _ray_cluster_specs():
    """(file, RayCluster-shaped spec) from RayCluster, RayJob and RayService manifests."""
    out = []
    for p, d in _k8s_docs("RayCluster"):
        out.append((p, d["spec"]))
    for p, d in _k8s_docs("RayJob"):
        out.append((p, d["spec"]["rayClusterSpec"]))
    for p, d in _k8s_docs("RayService"):
        out.append((p, d["spec"]["rayClusterConfig"]))
    for p, d in _k8s_docs("RayCronJob"):
        tpl = d["spec"]["jobTemplate"]
        out.append((p, tpl.get("spec", tpl)["rayClusterSpec"]))
    return out


@pytest.mark.parametrize("path,spec", _ray_cluster_specs(), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_kuberay_cluster_spec(path, spec):
    import ray

    assert str(spec.get("rayVersion")) == ray.__version__, f"{path}: rayVersion must match the pinned Ray"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{path}: never expose the head service"
    containers = [head["template"]["spec"]["containers"]]
    for g in spec.get("workerGroupSpecs", []):
        assert g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 0), f"{path}: {g['groupName']}"
        containers.append(g["template"]["spec"]["containers"])
    # token auth through KubeRay's authOptions (issue 14): the operator injects RAY_AUTH_MODE/RAY_AUTH_TOKEN from
    # the Secret into every Ray container, the autoscaler and the RayJob submitter
    auth = spec.get("authOptions") or {}
    assert auth.get("mode") == "token", f"{path}: token auth must be on (spec.authOptions.mode: token)"
    assert auth.get("secretName"), f"{path}: the token must come from a Secret (authOptions.secretName)"


def _check_entrypoint(path: Path, entrypoint: str):
    """`python -m jobs.X --config FILE k=v ...`: the module and config exist, overrides are valid keys."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"], f"{path}: entrypoint should be `python -m jobs.<stage>`"
    module = argv[2]
    assert module.startswith("jobs."), module
    importlib.import_module(module)
    if "--config" in argv:
        cfg = argv[argv.index("--config") + 1]
        assert (REPO / cfg).exists(), f"{path}: config {cfg} does not exist"


@pytest.mark.parametrize("path,doc", _k8s_docs("RayJob"), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_rayjob(path, doc):
    spec = doc["spec"]
    assert doc["apiVersion"] == "ray.io/v1"
    assert spec["shutdownAfterJobFinishes"] is True, "ephemeral clusters must be deleted after the job"
    _check_entrypoint(path, spec["entrypoint"])


@pytest.mark.parametrize("path,doc", _k8s_docs("RayService"), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_rayservice(path, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    serve_cfg = doc["spec"]["serveConfigV2"]
    serve_cfg = yaml.safe_load(serve_cfg) if isinstance(serve_cfg, str) else serve_cfg
    apps = serve_cfg["applications"]
    assert any(a["import_path"] == "pipelines.serve.app:build_app" for a in apps)


SERVE_CONFIGS = sorted((CLUSTER / "serve").glob("*.yaml")) if (CLUSTER / "serve").is_dir() else []


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_import_path_resolves(path):
    (cfg,) = _yaml_docs(path)
    for app in cfg["applications"]:
        mod, _, attr = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(mod), attr)), app["import_path"]
        for d in app.get("deployments", []):
            auto = d.get("autoscaling_config")
            if auto:
                assert auto["min_replicas"] <= auto["max_replicas"]
    http = cfg.get("http_options", {})
    assert http.get("host", "127.0.0.1") in {"127.0.0.1", "localhost"}, "serve binds loopback by default"


@pytest.mark.parametrize("path,doc", _k8s_docs("CronJob"), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_nightly_cronjob(path, doc):
    assert doc["apiVersion"] == "batch/v1"
    spec = doc["spec"]
    fields = spec["schedule"].split()
    assert len(fields) == 5, f"{path}: schedule must be a 5-field cron expression"
    assert spec["concurrencyPolicy"] == "Forbid", "two nightly runs for one date must never overlap"


def test_head_scripts_bind_loopback_with_token_auth():
    up = (CLUSTER / "head-up.sh").read_text()
    assert "RAY_AUTH_MODE=token" in up or "RAY_AUTH_MODE\" = \"token\"" in up or "export RAY_AUTH_MODE" in up
    assert "127.0.0.1" in up
