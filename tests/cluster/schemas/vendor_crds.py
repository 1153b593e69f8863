"""Regenerate the vendored KubeRay CRD schemas (test data for tests/cluster/test_cluster_schemas.py).

    git clone https://github.com/ray-project/kuberay && \
    python tests/cluster/schemas/vendor_crds.py --kuberay-git kuberay/.git --tag v1.7.0

Reads ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,rayservices,raycronjobs}.yaml at the tag, keeps
only the served `v1` version's openAPIV3Schema, drops the `description` texts (they are most of the bytes) but
(KubeRay generates its CRDs without descriptions anyway) and marks each field whose Go doc comment in
ray-operator/apis/ray/v1/*_types.go says "Deprecated" with `x-raygpt-deprecated: true` (the object schema of a
Go struct is the one whose property names are exactly the struct's json names). Writes
kuberay-<tag>/<plural>.json next to this file.
Does not: change any type, property list, enum, pattern or x-kubernetes-* marker of the schemas.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import yaml

CRDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices", "RayCronJob": "raycronjobs"}
HERE = Path(__file__).resolve().parent


TYPES = "ray-operator/apis/ray/v1"
_STRUCT = re.compile(r"^type (\w+) struct \{\n(.*?)^\}", re.S | re.M)
_FIELD = re.compile(r'^\s*\w+\s+[^`\n]*`json:"([\w-]+)[,"]', re.M)


def _deprecated_by_struct(git_dir: str, tag: str) -> dict[frozenset[str], set[str]]:
    """{json names of a Go struct: its deprecated json names}, for the structs that have any."""
    names = subprocess.check_output(["git", "--git-dir", git_dir, "ls-tree", "--name-only", f"{tag}:{TYPES}"], text=True)
    out: dict[frozenset[str], set[str]] = {}
    for name in names.split():
        if not name.endswith("_types.go"):
            continue
        src = subprocess.check_output(["git", "--git-dir", git_dir, "show", f"{tag}:{TYPES}/{name}"], text=True)
        for m in _STRUCT.finditer(src):
            fields, deprecated, comment = set(), set(), []
            for line in m.group(2).splitlines():
                if line.strip().startswith("//"):
                    comment.append(line)
                    continue
                f = _FIELD.match(line)
                if f:
                    fields.add(f.group(1))
                    if any("Deprecated" in c for c in comment):
                        deprecated.add(f.group(1))
                comment = []
            if deprecated:
                out[frozenset(fields)] = deprecated
    return out


def _strip(node, deprecated: dict[frozenset[str], set[str]]):
    if isinstance(node, list):
        return [_strip(x, deprecated) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "description" and isinstance(v, str):
            continue
        if k == "properties":  # a property literally named "description" is a schema: keep it
            marked = deprecated.get(frozenset(v), set())
            v = {pk: {**_strip(pv, deprecated), **({"x-raygpt-deprecated": True} if pk in marked else {})}
                 for pk, pv in v.items()}
            out[k] = v
            continue
        out[k] = _strip(v, deprecated)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kuberay-git", required=True, help="a kuberay clone's git dir")
    ap.add_argument("--tag", default="v1.7.0")
    a = ap.parse_args()
    out_dir = HERE / f"kuberay-{a.tag}"
    out_dir.mkdir(exist_ok=True)
    deprecated = _deprecated_by_struct(a.kuberay_git, a.tag)
    for kind, plural in CRDS.items():
        path = f"ray-operator/config/crd/bases/ray.io_{plural}.yaml"
        text = subprocess.check_output(["git", "--git-dir", a.kuberay_git, "show", f"{a.tag}:{path}"])
        crd = yaml.safe_load(text)
        (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = _strip(ver["schema"]["openAPIV3Schema"], deprecated)
        commit = subprocess.check_output(["git", "--git-dir", a.kuberay_git, "rev-parse", f"{a.tag}^{{commit}}"],
                                         text=True).strip()
        doc = {"kind": kind, "commit": commit, "apiVersion": f"{crd['spec']['group']}/v1", "kuberay": a.tag, "source": path,
               "openAPIV3Schema": schema}
        (out_dir / f"{plural}.json").write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n")
        print(f"{kind}: {out_dir / (plural + '.json')}")


if __name__ == "__main__":
    main()
