"""The dedup barrier's file-based shuffle: key files hold one Parquet row group per partition and a reader
of partition p gets exactly that partition's rows; the decisions (and the prep's shards, byte for byte) do
not depend on the number of partitions or tasks in flight; the driver receives key-file names, one result
per barrier task and the verified pairs, nothing that grows with the key rows; a bad dedup_partitions
is refused in one line.

    .venv/bin/python -m pytest tests/pipelines/data/test_dedup_shuffle.py -q
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.config import ConfigError, from_dict
from pipelines.data import PrepConfig, dedup_shuffle, run
from pipelines.data.config import InputSpec
from pipelines.data.dedup import ExactDedupConfig, FuzzyDedupConfig, Signatures, key_rows
from pipelines.data.dedup_shuffle import (
    auto_partitions,
    cluster_losers_arrow,
    decide_task,
    doc_bucket,
    exact_task,
    part_count,
    read_part,
    read_partition,
    sets_task,
    spanning_edges,
    verify_task,
    write_key_file,
)
from pipelines.data.dedup_stage import BUCKETS_PER_PARTITION, decide_barrier, task_limit, work_file_id, work_file_name
from pipelines.data.manifest import shard_paths
from pipelines.data.plan import Barrier
from pipelines.data.runner import batch_to_table

pytestmark = pytest.mark.slow

FUZZY = FuzzyDedupConfig(ngram_size=2, threshold=0.9)
BAR = Barrier(exact=ExactDedupConfig(), fuzzy=FUZZY, order=["exact_dedup", "fuzzy_dedup"])


def _edit(text: str, frac: float, rng: random.Random) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, int(len(words) * frac))):
        words[i] = rng.choice(["river", "lantern", "copper", "meadow"])
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(shared_data):
    """80 BBC articles + 30 near copies (2-5% of words edited) + 10 exact copies, shuffled."""
    rng = random.Random(3)
    docs = [json.loads(l)["article"] for l in (shared_data / "bbc-news-summary/bbc_news_summary.jsonl").open()][:80]
    ids = [f"doc{i:04d}" for i in range(len(docs))]
    for j, src in enumerate(rng.sample(range(80), 30)):
        docs.append(_edit(docs[src], rng.uniform(0.02, 0.05), rng))
        ids.append(f"near{j:04d}")
    for j, src in enumerate(rng.sample(range(80), 10)):
        docs.append(docs[src])
        ids.append(f"copy{j:04d}")
    order = list(range(len(docs)))
    rng.shuffle(order)
    return [ids[i] for i in order], [docs[i] for i in order]


def _stage(ids, docs, stage_dir, partitions, per_file=20):
    """What the segment before a barrier writes: work files and their key rows (one table per file)."""
    import ray.data

    sigs = Signatures(BAR.exact, BAR.fuzzy)
    stage_dir.mkdir(parents=True, exist_ok=True)
    files, tables = [], []
    for order, s in enumerate(range(0, len(ids), per_file)):
        n = len(ids[s:s + per_file])
        batch = sigs({"text": docs[s:s + per_file], "drop": [""] * n, "doc_id": ids[s:s + per_file],
                      "source": ["t"] * n})
        f = stage_dir / work_file_name(order, 0)
        pq.write_table(batch_to_table(batch, drop_cols=("_xh", "_sig")), f)
        files.append(str(f))
        tables.append(key_rows(batch["doc_id"], batch["drop"], batch["_xh"], batch["_sig"], FUZZY, partitions,
                               json.dumps({"steps": {}}), work_file_id(order, 0)))
    return files, ray.data.from_arrow(tables), tables


def test_a_key_file_has_one_part_per_partition(corpus, tmp_path):
    ids, docs = corpus
    _, _, tables = _stage(ids[:40], docs[:40], tmp_path / "stage", partitions=5)
    paths = [write_key_file(t, 5, str(tmp_path / f"k{i}.parts")) for i, t in enumerate(tables)]
    for path, t in zip(paths, tables):
        assert part_count(path) == 5
        assert [read_part(path, p).num_rows for p in range(5)] == \
            np.bincount(t.column("_part").to_numpy(), minlength=5).tolist()
    for p in range(5):
        got = read_partition(paths, p)
        assert set(got.column("_part").to_pylist()) <= {p}
        want = sorted((r["key"], r["doc_id"]) for t in tables for r in t.to_pylist() if r["_part"] == p)
        assert sorted(zip(got.column("key").to_pylist(), got.column("doc_id").to_pylist())) == want
        one = read_part(paths[0], p)  # sorted by key, then doc_id, inside a part
        pairs = list(zip(one.column("key").to_pylist(), one.column("doc_id").to_pylist()))
        assert pairs == sorted(pairs)
    assert sum(read_partition(paths, p).num_rows for p in range(5)) == sum(t.num_rows for t in tables)


def _losers(stage_dir) -> dict[str, bytes]:
    d = stage_dir / "losers"
    return {p: (d / p).read_bytes() for p in sorted(os.listdir(d))}


def test_decisions_do_not_depend_on_partitions_or_tasks(corpus, tmp_path, ray_session):
    ids, docs = corpus
    runs = {}
    for partitions, limit in ((1, 1), (7, 0), (3, 2)):
        stage = tmp_path / f"p{partitions}"
        files, key_ds, _ = _stage(ids, docs, stage, partitions)
        dec = decide_barrier(BAR, key_ds, partitions, str(stage), limit=limit)
        runs[partitions] = (dec, _losers(stage))
        assert not (stage / "shuffle").exists()  # the shuffle files are gone once the barrier is decided
    (d1, l1), (d7, l7), (d3, l3) = runs[1], runs[7], runs[3]
    assert len(d1.exact) == 10 and len(d1.fuzzy) >= 8, d1.info(BAR)
    assert l1 == l7 == l3  # the same loser files, byte for byte
    assert d1.info(BAR) == d7.info(BAR) == d3.info(BAR)
    # 6 work files. decide: one per partition; exact and sets: one per group of work files (<= partitions);
    # verify: one per bucket of candidate pairs (BUCKETS_PER_PARTITION x max(partitions, tasks in flight))
    k = BUCKETS_PER_PARTITION
    assert (d1.tasks, d7.tasks, d3.tasks) == (1 + 1 + 1 + k, 7 + 6 + 6 + k * max(7, task_limit()), 3 + 3 + 3 + k * 3)


def test_the_driver_receives_names_task_results_and_verified_pairs(corpus, tmp_path, ray_session):
    ids, docs = corpus
    stage = tmp_path / "stage"
    files, key_ds, tables = _stage(ids, docs, stage, 4)
    dec = decide_barrier(BAR, key_ds, 4, str(stage))
    key_row_count = sum(t.num_rows for t in tables)
    # one key-file name per work file, one result per task, the verified pairs (cut to a spanning forest)
    assert len(files) + dec.tasks < dec.rows_seen <= len(files) + dec.tasks + dec.verified_pairs
    assert dec.tasks <= 3 * 4 + BUCKETS_PER_PARTITION * max(4, task_limit())  # decide, exact, sets; verify
    # beyond one small result per task, fewer rows than the candidates and exact losers
    assert dec.rows_seen < key_row_count / 10 and dec.rows_seen - dec.tasks < dec.candidate_pairs + len(dec.exact)
    items = dec.next_items(files)
    for it in items:  # a reference to the loser files travels, never doc ids
        assert len(json.dumps(it, default=lambda o: o.to_json())) < 300


def test_prep_shards_are_identical_for_any_dedup_partitions(corpus, tmp_path, ray_session):
    ids, docs = corpus
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = {}
    for parts in (1, 6):
        cfg = from_dict(PrepConfig, {
            "output": str(tmp_path / f"out{parts}"), "inputs": [{"path": str(src)}], "progress": False,
            "steps": [{"name": "exact_dedup"}, {"name": "fuzzy_dedup", "params": {"ngram_size": 2, "threshold": 0.9}}],
            "read": {"batch_rows": 16}, "tokenizer": {"kind": "char"}, "pack": {"block_size": 64},
            "dedup_partitions": parts})
        m = run(cfg)
        paths = shard_paths(m, "train") + shard_paths(m, "val")
        out[parts] = (m["dedup"], m["config_hash"], [open(p, "rb").read() for p in paths])
    assert out[1] == out[6]
    assert out[1][0]["exact_dedup"] == {"duplicates": 10} and out[1][0]["fuzzy_dedup"]["near_duplicates"] >= 8


@pytest.mark.parametrize("bad", [-1, 1025, 2.5])
def test_a_bad_dedup_partitions_is_refused_in_one_line(tmp_path, bad):
    with pytest.raises(ConfigError) as e:
        PrepConfig(output=str(tmp_path), inputs=[InputSpec(path="x.txt")], dedup_partitions=bad)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("dedup_partitions: must be") and repr(bad) in msg and "e.g." in msg


def test_default_partitions_follow_the_input_size():
    rows = 1 + FUZZY.bands  # exact + one per band
    assert auto_partitions(0, rows) == 1 and auto_partitions(10 << 40, rows) == 1024
    small, big = auto_partitions(64 << 20, rows), auto_partitions(1 << 30, rows)
    assert 1 <= small < big < 1024 and 12 <= big // small <= 20  # ~proportional: ~8 MB of key rows each


def test_a_spanning_forest_keeps_the_clusters():
    """What a verify task returns: one edge per member to its cluster's smallest doc_id, the same losers."""
    import pyarrow as pa

    rng = random.Random(5)
    ids = [f"{rng.choice('abc')}{k:04d}" for k in range(600)]
    file_of = {d: rng.randrange(9) for d in ids}
    pairs = sorted({tuple(sorted(rng.sample(ids[:300], 2))) for _ in range(700)})
    t = pa.table({"a": [p[0] for p in pairs], "b": [p[1] for p in pairs],
                  "fa": [file_of[p[0]] for p in pairs], "fb": [file_of[p[1]] for p in pairs]})
    forest = spanning_edges(t)
    losers, files = cluster_losers_arrow(t)
    assert forest.num_rows == len(losers) < t.num_rows
    assert sorted(forest.column("b").to_pylist()) == sorted(losers.to_pylist())
    assert all(a < b and file_of[a] == fa and file_of[b] == fb for a, b, fa, fb in
               zip(*(forest.column(c).to_pylist() for c in ("a", "b", "fa", "fb"))))
    f_losers, f_files = cluster_losers_arrow(forest)
    assert sorted(zip(f_losers.to_pylist(), f_files.tolist())) == sorted(zip(losers.to_pylist(), files.tolist()))


def test_verification_reads_each_work_file_once(corpus, tmp_path, monkeypatch, ray_session):
    """The barrier's tasks called in-process: every work file is decoded by one sets_task, once, and each
    needed document's set is computed once per bucket; the verified pairs give the barrier's own clusters."""
    import pyarrow as pa

    ids, docs = corpus
    stage = tmp_path / "stage"
    files, _, tables = _stage(ids, docs, stage, 3)
    shuffle, losers = tmp_path / "shuffle", tmp_path / "losers"
    shuffle.mkdir()
    keys = [write_key_file(t, 3, str(shuffle / f"k{i}.parts")) for i, t in enumerate(tables)]
    groups, buckets = 3, 4
    cand = sum(decide_task(keys, p, 5000, groups, buckets, str(shuffle))["cand"] for p in range(3))
    ends = [str(shuffle / f"end-{p:05d}.parts") for p in range(3)]
    for g in range(groups):
        exact_task([str(shuffle / f"exact-{p:05d}.parts") for p in range(3)], g, str(losers))
    reads = []
    real = dedup_shuffle.doc_sets
    monkeypatch.setattr(dedup_shuffle, "doc_sets", lambda paths, need, cfg: reads.append(paths) or real(paths, need, cfg))
    n_sets = sum(sets_task(ends, g, buckets, FUZZY, str(stage), str(losers), str(shuffle)) for g in range(groups))
    assert sorted(p for paths in reads for p in paths) == sorted(set(files))  # each work file once
    sets_files = [str(shuffle / f"sets-{g:05d}.parts") for g in range(groups)]
    per_bucket = [[d for f in sets_files for d in read_part(f, v).column("doc").to_pylist()] for v in range(buckets)]
    assert all(len(b) == len(set(b)) for b in per_bucket) and sum(map(len, per_bucket)) == n_sets
    got = [verify_task([str(shuffle / f"cand-{p:05d}.parts") for p in range(3)], sets_files, v, buckets, FUZZY)
           for v in range(buckets)]
    checked = sum(n for _, n, _ in got)
    assert 0 < checked <= cand
    pairs = pa.concat_tables([t for t, _, _ in got])
    mine = sorted(cluster_losers_arrow(pairs)[0].to_pylist())
    _, key_ds, _ = _stage(ids, docs, tmp_path / "ref", 3)
    ref = decide_barrier(BAR, key_ds, 3, str(tmp_path / "ref"))
    assert mine == sorted(ref.fuzzy) and len(mine) >= 8


def test_doc_bucket_is_a_stable_spread_of_ids():
    import pyarrow as pa

    ids = [f"{i:040x}" for i in range(0, 4000 * 7919, 7919)] + ["", "é", "a"]
    b = doc_bucket(pa.array(ids), 7)
    assert b.dtype == np.int64 and b.min() >= 0 and b.max() < 7
    assert np.bincount(b[:4000], minlength=7).min() > 4000 / 7 * 0.8  # spread, not clustered
    # the same id -> the same bucket, whatever array, slice or chunking it comes in
    chunked = pa.chunked_array([pa.array(ids[:100]), pa.array(ids[100:])])
    assert (doc_bucket(chunked, 7) == b).all()
    assert (doc_bucket(pa.array(ids).slice(50, 30), 7) == b[50:80]).all()
    assert (doc_bucket(pa.array(ids, pa.large_string()), 7) == b).all()
    assert len({int(x) for x in doc_bucket(pa.array(["x"] * 5), 1000)}) == 1


def test_doc_bucket_and_doc_sets_work_in_chunks_with_the_same_result(corpus, tmp_path, monkeypatch):
    """Both hash in bounded chunks (of id bytes / of documents) so their memory does not grow with the
    partition or the work file; the chunk size changes nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.data import dedup

    ids = pa.array([f"doc-{i}-" + "x" * (i % 37) for i in range(3000)] + ["", "é" * 300])
    whole = doc_bucket(ids, 11)
    for chunk in (1, 7, 4096):
        monkeypatch.setattr(dedup_shuffle, "DOC_BUCKET_CHUNK_BYTES", chunk)
        assert (doc_bucket(ids, 11) == whole).all()
    doc_ids, docs = corpus
    path = str(tmp_path / "w.parquet")
    pq.write_table(pa.table({"doc_id": doc_ids, "text": docs}), path, row_group_size=17)
    want = set(doc_ids[::3])
    monkeypatch.setattr(dedup, "SETS_BATCH_ROWS", 1 << 20)
    ref = dedup.doc_sets([path], want, FUZZY)
    assert sorted(ref) == sorted(want)
    for rows in (1, 5):
        monkeypatch.setattr(dedup, "SETS_BATCH_ROWS", rows)
        got = dedup.doc_sets([path], want, FUZZY)
        assert sorted(got) == sorted(ref) and all(np.array_equal(got[k], ref[k]) for k in ref)


def test_a_part_file_reads_each_part_alone_in_any_write_order(tmp_path):
    """Segments written in any order, several per part, come back per part in write order; an empty part has
    the schema; a file that is not one, or a part out of range, fails naming the file; a failed write
    leaves neither the file nor its temp file."""
    import pyarrow as pa

    schema = pa.schema([("doc", pa.string()), ("v", pa.int64())])
    path = str(tmp_path / "x.parts")
    with dedup_shuffle.PartWriter(path, schema, 4) as w:
        for p, rows in [(2, [1, 2]), (0, [3]), (2, [4]), (3, [])]:
            w.write(p, pa.table({"doc": [f"d{r}" for r in rows], "v": rows}, schema=schema))
    assert part_count(path) == 4
    assert read_part(path, 2).column("v").to_pylist() == [1, 2, 4]
    assert read_part(path, 0).to_pylist() == [{"doc": "d3", "v": 3}]
    for p in (1, 3):
        assert read_part(path, p).num_rows == 0 and read_part(path, p).schema == schema
    assert read_part(path, 2, ["v"]).column_names == ["v"]
    with pytest.raises(ValueError, match="out of range"):
        read_part(path, 4)
    bad = tmp_path / "bad.parts"
    bad.write_bytes(b"not a shuffle file at all, just some bytes here")
    with pytest.raises(ValueError, match=r"bad\.parts: not a raygpt shuffle file"):
        read_part(str(bad), 0)
    with pytest.raises(RuntimeError), dedup_shuffle.PartWriter(str(tmp_path / "y.parts"), schema, 2) as w:
        w.write(0, pa.table({"doc": ["a"], "v": [1]}, schema=schema))
        raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parts", "x.parts"]
