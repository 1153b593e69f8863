"""Batch generation end to end on a real local Ray: outputs, error rows, n > 1, formats, exactly-once resume
after a killed actor, and the refusal to resume with other settings."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from pipelines.generate import GenerateConfig, GenerateTesting, run
from pipelines.generate.pipeline import OutputMismatchError

FIX = sys.modules["raygpt_gen_test_fixtures"]
SENTS = [s + " ." for s in FIX.WORDS.split(" . ") if s.strip()]


def make_cfg(ckpt, inp, out, **kw) -> GenerateConfig:
    base = dict(checkpoint=str(ckpt), input=str(inp), output=str(out), task="summarize", max_field_chars=200,
                sampling={"max_new_tokens": 4, "truncate": "left"}, chunk_rows=8, batch_size=4, concurrency=1,
                torch_threads=1)
    base.update(kw)
    return GenerateConfig(**base)


def stats(out: Path) -> dict[str, tuple[int, int]]:
    return {n: (s.st_ino, s.st_mtime_ns) for n, s in FIX.shards(out).items()}


def check_exactly_once(rows: list[dict], ids: list[str], n_of: dict[str, int] | None = None) -> None:
    keys = [(r["id"], r["index"]) for r in rows]
    assert len(keys) == len(set(keys)), "an (id, index) appears twice"
    want = {(i, k) for i in ids for k in range((n_of or {}).get(i, 1))}
    assert set(keys) == want


@pytest.mark.slow
def test_generate_end_to_end_errors_n_and_resume(ray_session, tiny_checkpoint, tmp_path):
    from gptcore.checkpoint import checkpoint_id

    rows = [{"id": f"doc-{i:03d}", "article": SENTS[i % len(SENTS)], "title": f"T{i}"} for i in range(20)]
    rows[3]["temperature"] = -1.0  # invalid sampling parameter -> error row, the job goes on
    rows[5].update(n=3, temperature=0.9)  # three outputs for this id
    rows[7].update(article="police are asking witnesses " * 40, truncate="error")  # too long for block_size 64
    inp = FIX.write_jsonl(tmp_path / "in" / "part-0.jsonl", rows)
    out = tmp_path / "out"
    cfg = make_cfg(tiny_checkpoint, inp.parent, out, keep_columns=["title"], max_field_chars=0)
    s1 = run(cfg)
    assert s1["ids"] == 20 and s1["chunks_total"] == 3 and s1["chunks_generated"] == 3 and s1["rows"] == 22
    assert s1["errors"] == 2

    got = FIX.read_rows(out)
    check_exactly_once(got, [r["id"] for r in rows], {"doc-005": 3})
    by = {(r["id"], r["index"]): r for r in got}
    bad_t, too_long = by[("doc-003", 0)], by[("doc-007", 0)]
    assert "temperature" in bad_t["error"] and bad_t["text"] is None and bad_t["finish_reason"] == "error"
    assert "prompt too long" in too_long["error"] and "block_size=64" in too_long["error"]
    ok = [r for r in got if r["error"] is None]
    assert len(ok) == 20
    ck = checkpoint_id(tiny_checkpoint)
    for r in ok:
        assert r["checkpoint_id"] == ck and r["tokenizer_id"] and r["prompt"].endswith("TL;DR:")
        assert 1 <= r["completion_tokens"] <= 4 and r["finish_reason"] in ("stop", "length")
        assert r["prompt_tokens"] > 0 and r["title"] == f"T{int(r['id'][4:])}"
        params = json.loads(r["sampling_params"])
        assert params["max_new_tokens"] == 4 and params["seed"] == r["seed"]
    assert {json.loads(by[("doc-005", k)]["sampling_params"])["n"] for k in range(3)} == {3}

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["ids"] == 20 and manifest["counts"]["rows"] == 22 and manifest["counts"]["errors"] == 2
    for sh in manifest["shards"]:
        assert hashlib.sha256((out / sh["path"]).read_bytes()).hexdigest() == sh["sha256"]

    # re-run: nothing to do, the committed shards are not touched
    before = stats(out)
    s2 = run(cfg)
    assert s2["chunks_generated"] == 0 and s2["chunks_skipped"] == 3 and stats(out) == before
    logs = FIX.run_logs(out)
    assert [len(x["chunks_generated"]) for x in logs] == [3, 0] and all(x["status"] == "succeeded" for x in logs)

    # a different generation setting must not be mixed into this output
    with pytest.raises(OutputMismatchError, match="sampling"):
        run(make_cfg(tiny_checkpoint, inp.parent, out, keep_columns=["title"], max_field_chars=0,
                     sampling={"max_new_tokens": 5, "truncate": "left"}))

    # another plan over the same output (here: only the first 10 ids): the shard it shares is kept, the
    # others are moved aside (never mixed in), and each planned id is present exactly once
    s3 = run(make_cfg(tiny_checkpoint, inp.parent, out, keep_columns=["title"], max_field_chars=0, limit=10))
    assert s3["chunks_skipped"] == 1 and s3["chunks_generated"] == 1 and s3["ids"] == 10
    assert stats(out)[sorted(before)[0]] == before[sorted(before)[0]]
    check_exactly_once(FIX.read_rows(out), [r["id"] for r in rows[:10]], {"doc-005": 3})
    assert len(list((out / "_superseded").rglob("part-*.parquet"))) == 2


@pytest.mark.slow
def test_csv_without_ids_by_url_through_the_ray_sort(ray_session, tiny_checkpoint, tmp_path):
    # CSV through a file:// URL, no id column: ids are row hashes and a duplicated row is generated
    # once; the `complete` task; per-row seeds; two outputs per row; the big-input path (Ray Data read
    # and prepare tasks, Ray Data sort)
    rows = [{"prompt": SENTS[i % len(SENTS)], "topic": f"t{i}", "seed": i} for i in range(4)]
    pacsv.write_csv(pa.Table.from_pylist(rows + rows[:1]), tmp_path / "in.csv")
    out = tmp_path / "out-csv"
    s = run(make_cfg(tiny_checkpoint, f"file://{tmp_path}/in.csv", f"file://{out}", task="complete",
                     keep_columns=["topic"], driver_max_bytes=0,
                     sampling={"max_new_tokens": 3, "n": 2, "temperature": 1.0, "truncate": "left"}))
    assert s["ids"] == 4 and s["duplicate_rows"] == 1 and s["rows"] == 8 and s["errors"] == 0
    got = FIX.read_rows(out)
    assert all(len(r["id"]) == 32 for r in got)  # sha256-based row ids
    check_exactly_once(got, sorted({r["id"] for r in got}), {r["id"]: 2 for r in got})
    assert sorted((r["topic"], r["seed"]) for r in got) == sorted((f"t{i}", i) for i in range(4) for _ in range(2))


@pytest.mark.slow
def test_killed_actor_is_retried_and_nothing_is_lost_or_duplicated(ray_session, tiny_checkpoint, tmp_path):
    rows = [{"id": f"k{i:03d}", "article": SENTS[i % len(SENTS)]} for i in range(40)]
    inp = FIX.write_jsonl(tmp_path / "in.jsonl", rows)
    out, pids = tmp_path / "out", tmp_path / "pids"
    cfg = make_cfg(tiny_checkpoint, inp, out, chunk_rows=5, batch_size=5,
                   testing=GenerateTesting(pid_dir=str(pids), debug_delay_s=0.5))
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(run(cfg)), daemon=True)
    t.start()

    def busy_actor():  # an actor that has finished 2 of the 8 batches: it is mid-run
        for f in pids.glob("actor-*.pid"):
            lines = f.read_text().split()
            if len(lines) == 2 and int(lines[1].split("=")[1]) >= 2:
                return int(lines[0])
        return None

    victim = FIX.wait_for(busy_actor, 120)
    assert victim, "no actor progressed"
    os.kill(victim, signal.SIGKILL)
    t.join(timeout=180)
    assert not t.is_alive() and result, "the run did not finish after the actor was killed"
    assert len(list(pids.glob("actor-*.pid"))) >= 2, "Ray did not restart the killed actor"
    assert result["chunks_generated"] == 8 and result["rows"] == 40
    check_exactly_once(FIX.read_rows(out), [r["id"] for r in rows])

    before = stats(out)
    again = run(make_cfg(tiny_checkpoint, inp, out, chunk_rows=5, batch_size=5))
    assert again["chunks_generated"] == 0 and stats(out) == before
