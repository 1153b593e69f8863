"""Exactly-once across a killed driver: `raygpt generate` (its own local Ray) is SIGKILLed after its first
committed shard; the re-run generates only the missing chunks and leaves the committed ones untouched."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipelines.generate import GenerateConfig, run

FIX = sys.modules["raygpt_gen_test_fixtures"]
REPO = Path(__file__).resolve().parents[3]


def ray_pids_under(tmpdir: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if tmpdir.encode() in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
            except OSError:
                pass
    return out


@pytest.mark.slow
def test_killed_driver_resumes_without_loss_or_duplicates(ray_session, tiny_checkpoint, tmp_path):
    sents = [s + " ." for s in FIX.WORDS.split(" . ") if s.strip()]
    rows = [{"id": f"d{i:03d}", "article": sents[i % len(sents)]} for i in range(40)]
    inp = FIX.write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    args = ["--checkpoint", str(tiny_checkpoint), "--input", str(inp), "--output", str(out), "--task", "summarize",
            "max_new_tokens=4", "truncate=left", "chunk_rows=5", "batch_size=5", "torch_threads=1",
            "ray_address=local", "testing.debug_delay_s=0.5"]
    ray_tmp = tempfile.mkdtemp(prefix="rgk", dir="/tmp")  # short: Ray socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_TMPDIR"] = ray_tmp
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "generate", *args], cwd=str(REPO), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        first = FIX.wait_for(lambda: FIX.shards(out) or proc.poll() is not None, 180)
        assert first and proc.poll() is None, "the driver ended before committing a first shard"
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies: no cleanup code of ours runs
        proc.wait(timeout=30)
    finally:
        # the driver's own local Ray must go away with it (Ray's reaper); never leave it running
        gone = FIX.wait_for(lambda: not ray_pids_under(ray_tmp), 30, 0.2)
        for pid in ray_pids_under(ray_tmp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert gone, "processes of the killed driver's local Ray were left running"
    shutil.rmtree(ray_tmp, ignore_errors=True)

    committed = {n: (s.st_ino, s.st_mtime_ns) for n, s in FIX.shards(out).items()}
    assert 1 <= len(committed) < 8, committed
    assert not (out / "manifest.json").exists(), "a killed run must not leave a manifest"

    summary = run(GenerateConfig(checkpoint=str(tiny_checkpoint), input=str(inp), output=str(out), task="summarize",
                                 sampling={"max_new_tokens": 4, "truncate": "left"}, chunk_rows=5, batch_size=5,
                                 torch_threads=1))
    assert summary["chunks_skipped"] == len(committed)
    assert summary["chunks_generated"] == 8 - len(committed)
    after = {n: (s.st_ino, s.st_mtime_ns) for n, s in FIX.shards(out).items()}
    assert all(after[n] == v for n, v in committed.items()), "a committed shard was regenerated"
    got = FIX.read_rows(out)
    keys = [(r["id"], r["index"]) for r in got]
    assert len(keys) == len(set(keys)) == 40 and {k[0] for k in keys} == {r["id"] for r in rows}
    logs = FIX.run_logs(out)
    assert logs[0]["status"] == "running"  # the killed run never finished its record
    # its record may lag its last commit (killed in between); the shards are the truth
    assert set(logs[0].get("chunks_generated", [])) <= set(logs[-1]["chunks_skipped"])
