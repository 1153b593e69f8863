"""The embedded default corpus: the Python standard library's own documentation, offline.

    python -m pipelines.stdlib_corpus OUT_DIR        # writes the JSONL files below

Every Python installation carries real English documentation: the pydoc topics
(`pydoc_data.topics`) and the docstrings of every standard-library module, class and function.
Docstrings are read with `ast` from the source files, never by importing the modules (importing
`antigravity` opens a browser; others print or start threads). The output is deterministic for a
given Python version:

    docs.jsonl               {"id", "text", "source"}            pretraining documents
    summaries-train.jsonl    {"id", "article", "summary"}        docstring body -> its first line (SFT)
    summaries-heldout.jsonl  same, held out by a hash of the id  (generation + ROUGE)
    titles-heldout.jsonl     {"id", "title", "article"}          "module.function" -> docstring

Does not: download anything, or clean text (the prep pipeline does that).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

# Modules whose source is large test data or generated tables, not documentation.
_SKIP_PREFIXES = ("test", "idlelib.idle_test", "lib2to3.tests", "tkinter.test", "ctypes.test", "unittest.test")


def _source_files() -> Iterator[tuple[str, Path]]:
    """(dotted module name, path) of every pure-Python stdlib module, sorted, packages walked."""
    seen: set[Path] = set()
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top.startswith(_SKIP_PREFIXES):
            continue
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        origin = Path(spec.origin)
        if spec.submodule_search_locations:  # a package: walk its tree
            root = origin.parent
            for path in sorted(root.rglob("*.py")):
                rel = path.relative_to(root.parent).with_suffix("")
                name = ".".join(p for p in rel.parts if p != "__init__")
                if any(part.startswith(("test", "_test")) or part == "tests" for part in rel.parts[1:]):
                    continue
                if path not in seen:
                    seen.add(path)
                    yield name, path
        elif origin not in seen:
            seen.add(origin)
            yield top, origin


def _docstrings(name: str, path: Path) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) for the module and every class/function with one, in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return
    doc = ast.get_docstring(tree)
    if doc:
        yield name, doc

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}.{child.name}"
                d = ast.get_docstring(child)
                if d:
                    yield qual, d
                if isinstance(child, ast.ClassDef):
                    yield from walk(child, qual)

    yield from walk(tree, name)


def _held_out(key: str, fraction: float) -> bool:
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def build(out_dir: str | os.PathLike, *, max_bytes: int = 3_000_000, heldout_fraction: float = 0.05,
          min_doc_chars: int = 200, min_body_chars: int = 150, min_train_body_chars: int = 40) -> dict[str, object]:
    """Write the corpus files into out_dir (idempotent: same Python -> same bytes). Returns stats.

    A held-out summary pair needs a body of min_body_chars; a training pair only min_train_body_chars
    (more, shorter examples of the same task; the held-out set does not change with it)."""
    from pydoc_data.topics import topics

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs, train_pairs, heldout_pairs, titles = [], [], [], []
    total = 0
    for topic in sorted(topics):
        text = topics[topic].strip()
        if len(text) >= min_doc_chars:
            docs.append({"id": f"pydoc-topic:{topic}", "text": text, "source": f"pydoc_data.topics[{topic!r}]"})
            total += len(text)
    for name, path in _source_files():
        for qual, doc in _docstrings(name, path):
            head, _, body = doc.partition("\n\n")
            head = " ".join(head.split())
            body = body.strip()
            # a summary pair: a one-sentence first line over a real body; training also takes shorter
            # bodies (min_train_body_chars), the held-out set keeps the stricter rule
            if body and 20 <= len(head) <= 200 and head.endswith("."):
                pair = {"id": qual, "article": body, "summary": head}
                if _held_out(qual, heldout_fraction):
                    if len(body) >= min_body_chars:
                        heldout_pairs.append(pair)
                        if len(titles) < 50 and "." in qual:
                            titles.append({"id": qual, "title": qual, "article": doc})
                        continue  # held-out docstrings stay out of pretraining too (no leakage)
                elif len(body) >= min_train_body_chars:
                    train_pairs.append(pair)
            if len(doc) >= min_doc_chars and total < max_bytes:
                docs.append({"id": qual, "text": doc, "source": f"{path.name}:{qual}"})
                total += len(doc)
    files = {
        "docs.jsonl": docs,
        "summaries-train.jsonl": train_pairs,
        "summaries-heldout.jsonl": heldout_pairs,
        "titles-heldout.jsonl": titles,
    }
    for fname, rows in files.items():
        tmp = out / f".{fname}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, out / fname)
    return {"dir": str(out), "python": sys.version.split()[0], "docs": len(docs), "doc_chars": total,
            "summary_pairs_train": len(train_pairs), "summary_pairs_heldout": len(heldout_pairs),
            "titles_heldout": len(titles)}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m pipelines.stdlib_corpus OUT_DIR", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(build(sys.argv[1]), indent=2))
