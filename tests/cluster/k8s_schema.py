"""Validate Kubernetes manifests like an API server does: the KubeRay CRDs' openAPIV3Schema (vendored under
tests/cluster/schemas/) and the built-in kinds in cluster/, with unknown fields rejected.

    from tests.cluster.k8s_schema import manifest_errors ; manifest_errors(doc) -> ["spec.foo: ...", ...]

The API server prunes (kubectl --validate=strict: rejects) a field that is not in the `properties` of an object
schema unless that schema has x-kubernetes-preserve-unknown-fields; `strict()` emulates that by adding
additionalProperties: false to such objects. Also reports fields KubeRay's Go types mark Deprecated.
Does not: evaluate CEL rules (x-kubernetes-validations) or the operator's own webhook checks.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema

SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBERAY = "v1.7.0"
CRD_FILES = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices",
             "RayCronJob": "raycronjobs"}


def strict(schema: Any) -> Any:
    """A copy of `schema` where every object with `properties` and neither additionalProperties nor
    x-kubernetes-preserve-unknown-fields refuses other keys."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: ({pk: strict(pv) for pk, pv in v.items()} if k in ("properties", "$defs", "definitions")
                else strict(v)) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out and "patternProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    doc = json.loads((SCHEMAS / f"kuberay-{KUBERAY}" / f"{CRD_FILES[kind]}.json").read_text())
    schema = strict(doc["openAPIV3Schema"])
    schema["properties"]["metadata"] = _core()["ObjectMeta"]
    return schema


def _resolve(node: Any, refs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(x, refs) for x in node]
    if not isinstance(node, dict):
        return node
    if "x-raygpt-ref" in node:
        return refs[node["x-raygpt-ref"]]
    return {k: _resolve(v, refs) for k, v in node.items()}


@functools.cache
def _core() -> dict[str, Any]:
    raw = json.loads((SCHEMAS / "k8s-core-v1.33.json").read_text())
    pod_template = json.loads((SCHEMAS / f"kuberay-{KUBERAY}" / "rayclusters.json").read_text())[
        "openAPIV3Schema"]["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
    refs = {"ObjectMeta": strict(raw["ObjectMeta"])}
    refs["PodTemplateSpec"] = strict(pod_template)
    refs["PodTemplateSpec"]["properties"]["metadata"] = refs["ObjectMeta"]
    return {"ObjectMeta": refs["ObjectMeta"],
            "kinds": {k: strict(_resolve(v, refs)) for k, v in raw["kinds"].items()}}


def schema_for(doc: dict[str, Any]) -> dict[str, Any]:
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if api == "ray.io/v1" and kind in CRD_FILES:
        return crd_schema(kind)
    key = f"{api}/{kind}"
    kinds = _core()["kinds"]
    if key not in kinds:
        raise KeyError(f"no schema for apiVersion {api!r} kind {kind!r}; known: {sorted(kinds)} and ray.io/v1 "
                       f"{sorted(CRD_FILES)}")
    return kinds[key]


def _path(err: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "<root>"


def schema_errors(instance: Any, schema: dict[str, Any]) -> list[str]:
    v = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)(schema)
    return sorted(f"{_path(e)}: {e.message}" for e in v.iter_errors(instance))


def deprecated_fields(instance: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths in `instance` whose schema KubeRay marks deprecated (x-raygpt-deprecated, see vendor_crds.py)."""
    out: list[str] = []
    if isinstance(instance, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for k, v in instance.items():
            sub = props.get(k, extra if isinstance(extra, dict) else None)
            if sub is None:
                continue
            if sub.get("x-raygpt-deprecated"):
                out.append(f"{path}{k}")
            out += deprecated_fields(v, sub, f"{path}{k}.")
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(instance):
            out += deprecated_fields(v, schema["items"], f"{path}{i}.")
    return out


def manifest_errors(doc: dict[str, Any]) -> list[str]:
    """Everything an API server with KubeRay v1.7.0 would refuse in `doc`, plus deprecated KubeRay fields."""
    schema = schema_for(doc)
    return schema_errors(doc, schema) + [f"{p}: deprecated in KubeRay {KUBERAY}" for p in deprecated_fields(doc, schema)]
