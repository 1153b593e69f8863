"""jobs/nightly_generate.py: date partitions, idempotence, the overlap guard; and the thin job entrypoints."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pytest

from jobs.nightly_generate import NightlyConfig, main, partition_paths, resolve_date
from pipelines.config import ConfigError
from pipelines.ops.lock import LOCKED_EXIT_CODE, RunLock

FIX = sys.modules["raygpt_gen_test_fixtures"]
REPO = Path(__file__).resolve().parents[2]
DAY = "2024-05-01"


def test_dates_and_paths():
    assert resolve_date("2024-02-29") == "2024-02-29"
    assert resolve_date("yesterday", today=date(2024, 3, 1)) == "2024-02-29"
    assert resolve_date("today", today=date(2024, 3, 1)) == "2024-03-01"
    for bad in ("2024-02-30", "01/05/2024", "tomorrow"):
        with pytest.raises(ConfigError, match="YYYY-MM-DD"):
            resolve_date(bad)
    cfg = NightlyConfig(input_root="s3://b/in/", output_root="/data/out")
    assert partition_paths(cfg, DAY) == ("s3://b/in/dt=2024-05-01", "/data/out/dt=2024-05-01",
                                         "/data/out/_locks/dt=2024-05-01.lock")
    with pytest.raises(ConfigError, match="input_root is required"):
        NightlyConfig(output_root="/x")
    with pytest.raises(ConfigError, match="generate.input"):
        NightlyConfig(input_root="/a", output_root="/b", generate={"input": "/c"})


def last_json(out: str) -> dict:
    """The JSON document main() printed last (Ray may log to the same captured stdout before it)."""
    import re

    starts = [m.start() for m in re.finditer(r"(?m)^\{$", out)]
    return json.loads(out[starts[-1]:])


def _args(tmp_path: Path, ckpt) -> list[str]:
    return [f"input_root=file://{tmp_path / 'in'}", f"output_root={tmp_path / 'out'}",
            f"generate.checkpoint={ckpt}", "generate.task=summarize", "generate.chunk_rows=4",
            "generate.batch_size=4", "generate.torch_threads=1", "generate.sampling.max_new_tokens=3",
            "generate.sampling.truncate=left"]


def test_missing_partition_and_bad_config_exit_2(tmp_path, capsys):
    assert main(["--date", DAY, f"input_root={tmp_path}/in", f"output_root={tmp_path}/out",
                 "generate.checkpoint=/nope"]) == 2
    assert "no input partition for 2024-05-01" in capsys.readouterr().err
    assert main(["--date", DAY, "output_root=/x"]) == 2
    assert "input_root is required" in capsys.readouterr().err


def test_a_second_concurrent_run_exits_75_with_the_owner(tmp_path, capsys):
    FIX.write_jsonl(tmp_path / "in" / f"dt={DAY}" / "a.jsonl", FIX.articles(2))
    _, _, lock_path = partition_paths(NightlyConfig(input_root="x", output_root=str(tmp_path / "out")), DAY)
    with RunLock(lock_path, ttl_s=3600, note="the first run"):
        rc = main(["--date", DAY, *_args(tmp_path, "/ckpt-not-needed")])
    assert rc == LOCKED_EXIT_CODE == 75
    err = capsys.readouterr().err
    assert "another run holds" in err and "_locks/dt=2024-05-01.lock" in err and "pid=" in err


@pytest.mark.slow
def test_nightly_run_takes_over_a_stale_lock_and_is_idempotent(ray_session, tiny_checkpoint, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in" / f"dt={DAY}").mkdir(parents=True)  # Parquet partitions this time
    pq.write_table(pa.Table.from_pylist(FIX.articles(6)), tmp_path / "in" / f"dt={DAY}" / "part-0.parquet")
    FIX.write_jsonl(tmp_path / "in" / "dt=2024-05-02" / "part-0.jsonl", FIX.articles(3))  # another date: untouched
    _, out, lock_path = partition_paths(NightlyConfig(input_root="x", output_root=str(tmp_path / "out")), DAY)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Path(lock_path).parent.mkdir(parents=True)
    Path(lock_path).write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": dead.pid,
                                           "started_at_epoch": time.time(), "heartbeat_at_epoch": time.time(),
                                           "ttl_s": 3600, "token": "crashed-run"}))
    assert main(["--date", DAY, *_args(tmp_path, tiny_checkpoint)]) == 0
    cap = capsys.readouterr()
    assert "took over a stale lock" in cap.err and f"pid={dead.pid}" in cap.err
    assert last_json(cap.out)["status"] == "generated"
    assert not Path(lock_path).exists(), "the lock must be released"
    rows = FIX.read_rows(Path(out))
    assert sorted(r["id"] for r in rows) == [f"doc-{i:04d}" for i in range(6)]
    assert not (tmp_path / "out" / "dt=2024-05-02").exists()

    # the same date again: a no-op (no Ray work, no new shards)
    before = {n: s.st_mtime_ns for n, s in FIX.shards(Path(out)).items()}
    assert main(["--date", DAY, *_args(tmp_path, tiny_checkpoint)]) == 0
    assert last_json(capsys.readouterr().out)["status"] == "already-complete"
    assert {n: s.st_mtime_ns for n, s in FIX.shards(Path(out)).items()} == before


def test_thin_entrypoints_forward_to_the_cli():
    r = subprocess.run([sys.executable, "-m", "jobs.generate", "--help"], capture_output=True, text=True,
                       cwd=str(REPO), timeout=120)
    assert r.returncode == 0 and "--checkpoint" in r.stdout and "key=value" in r.stdout
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "nightly_generate.py"), "--help"], capture_output=True,
                       text=True, cwd="/", timeout=120)
    assert r.returncode == 0 and "--date" in r.stdout
    for mod in ("jobs.prep", "jobs.train"):
        src = (REPO / (mod.replace(".", "/") + ".py")).read_text()
        assert f'main(["{mod.split(".")[1]}", *sys.argv[1:]])' in src
