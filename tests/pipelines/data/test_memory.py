"""Streaming: 10x the input must not grow peak memory (driver + Ray processes, sampled) by 1.5x or more.

    .venv/bin/python -m pytest tests/pipelines/data/test_memory.py -q

Each run is `raygpt prep` in its own process group with its own local Ray, so the sampled process tree is
the whole prep (driver, GCS, raylet, workers) and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gptcore.tokenizer import train_bpe

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _peak_rss(cmd: list[str], timeout: float = 300) -> int:
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "RAY_ADDRESS": ""})
    ps = psutil.Process(proc.pid)
    peak = 0
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            peak = max(peak, _tree_rss(ps))
            time.sleep(0.05)
        err = proc.stderr.read().decode(errors="replace")
        assert proc.wait(timeout=5) == 0, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # the Ray processes this run started (same session)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return peak


def _write_corpus(path: Path, docs: list[str], target_mb: float) -> None:
    size, k = 0, 0
    with path.open("w") as f:
        while size < target_mb * (1 << 20):
            for d in docs:
                line = json.dumps({"text": f"Copy {k}. {d}"}) + "\n"
                f.write(line)
                size += len(line)
            k += 1


def test_peak_memory_does_not_grow_with_input(shared_data, tmp_path):
    docs = [json.loads(l)["text"] for l in (shared_data / "us-presidential-addresses/addresses.jsonl").open()]
    book = (shared_data / "gutenberg/pg3261_news_from_nowhere.txt").read_text()
    docs += [p for p in book.split("\n\n") if len(p) > 200]
    tok = train_bpe(docs[:40], 1000)
    tok.save(tmp_path / "tok.json")
    peaks = {}
    for mb in (3, 30):
        d = tmp_path / f"in{mb}"
        d.mkdir()
        _write_corpus(d / "corpus.jsonl", docs, mb)
        cfg = tmp_path / f"prep{mb}.yaml"
        cfg.write_text(f"""
output: {tmp_path / f'out{mb}'}
progress: false
num_cpus: 2
inputs: [{{path: {d / 'corpus.jsonl'}}}]
read: {{range_mb: 1}}  # same parallelism for both sizes: the test is about data size
steps: [{{name: normalize_whitespace}}, {{name: exact_dedup}}]
tokenizer: {{kind: load, path: {tmp_path / 'tok.json'}}}
pack: {{block_size: 256}}
write: {{shard_mb: 8}}
""")
        peaks[mb] = _peak_rss([sys.executable, "-m", "pipelines.cli", "prep", "--config", str(cfg)])
        m = json.loads((tmp_path / f"out{mb}/manifest.json").read_text())
        assert m["ledger"][0]["rows_out"] > 0
    assert m["splits"]["train"]["tokens"] > 5_000_000  # the 30 MB run really processed ~10x the tokens
    ratio = peaks[30] / peaks[3]
    print(f"peak RSS (process tree): 3 MB input {peaks[3] / 2**20:.0f} MiB, 30 MB input {peaks[30] / 2**20:.0f} MiB, "
          f"ratio {ratio:.2f}")
    assert ratio < 1.5, peaks
