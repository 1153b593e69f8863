"""gptcore is a pure single-device library: no ray, deepspeed or torch.distributed, statically or at import.

    .venv/bin/python -m pytest tests/test_purity.py -q
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPTCORE = REPO / "gptcore"
FORBIDDEN = ("ray", "deepspeed", "torch.distributed")


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def _bad_imports(tree: ast.AST) -> list[str]:
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [f"line {node.lineno}: import {a.name}" for a in node.names if _forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _forbidden(node.module):
                bad.append(f"line {node.lineno}: from {node.module} import ...")
            else:  # `from torch import distributed`, `from ray import train` spelled via a parent
                bad += [f"line {node.lineno}: from {node.module} import {a.name}" for a in node.names
                        if _forbidden(f"{node.module}.{a.name}")]
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
              and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and _forbidden(node.args[0].value)):
            bad.append(f"line {node.lineno}: import_module({node.args[0].value!r})")
    return bad


def test_checker_catches_every_spelling():
    src = ("import ray\nimport deepspeed.comm\nimport torch.distributed as dist\nfrom torch import distributed\n"
           "from torch.distributed import all_reduce\nfrom ray.train import x\nimport importlib\n"
           "importlib.import_module('ray')\nimport torch\nfrom torch import nn\nimport raylib\n")
    bad = _bad_imports(ast.parse(src))
    assert len(bad) == 7, bad


def test_gptcore_sources_import_no_distributed_runtime():
    files = sorted(GPTCORE.rglob("*.py"))
    assert files, "gptcore has no sources?"
    offenders = {str(f.relative_to(REPO)): b for f in files if (b := _bad_imports(ast.parse(f.read_text(), str(f))))}
    assert not offenders, f"gptcore must not import {FORBIDDEN}: {offenders}"


def test_importing_gptcore_loads_no_distributed_runtime():
    # `import torch` itself pulls in some torch.distributed modules; what gptcore adds on top must be none
    code = """
import importlib, json, pkgutil, sys
import torch
baseline = set(sys.modules)
import gptcore
for m in pkgutil.walk_packages(gptcore.__path__, "gptcore."):
    importlib.import_module(m.name)
print(json.dumps({"new": sorted(set(sys.modules) - baseline), "all": sorted(sys.modules)}))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    mods = json.loads(r.stdout.strip().splitlines()[-1])
    assert "gptcore.model" in mods["all"]
    assert not [m for m in mods["all"] if m.split(".")[0] in ("ray", "deepspeed")]
    assert not [m for m in mods["new"] if m.startswith("torch.distributed")]
