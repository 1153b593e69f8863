"""Every YAML in cluster/ against the schema its consumer enforces, with unknown fields rejected:
KubeRay CRDs (vendored, tests/cluster/schemas/README.md) and built-in kinds for cluster/kuberay/, Ray's own
cluster-launcher schema (ray/autoscaler/ray-schema.json) for cluster/{aws,gcp}.yaml, and Serve's
ServeDeploySchema (plus our ServeConfig for the app's `args`) for cluster/serve/*.yaml and serveConfigV2.

    pytest tests/cluster -q
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from k8s_schema import KUBERAY, manifest_errors, schema_errors, strict

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
ALL_YAML = sorted(CLUSTER.rglob("*.yaml"))
LAUNCHER = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
SERVE = sorted((CLUSTER / "serve").glob("*.yaml"))
KUBE = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _ids(x):
    return x.relative_to(CLUSTER).as_posix() if isinstance(x, Path) else None


def test_every_yaml_in_cluster_has_a_schema_test():
    assert set(ALL_YAML) == set(LAUNCHER) | set(SERVE) | set(KUBE), "a new YAML in cluster/ needs a schema test"


# ------------------------------------------------------------------------------------------- Kubernetes

def _kube_docs():
    out = []
    for p in KUBE:
        for d in _docs(p):
            out.append((p, d))
            if d["kind"] == "ConfigMap":  # the nightly CronJob's RayJob template
                out += [(p, yaml.safe_load(v)) for k, v in d.get("data", {}).items() if k.endswith(".yaml")]
    return out


@pytest.mark.parametrize("path,doc", _kube_docs(), ids=lambda x: _ids(x) or "")
def test_kubernetes_manifest_matches_schema(path, doc):
    errs = manifest_errors(doc)
    assert not errs, f"{path.name} {doc['kind']} {doc['metadata']['name']}: API server (KubeRay {KUBERAY}) " \
                     f"would refuse:\n  " + "\n  ".join(errs)


def _raycluster(doc):
    spec = doc.get("spec", {})
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"],
            "RayCronJob": lambda: spec["jobTemplate"]["rayClusterSpec"]}.get(doc["kind"], lambda: None)()


@pytest.mark.parametrize("path,doc", [(p, d) for p, d in _kube_docs() if _raycluster(d)], ids=lambda x: _ids(x) or "")
def test_token_auth_through_auth_options_and_a_secret(path, doc):
    rc = _raycluster(doc)
    # KubeRay >= 1.6.0: mode token + secretName; the operator refuses token mode for Ray < 2.52.0
    assert rc.get("authOptions") == {"mode": "token", "secretName": "raygpt-ray-token"}, path.name
    assert tuple(int(x) for x in rc["rayVersion"].split(".")) >= (2, 52, 0)
    # the env vars are the operator's job now: a hand-written RAY_AUTH_TOKEN would shadow the Secret it injects
    pods = [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc.get("workerGroupSpecs", [])]
    for c in (c for t in pods for c in t["spec"]["containers"]):
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & {e["name"] for e in c.get("env", [])}, c["name"]


def test_kubectl_image_is_pullable_and_pinned():
    (cron,) = [d for p, d in _kube_docs() if d["kind"] == "CronJob"]
    rayjob = next(d for p, d in _kube_docs() if d["kind"] == "RayJob" and p.name == "cronjob-nightly.yaml")
    (c,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    raygpt_image = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert c["image"] == raygpt_image, "the CronJob runs kubectl from the raygpt image"
    docker = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"ARG KUBECTL_VERSION=v\d+\.\d+\.\d+\n", docker), "pin kubectl in cluster/Dockerfile"
    assert "dl.k8s.io/release/${KUBECTL_VERSION}" in docker and ".sha256" in docker


def test_no_concurrency_fields_on_raycronjob_and_versions_stated():
    text = (CLUSTER / "kuberay" / "raycronjob-nightly.yaml").read_text()
    (doc,) = _docs(CLUSTER / "kuberay" / "raycronjob-nightly.yaml")
    assert set(doc["spec"]) <= {"jobTemplate", "schedule", "suspend", "timeZone"}
    assert "KubeRay >= 1.7.0" in text and "RayCronJob=true" in text
    for p in KUBE:
        assert re.search(r"KubeRay >= 1\.[67]\.0", p.read_text()), f"{p.name}: state the KubeRay version it needs"


@pytest.mark.parametrize("name", ["cronjob-nightly.yaml", "raycronjob-nightly.yaml"])
def test_shipped_schedules_equal_the_generator(name):
    """The files are `raygpt schedule k8s` output: rerun the command in their header and compare."""
    path = CLUSTER / "kuberay" / name
    (line,) = [ln for ln in path.read_text().splitlines() if ln.startswith("# Regenerate: raygpt ")]
    argv = shlex.split(line.removeprefix("# Regenerate: raygpt "))
    argv = argv[:argv.index("-o")]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert list(yaml.safe_load_all(out.stdout)) == _docs(path)


def test_validator_rejects_unknown_typo_and_deprecated_fields():
    (rc,) = _docs(CLUSTER / "kuberay" / "raycluster.yaml")
    assert manifest_errors(rc) == []
    bad = copy.deepcopy(rc)
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    bad["spec"]["authOptions"]["secretname"] = "x"
    bad["spec"]["workerGroupSpecs"][0]["replicas"] = "one"
    errs = "\n".join(manifest_errors(bad))
    assert "spec.headGroupSpec.template.spec.containers.0: Additional properties are not allowed " \
           "('imagePullPolicyy' was unexpected)" in errs
    assert "spec.authOptions: Additional properties are not allowed ('secretname'" in errs
    assert "spec.workerGroupSpecs.0.replicas: 'one' is not of type 'integer'" in errs
    rcj = {"apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": {"name": "x"},
           "spec": {"schedule": "@daily", "concurrencyPolicy": "Forbid", "jobTemplate": {"entrypoint": "x"}}}
    assert "('concurrencyPolicy' was unexpected)" in "\n".join(manifest_errors(rcj))
    (svc,) = _docs(CLUSTER / "kuberay" / "rayservice.yaml")
    svc["spec"]["serviceUnhealthySecondThreshold"] = 900
    assert manifest_errors(svc) == [f"spec.serviceUnhealthySecondThreshold: deprecated in KubeRay {KUBERAY}"]
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "lables": {}}, "data": {}}
    assert manifest_errors(cm) == ["metadata: Additional properties are not allowed ('lables' was unexpected)"]


def test_unknown_kind_is_an_error_not_a_pass():
    with pytest.raises(KeyError, match="no schema for apiVersion 'v1' kind 'Pod'"):
        manifest_errors({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}})


# ---------------------------------------------------------------------------------------- cluster launcher

def _ray_schema():
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids)
def test_launcher_yaml_matches_rays_schema(path):
    (cfg,) = _docs(path)
    errs = schema_errors(cfg, strict(_ray_schema()))
    assert not errs, f"{path.name}: `ray up` would refuse:\n  " + "\n  ".join(errs)


def test_launcher_schema_rejects_a_typo():
    (cfg,) = _docs(CLUSTER / "aws.yaml")
    cfg["idle_timeout_minuts"] = 5
    assert any("'idle_timeout_minuts' was unexpected" in e for e in schema_errors(cfg, strict(_ray_schema())))


# -------------------------------------------------------------------------------------------------- Serve

def _serve_configs():
    out = [(p, _docs(p)[0]) for p in SERVE]
    for p, d in _kube_docs():
        if d["kind"] == "RayService":
            out.append((p, yaml.safe_load(d["spec"]["serveConfigV2"])))
    return out


def _serve_errors(cfg: dict) -> list[str]:
    from ray.serve.schema import ServeDeploySchema

    from pipelines.config import from_dict
    from pipelines.serve.config import ServeConfig, serve_config_fields

    errs = schema_errors(cfg, strict(ServeDeploySchema.model_json_schema()))
    if not errs:
        ServeDeploySchema.model_validate(cfg)  # pydantic's own checks (value ranges, cross-field rules)
        from_dict(ServeConfig, serve_config_fields(cfg))  # the app's `args`: ConfigError on an unknown key
    return errs


@pytest.mark.parametrize("path,cfg", _serve_configs(), ids=lambda x: _ids(x) or "")
def test_serve_config_matches_serve_deploy_schema(path, cfg):
    errs = _serve_errors(cfg)
    assert not errs, f"{path.name}: `serve deploy` would refuse:\n  " + "\n  ".join(errs)


def test_serve_schema_rejects_a_typo():
    from pipelines.errors import ConfigError

    cfg = _docs(SERVE[0])[0]
    bad = copy.deepcopy(cfg)
    bad["applications"][0]["rout_prefix"] = "/"
    assert _serve_errors(bad) == ["applications.0: Additional properties are not allowed ('rout_prefix' was unexpected)"]
    bad = copy.deepcopy(cfg)
    bad["applications"][0]["args"]["max_tokns"] = 3
    with pytest.raises(ConfigError, match="max_tokns"):
        _serve_errors(bad)
