"""What the prep driver receives does not grow with the corpus: per-batch summaries of a fixed size (the
tokens are spilled and packed into shards by worker tasks, byte for byte as the sequential packer and writer
would), and at a dedup barrier one key-file name per work file and one count per barrier task however
many duplicates there are (each work file's losers are written to, and read back from, its own loser file).

    .venv/bin/python -m pytest tests/pipelines/data/test_prep_bounded.py -q
"""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.data.dedup import ApplyLosers, ExactDedupConfig, Signatures, key_rows
from pipelines.data.dedup_stage import decide_barrier, work_file_id, work_file_name
from pipelines.data.pack import Packer
from pipelines.data.plan import Barrier
from pipelines.data.runner import batch_to_table
from pipelines.data.shards import Layout, ShardTask, Spill, SplitPlan, spill_name
from pipelines.data.write import ShardWriter


def _tokenized(rng: np.random.Generator, n_docs: int, with_mask: bool) -> tuple[dict, dict]:
    """A batch as the final segment's Tokenize step leaves it: ids (values, offsets), val flags, mask."""
    lens = rng.integers(1, 300, size=n_docs)
    offs = np.concatenate(([0], np.cumsum(lens)))
    vals = rng.integers(0, 5000, size=int(offs[-1])).astype(np.int32)
    drops = ["" if k % 17 else "gopher_quality:short" for k in range(n_docs)]
    batch = {"text": ["x" * int(n) for n in lens], "drop": drops, "source": ["s"] * n_docs}
    out = {"drop": drops, "_ids": (vals, offs), "_val": rng.random(n_docs) < 0.2}
    if with_mask:
        out["_mask"] = rng.integers(0, 2, size=vals.size).astype(np.int8)
    return batch, out


def test_batch_summaries_do_not_grow_with_the_batch(tmp_path):
    lay = Layout(block_size=64)
    sizes = {}
    for n in (20, 4000):
        batch, out = _tokenized(np.random.default_rng(n), n, False)
        sizes[n] = len(Spill(str(tmp_path), lay)(batch, out, {"steps": {}}, spill_name(0, n)))
    # 200x the documents: the same counters, a few more digits
    assert sizes[4000] < sizes[20] + 100, sizes


@pytest.mark.parametrize("with_mask", [False, True])
def test_shard_tasks_write_what_the_sequential_packer_wrote(tmp_path, with_mask):
    lay = Layout(block_size=32, with_mask=with_mask, rows_per_shard=50, row_group_rows=16)
    rng = np.random.default_rng(3)
    spill = Spill(str(tmp_path), lay)
    plans = {s: SplitPlan(s, lay) for s in ("train", "val")}
    ref = {s: ShardWriter(str(tmp_path / "ref"), s, 32, 50, 16, with_mask=with_mask) for s in plans}
    packers = {s: Packer(32, with_mask) for s in plans}
    for k in range(7):
        batch, out = _tokenized(rng, 40, with_mask)
        summary = json.loads(spill(batch, out, {"steps": {}}, spill_name(0, k)))
        vals, offs = out["_ids"]
        for s, want in (("train", False), ("val", True)):
            plans[s].add(summary["file"], summary["splits"][s]["n"], summary["splits"][s]["n_docs"])
            rows = [i for i, d in enumerate(out["drop"]) if not d and bool(out["_val"][i]) == want]
            if rows:
                flat = np.concatenate([vals[offs[i]:offs[i + 1]] for i in rows])
                m = np.concatenate([out["_mask"][offs[i]:offs[i + 1]] for i in rows]) if with_mask else None
                res = packers[s].add(flat, np.array([offs[i + 1] - offs[i] for i in rows]), m)
                if res is not None:
                    ref[s].add(*res)
    task = ShardTask(str(tmp_path / "new"), lay)
    for s in plans:
        expected = ref[s].close()
        got = [json.loads(task(it)["shard"]) for it in plans[s].items(str(tmp_path))]
        assert len(got) == len(expected) >= 2 and got == expected
        assert lay.tail_tokens(plans[s].n_tokens) == packers[s].tail_tokens()
        for sh in got:
            assert (tmp_path / "new" / sh["path"]).read_bytes() == (tmp_path / "ref" / sh["path"]).read_bytes()


def test_exact_dedup_sends_the_driver_counts_not_losers(tmp_path, ray_session):
    """2,400 documents, 1,200 of them exact copies, in 6 work files: the driver gets one key-file name per
    work file and one count per barrier task (plus the merged stats), the next segment's items carry a
    reference, not doc ids, and each work file's task binds exactly its own losers."""
    import ray.data

    rng = random.Random(5)
    words = [f"w{k}" for k in range(500)]
    uniq = [" ".join(rng.choices(words, k=40)) for _ in range(1200)]
    docs = uniq + [rng.choice(uniq) for _ in range(1200)]
    rng.shuffle(docs)
    bar = Barrier(exact=ExactDedupConfig(), order=["exact_dedup"])
    sigs = Signatures(bar.exact, None)
    files, tables = [], []
    for order, s in enumerate(range(0, len(docs), 400)):
        ids = [f"d{i:06d}" for i in range(s, s + 400)]
        batch = sigs({"text": docs[s:s + 400], "drop": [""] * 400, "doc_id": ids, "source": ["t"] * 400})
        f = tmp_path / work_file_name(order, 0)
        pq.write_table(batch_to_table(batch, drop_cols=("_xh",)), f)
        files.append(str(f))
        tables.append(key_rows(ids, batch["drop"], batch["_xh"], None, None, 3, json.dumps({"steps": {}}),
                               work_file_id(order, 0)))
    dec = decide_barrier(bar, ray.data.from_arrow(tables), 3, str(tmp_path))

    first = {}
    for i, d in enumerate(docs):
        first.setdefault(d, f"d{i:06d}")
    losers = {f"d{i:06d}" for i, d in enumerate(docs) if first[d] != f"d{i:06d}"}
    assert len(dec.exact) == len(losers) == 2400 - len(set(docs)) and set(dec.exact) == losers
    # one key-file name per work file and one count per barrier task (2 per partition): not O(duplicates)
    assert dec.rows_seen <= len(files) + dec.tasks and dec.tasks <= 2 * 3
    assert dec.rows_seen < len(losers) / 50

    items = dec.next_items(files)
    bound = set()
    for it in items:
        wire = json.dumps(it, default=lambda o: o.to_json())
        assert len(wire) < 300 and "d0" not in wire  # a reference travels, never the doc ids
        step = ApplyLosers("exact_dedup", "duplicate", None)
        step.bind_item(json.loads(wire))
        in_file = set(pq.read_table(it["file"], columns=["doc_id"]).column("doc_id").to_pylist())
        assert step._set <= in_file
        bound |= step._set
    assert bound == losers


def test_driver_side_clustering_on_arrow_equals_the_reference():
    """The verified pairs stay Arrow columns on the driver; the vectorised components give the losers of
    dedup.cluster_losers (every member but the smallest doc_id), each with its work file."""
    import pyarrow as pa

    from pipelines.data.dedup import cluster_losers
    from pipelines.data.dedup_stage import cluster_losers_arrow

    rng = random.Random(11)
    ids = [f"{rng.choice('abcé')}{k:04d}" for k in range(3000)]
    file_of = {d: rng.randrange(40) for d in ids}
    pairs = set()
    for _ in range(2500):  # chains, stars and isolated pairs
        x, y = sorted(rng.sample(ids[:1200], 2))
        pairs.add((x, y))
    pairs = sorted(pairs)
    t = pa.table({"a": [p[0] for p in pairs], "b": [p[1] for p in pairs],
                  "fa": [file_of[p[0]] for p in pairs], "fb": [file_of[p[1]] for p in pairs]})
    losers, files = cluster_losers_arrow(t)
    got = sorted(zip(losers.to_pylist(), files.tolist()))
    want = cluster_losers(np.array(pairs, dtype=object))
    assert [d for d, _ in got] == want and len(want) > 100
    assert all(f == file_of[d] for d, f in got)
    assert cluster_losers_arrow(None)[1].size == 0
