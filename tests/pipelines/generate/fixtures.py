"""Shared fixtures of the generate / ops / jobs tests: a tiny real checkpoint and small inputs.

Loaded by path from tests/pipelines/generate/conftest.py, tests/pipelines/ops/conftest.py and
tests/jobs/conftest.py; the checkpoint is built once per session (a fixed folder under pytest's basetemp).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

WORDS = ("the council said on monday that the new bridge over the river would open next spring after "
         "two years of work . local shops hope the road will bring more visitors to the town centre . "
         "police are asking witnesses to come forward after a car was damaged in the high street . "
         "the team won the cup final with a late goal and fans celebrated in the square until midnight .")


def corpus() -> list[str]:
    sents = [s.strip() + " ." for s in WORDS.split(" . ") if s.strip()]
    return [" ".join(sents[(i + k) % len(sents)] for k in range(3)) for i in range(40)]


def make_tiny_checkpoint(out: Path) -> Path:
    """A real raygpt checkpoint: BPE tokenizer trained on a little text + GPT debug preset (random weights)."""
    import torch

    from gptcore.checkpoint import save_checkpoint
    from gptcore.config import preset
    from gptcore.model import GPT
    from gptcore.tokenizer import train_bpe

    if (out / "checksums.json").exists():
        return out
    tok = train_bpe(iter(corpus()), vocab_size=300)
    torch.manual_seed(0)
    model = GPT(preset("debug", vocab_size=tok.vocab_size))
    save_checkpoint(out, model, tok, {"note": "tiny test checkpoint"})
    return out


def articles(n: int, start: int = 0) -> list[dict]:
    sents = corpus()
    return [{"id": f"doc-{i:04d}", "article": sents[i % len(sents)], "title": f"Story {i}"} for i in range(start, start + n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def shards(out: Path) -> dict[str, os.stat_result]:
    d = out / "data"
    return {p.name: p.stat() for p in sorted(d.glob("part-*.parquet"))} if d.exists() else {}


def wait_for(pred, timeout: float, every: float = 0.05):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(every)
    return None


def read_rows(out: Path) -> list[dict]:
    from pipelines.generate.pipeline import load_output

    t = load_output(str(out))
    return t.to_pylist() if t is not None else []


def run_logs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_runs").glob("*.json"))]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    pytest.importorskip("gptcore.engine", reason="gptcore.engine has not landed yet")
    import fcntl

    base = tmp_path_factory.getbasetemp()
    with open(base / "raygpt-tiny-ckpt.lock", "w") as lock:  # pytest-xdist workers share basetemp's parent
        fcntl.flock(lock, fcntl.LOCK_EX)
        return make_tiny_checkpoint(base / "raygpt-tiny-ckpt")
