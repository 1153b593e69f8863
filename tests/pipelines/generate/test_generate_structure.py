"""The generate stage's shape: test hooks fenced in `testing:`, user errors under UserError, no import cycles,
function-level imports only where they are documented, and the size limits of the architecture pass."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import pipelines.generate as gen_pkg
from pipelines.config import load_config
from pipelines.errors import ConfigError, UserError
from pipelines.generate.config import GenerateConfig, GenerateTesting

PKG = Path(gen_pkg.__file__).parent
REQ = dict(checkpoint="c", input="i", output="o")

# (module, function) -> the function-level import it may keep, and why
ALLOWED_LAZY = {
    ("__init__", "run"): "pipeline imports ray and torch; the CLI imports this package to build --help",
    ("config", "sampling_fields"): "gptcore.sampling imports torch",
    ("config", "validate_sampling"): "gptcore.sampling imports torch",
}


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PKG.glob("*.py"))}


# ---- test hooks -----------------------------------------------------------------------------------------

def test_test_hooks_live_in_the_testing_subconfig_only():
    assert "pid_dir" not in GenerateConfig.__dataclass_fields__
    assert "debug_delay_s" not in GenerateConfig.__dataclass_fields__
    cfg = load_config(GenerateConfig, None, [*(f"{k}={v}" for k, v in REQ.items()),
                                             "testing.pid_dir=/tmp/p", "testing.debug_delay_s=0.5"])
    assert cfg.testing == GenerateTesting(pid_dir="/tmp/p", debug_delay_s=0.5)
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(GenerateConfig, None, [*(f"{k}={v}" for k, v in REQ.items()), "debug_delay_s=0.5"])
    with pytest.raises(ConfigError, match="testing.debug_delay_s must be >= 0"):
        GenerateTesting(debug_delay_s=-1)
    # the hooks do not change what is generated: an output resumes with or without them
    assert GenerateConfig(**REQ).generation_key() == GenerateConfig(
        **REQ, testing=GenerateTesting(pid_dir="/x", debug_delay_s=2.0)).generation_key()
    assert "testing" not in GenerateConfig(**REQ).generation_key()


# ---- errors ---------------------------------------------------------------------------------------------

def test_every_error_class_of_the_stage_is_a_user_error():
    import pipelines.generate.commit
    import pipelines.generate.eval
    import pipelines.generate.io
    import pipelines.generate.pipeline
    import pipelines.generate.plan
    import pipelines.generate.predictor
    import pipelines.generate.prepare
    import pipelines.generate.runner
    import pipelines.generate.templates

    found = []
    for mod in (pipelines.generate.commit, pipelines.generate.config, pipelines.generate.eval, pipelines.generate.io,
                pipelines.generate.pipeline, pipelines.generate.plan, pipelines.generate.predictor,
                pipelines.generate.prepare, pipelines.generate.runner, pipelines.generate.templates):
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
                found.append(obj)
    assert found, "no error classes found?"
    assert [c.__name__ for c in found if not issubclass(c, UserError)] == []


# ---- imports and size -----------------------------------------------------------------------------------

def test_no_import_cycles_inside_the_stage():
    graph: dict[str, set[str]] = {}
    for name, tree in _modules().items():
        deps = set()
        for node in tree.body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipelines.generate."):
                deps.add(node.module.rsplit(".", 1)[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("pipelines.generate.")}
        graph[name] = deps

    def visit(n: str, path: list[str]) -> None:
        if n in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(n):] + [n])}")
        for d in graph.get(n, ()):
            visit(d, path + [n])

    for n in graph:
        visit(n, [])


def test_function_level_imports_only_where_documented():
    lazy = set()
    for name, tree in _modules().items():
        if name == "cli":  # CLI handlers import lazily to keep --help fast (allowed by the house rules)
            continue
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(fn)):
                    lazy.add((name, fn.name))
    assert lazy <= set(ALLOWED_LAZY), sorted(lazy - set(ALLOWED_LAZY))


def test_no_function_over_80_lines_and_no_file_over_600():
    for p in sorted(PKG.glob("*.py")):
        src = p.read_text()
        assert len(src.splitlines()) <= 600, p.name
        for fn in ast.walk(ast.parse(src)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert fn.end_lineno - fn.lineno + 1 <= 80, f"{p.name}:{fn.name}"
