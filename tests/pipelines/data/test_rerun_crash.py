"""Crash safety: `raygpt prep` killed (SIGKILL) after its first shard leaves no manifest, readers refuse the
directory, and the next run replaces it with exactly what a clean run produces.

    .venv/bin/python -m pytest tests/pipelines/data/test_rerun_crash.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptcore.tokenizer import train_bpe
from pipelines.config import load_config
from pipelines.data import PrepConfig, run
from pipelines.data.manifest import DatasetNotReadyError, load_manifest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def test_killed_run_leaves_no_manifest_and_rerun_equals_clean_run(shared_data, tmp_path, ray_session):
    tok = train_bpe([(shared_data / "tinyshakespeare/input.txt").read_text()[:300_000]], 600)
    tok.save(tmp_path / "tok.json")
    cfg_file = tmp_path / "prep.yaml"
    cfg_file.write_text(f"""
output: {tmp_path / 'out'}
progress: false
inputs:
  - {{path: {shared_data / 'us-presidential-addresses/addresses.jsonl'}}}
  - {{path: {shared_data / 'gutenberg'}/*.txt, text_mode: paragraph}}
read: {{batch_rows: 256}}
tokenizer: {{kind: load, path: {tmp_path / 'tok.json'}}}
pack: {{block_size: 64, val_fraction: 0.05}}
write: {{shard_mb: 0.02, row_group_rows: 16}}
""")
    out = tmp_path / "out"
    first = out / "train/part-00000.parquet"
    # a separate driver process joined to the test's Ray cluster, killed once its first shard exists
    addr = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "prep", "--config", str(cfg_file),
                             f"ray_address={addr}"], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert first.exists(), f"no shard appeared (exit code {proc.poll()})"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    with pytest.raises(DatasetNotReadyError, match="unfinished"):
        load_manifest(out)
    partial = _files(out)
    assert partial  # the killed run did write shards

    m = run(load_config(PrepConfig, cfg_file))  # the next run replaces the partial output
    clean = run(load_config(PrepConfig, cfg_file, [f"output={tmp_path / 'clean'}"]))
    assert m["id"] == clean["id"]
    assert _files(out) == _files(tmp_path / "clean") and len(_files(out)) > 10
    assert load_manifest(out, verify=True)["id"] == m["id"]

    def lines(p: Path) -> list[str]:
        return [l for l in p.read_text().splitlines() if '"created_at"' not in l]

    assert lines(out / "manifest.json") == lines(tmp_path / "clean/manifest.json")
