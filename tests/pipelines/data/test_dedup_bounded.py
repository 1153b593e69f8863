"""Dedup at a barrier keeps the driver small: fuzzy candidates are verified in Ray tasks, and the driver
receives only key-file names, one small result per barrier task and the verified pairs, never the
candidates, the exact losers or any text. The decisions equal the old driver-side path's (group_decisions + fuzzy_losers),
and every work file of the next segment carries only its own losers.

    .venv/bin/python -m pytest tests/pipelines/data/test_dedup_bounded.py -q
"""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from pipelines.data.dedup import ExactDedupConfig, FuzzyDedupConfig, Signatures, fuzzy_losers, group_decisions, key_rows
from pipelines.data.dedup_stage import decide_barrier, work_file_id, work_file_name
from pipelines.data.plan import Barrier
from pipelines.data.runner import batch_to_table

pytestmark = pytest.mark.slow


def _edit(text: str, frac: float, rng: random.Random) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, int(len(words) * frac))):
        words[i] = rng.choice(["river", "lantern", "copper", "meadow", "signal", "harbor"])
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(shared_data):
    """300 BBC articles + 120 copies with 4-8% of words edited (LSH candidates, most below a 0.95
    threshold) + 20 exact copies."""
    rng = random.Random(7)
    docs = [json.loads(l)["article"] for l in (shared_data / "bbc-news-summary/bbc_news_summary.jsonl").open()][:300]
    ids = [f"doc{i:05d}" for i in range(len(docs))]
    for j, src in enumerate(rng.sample(range(300), 120)):
        docs.append(_edit(docs[src], rng.uniform(0.04, 0.08), rng))
        ids.append(f"near{j:05d}")
    for j, src in enumerate(rng.sample(range(300), 20)):
        docs.append(docs[src])
        ids.append(f"copy{j:05d}")
    order = list(range(len(docs)))
    rng.shuffle(order)
    return [ids[i] for i in order], [docs[i] for i in order]


def _stage(ids, docs, bar: Barrier, stage_dir, partitions):
    """What the segment before a barrier writes: work files w<order>-<k>.parquet and their key rows."""
    import ray.data

    sigs = Signatures(bar.exact, bar.fuzzy)
    files, tables = [], []
    for order, s in enumerate(range(0, len(ids), 100)):
        batch = {"text": docs[s:s + 100], "drop": [""] * len(ids[s:s + 100]), "doc_id": ids[s:s + 100],
                 "source": ["test"] * len(ids[s:s + 100])}
        batch = sigs(batch)
        f = stage_dir / work_file_name(order, 0)
        pq.write_table(batch_to_table(batch, drop_cols=("_xh", "_sig")), f)
        files.append(str(f))
        tables.append(key_rows(batch["doc_id"], batch["drop"], batch["_xh"], batch["_sig"], bar.fuzzy, partitions,
                               "{}", work_file_id(order, 0)))
    return files, ray.data.from_arrow(tables)


def test_driver_gets_verified_pairs_only(corpus, tmp_path, ray_session):
    ids, docs = corpus
    fuzzy = FuzzyDedupConfig(ngram_size=2, threshold=0.95)
    bar = Barrier(exact=ExactDedupConfig(), fuzzy=fuzzy, order=["exact_dedup", "fuzzy_dedup"])
    files, key_ds = _stage(ids, docs, bar, tmp_path, partitions=3)
    dec = decide_barrier(bar, key_ds, 3, str(tmp_path))

    # the same decisions as verifying every candidate on the driver
    exact, cand, _ = group_decisions(key_ds, 3)
    fuzzy_old, info = fuzzy_losers(cand, exact, files, fuzzy)
    assert sorted(dec.exact) == exact and len(exact) == 20
    assert sorted(dec.fuzzy) == fuzzy_old
    assert (dec.candidate_pairs, dec.verified_pairs) == (info["candidate_pairs"], info["verified_pairs"])

    # what reached the driver: key-file names, one result per task, the verified pairs (bounded generously)
    assert dec.candidate_pairs >= 60 and dec.verified_pairs < dec.candidate_pairs / 2, info
    file_pairs = len(files) ** 2
    assert dec.rows_seen <= len(dec.exact) + dec.verified_pairs + len(dec.stats) + file_pairs
    assert dec.rows_seen < dec.candidate_pairs + len(dec.exact)

    # every work file of the next segment gets only its own losers
    items = dec.next_items(files)
    seen = []
    for it in items:
        in_file = set(pq.read_table(it["file"], columns=["doc_id"]).column("doc_id").to_pylist())
        for name, losers in it["losers"].items():
            assert set(losers) <= in_file, (it["file"], name)
            seen += losers
    assert sorted(seen) == sorted(list(dec.exact) + list(dec.fuzzy))
