"""Import hygiene of gptcore/ and pipelines/: no cycles among module-level imports, and internal modules
imported inside functions only where there is a reason (CLI handlers keep `--help` fast).

    pytest tests/test_imports.py

Why: lazy imports had hidden cycles (data config <-> decontam <-> read, generate pipeline <-> predictor,
the stage CLIs <-> pipelines/cli.py). A module graph without cycles can be read bottom-up.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gptcore", "pipelines", "jobs")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The internal module an import names (a `from pkg import mod` names pkg.mod when that is a module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.AST, here: str, is_pkg: bool, modules: dict[str, Path]) -> list[str]:
    out = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = here if is_pkg else here.rpartition(".")[0]
            for _ in range(node.level - 1):
                pkg = pkg.rpartition(".")[0]
            base = f"{pkg}.{base}".strip(".")
        # `from pkg import mod` depends on pkg.mod (and runs pkg/__init__ first: that file's own module-level
        # imports are edges of pkg); `from pkg import name` depends on pkg
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    else:
        return out
    for n in names:
        if n.split(".")[0] in PACKAGES:
            t = _resolve(n, modules)
            if t and t != here:
                out.append(t)
    return sorted(set(out))


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module) -> list[ast.AST]:
    """Imports executed when the module is imported (top level, also inside top-level if/try blocks)."""
    out: list[ast.AST] = []
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            stack.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])
    return out


def _graph() -> dict[str, list[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _module_level_imports(tree):
            edges.update(_targets(node, name, is_pkg, modules))
        # importing a.b.c runs a/__init__ and a/b/__init__ too
        graph[name] = sorted(edges)
    return graph


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "module-level import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]


def _all_imports_graph(skip_cli: bool = True) -> dict[str, list[str]]:
    """Module-level and function-level imports alike (a lazy import is still a dependency)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(tree):
            edges.update(_targets(node, name, is_pkg, modules))
        graph[name] = sorted(edges)
    return graph


def test_no_cycles_through_function_level_imports():
    """A lazy import is still a dependency: with them the graph has no cycle either (CLI handlers import the
    stages, and no stage imports a CLI module)."""
    cycles = _cycles(_all_imports_graph())
    assert not cycles, "import cycles through function-level imports:\n" + "\n".join(" <-> ".join(c) for c in cycles)


# modules whose imports inside functions are expected: the CLI handlers keep `raygpt --help` fast
CLI_MODULES = {"pipelines.cli", "pipelines.core_cli", "pipelines.demo", "pipelines.data.cli", "pipelines.train.cli",
               "pipelines.generate.cli", "pipelines.serve.cli", "pipelines.serve.launch", "pipelines.ops.cli"}
# a package's `run` wrapper imports its pipeline on call (the CLI imports the package to build --help)
LAZY_RUN_PACKAGES = {"pipelines.data", "pipelines.generate", "pipelines.train"}


def _imports_torch(path: Path) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    return any(isinstance(n, ast.Import) and any(a.name.split(".")[0] == "torch" for a in n.names)
               or isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "torch"
               for n in _module_level_imports(tree))


def _heavy(target: str, modules: dict[str, Path]) -> bool:
    """gptcore's modules import torch (except its errors), and so do a few pipelines modules at module level
    (pipelines/train/muon.py: an Optimizer subclass); importing them on call keeps configs and --help light."""
    return (target.startswith("gptcore.") and target != "gptcore.errors") or _imports_torch(modules[target])


def test_function_level_imports_only_where_there_is_a_reason():
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        if name in CLI_MODULES or name in LAZY_RUN_PACKAGES:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        top = {id(n) for n in _module_level_imports(tree)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                light = [t for t in _targets(node, name, path.name == "__init__.py", modules) if not _heavy(t, modules)]
                if light:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {', '.join(light)} inside a "
                                     f"function: import it at module level")
    assert not offenders, "\n".join(offenders)


def test_a_module_that_imports_torch_counts_as_heavy():
    modules = _modules()
    assert _heavy("pipelines.train.muon", modules) and _heavy("gptcore.model", modules)
    assert not _heavy("pipelines.train.config", modules) and not _heavy("gptcore.errors", modules)
