"""README.md's "Files" block lists every tracked file of the project, one line each, and nothing else.

    pytest tests/test_readme_files.py
    .venv/bin/python tests/test_readme_files.py --write     # regenerate the block after adding/moving files

A new module gets its line from the first line of its docstring (or the first comment of a config or
script); an existing line keeps its text. Does not: check the descriptions' wording.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Files"
WIDTH = 53  # column where descriptions start
SKIP_PREFIXES = ("tests/cluster/schemas/",)  # vendored test data, described by its own README


def tracked_files() -> list[str] | None:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    files = [f for f in out.stdout.splitlines() if f and not f.startswith(SKIP_PREFIXES) and (REPO / f).exists()]
    return sorted(f for f in files if not f.endswith("__pycache__"))


def _block(text: str) -> tuple[int, int]:
    start = text.index(HEADING)
    open_ = text.index("```\n", start) + 4
    close = text.index("```", open_)
    return open_, close


def listed(text: str) -> dict[str, str]:
    a, b = _block(text)
    out = {}
    for line in text[a:b].splitlines():
        if line.strip():
            name, _, desc = line.partition(" ")
            out[name] = desc.strip()
    return out


def describe(path: str) -> str:
    p = REPO / path
    if p.suffix == ".py":
        try:
            doc = ast.get_docstring(ast.parse(p.read_text()))
        except SyntaxError:
            doc = None
        if doc:
            return doc.strip().splitlines()[0]
    try:
        for line in p.read_text().splitlines():
            s = line.strip()
            if s.startswith("#") and not s.startswith("#!") and len(s) > 2:
                return s.lstrip("# ").strip()
    except (UnicodeDecodeError, OSError):
        pass
    return "(no description)"


def render(files: list[str], known: dict[str, str]) -> str:
    return "".join(f"{f:<{WIDTH - 1}} {known.get(f) or describe(f)}\n" for f in files)


def test_files_block_lists_every_tracked_file():
    files = tracked_files()
    if files is None:
        pytest.skip("not a git checkout (the Files block is checked against `git ls-files`)")
    have = listed((REPO / "README.md").read_text())
    missing = [f for f in files if f not in have]
    extra = [f for f in have if f not in files]
    assert not missing and not extra, (
        f"README.md's Files block is out of date: missing {missing}, no longer present {extra}; "
        f"run `.venv/bin/python tests/test_readme_files.py --write`")


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    readme = REPO / "README.md"
    text = readme.read_text()
    a, b = _block(text)
    readme.write_text(text[:a] + render(tracked_files() or [], listed(text)) + text[b:])
    print(f"rewrote the Files block of {readme}")
