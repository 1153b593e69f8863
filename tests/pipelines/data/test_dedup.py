"""Dedup: vectorised hashing vs a pure-Python reference, MinHash estimates, and recall/precision of
MinHash-LSH (Ray Data groupby) on near-duplicates injected into real corpora.

    .venv/bin/python -m pytest tests/pipelines/data/test_dedup.py -q
"""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.data.dedup import (
    ExactDedupConfig,
    FuzzyDedupConfig,
    Signatures,
    cluster_losers,
    exact_hash,
    fuzzy_losers,
    group_decisions,
    key_rows,
    minhash_signatures,
    py_word_ngrams,
    word_ngram_hashes,
)
from pipelines.data.pipeline import batch_to_table


def test_ngram_hashes_match_reference_shingles():
    texts = ["The cat sat on the MAT, the cat sat.", "", "one two", "Ünïcödé wörds and ASCII words",
             "x" * 200 + " y", "a b c d e f g h"]
    for n in (1, 2, 3, 5):
        gh, goff = word_ngram_hashes(texts, n)
        for i, t in enumerate(texts):
            ref = py_word_ngrams(t, n)
            got = set(gh[goff[i]:goff[i + 1]].tolist())
            assert len(got) == len(ref), (n, t)
    # same n-grams in different documents hash the same; case and punctuation do not matter
    gh, goff = word_ngram_hashes(["Hello, World again", "hello world AGAIN!"], 2)
    assert set(gh[goff[0]:goff[1]].tolist()) == set(gh[goff[1]:goff[2]].tolist())
    assert exact_hash("A  b\nC") == exact_hash("a b c") != exact_hash("a b d")


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    base = [rng.choice(vocab) for _ in range(2000)]
    for frac in (0.02, 0.1, 0.3):
        other = list(base)
        for i in rng.sample(range(len(base)), int(frac * len(base))):
            other[i] = rng.choice(vocab)
        a, b = " ".join(base), " ".join(other)
        sa, sb = py_word_ngrams(a, 3), py_word_ngrams(b, 3)
        true = len(sa & sb) / len(sa | sb)
        gh, goff = word_ngram_hashes([a, b], 3)
        sig = minhash_signatures(gh, goff, 256, seed=1)
        est = float(np.mean(sig[0] == sig[1]))
        assert abs(est - true) < 0.08, (frac, true, est)


def _edit(text: str, frac: float, rng: random.Random, vocab: list[str]) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, round(frac * len(words)))):
        words[i] = rng.choice(vocab)
    return " ".join(words)


@pytest.fixture(scope="module")
def injected(shared_data, tmp_path_factory):
    """500 real documents (BBC articles, presidential addresses) + 100 copies with ~5% of words edited."""
    rng = random.Random(42)
    bbc = [json.loads(l)["article"] for l in (shared_data / "bbc-news-summary/bbc_news_summary.jsonl").open()][:400]
    addr = [json.loads(l)["text"] for l in (shared_data / "us-presidential-addresses/addresses.jsonl").open()][:100]
    docs = bbc + addr
    vocab = sorted({w for d in docs[:50] for w in d.split()})
    ids = [f"doc{i:05d}" for i in range(len(docs))]
    pairs = []
    for j, src in enumerate(rng.sample(range(len(docs)), 100)):
        docs.append(_edit(docs[src], 0.05, rng, vocab))
        ids.append(f"copy{j:05d}")
        pairs.append((ids[src], ids[-1]))
    return ids, docs, pairs


def _work_and_keys(ids, docs, fuzzy, exact, tmp_path, partitions):
    """What the segment before a dedup barrier does: signatures -> work files + key rows."""
    import ray.data

    sigs = Signatures(exact, fuzzy)
    files, tables = [], []
    for k in range(0, len(ids), 128):
        batch = {"text": docs[k:k + 128], "drop": [""] * len(ids[k:k + 128]), "doc_id": ids[k:k + 128],
                 "source": ["test"] * len(ids[k:k + 128])}
        batch = sigs(batch)
        f = str(tmp_path / f"w{k:06d}.parquet")
        keep_sig = fuzzy is not None and fuzzy.verify == "signature"
        pq.write_table(batch_to_table(batch, drop_cols=("_xh",) + (() if keep_sig else ("_sig",))), f)
        files.append(f)
        tables.append(key_rows(batch["doc_id"], batch["drop"], batch.get("_xh"), batch.get("_sig"), fuzzy,
                               partitions, "{}"))
    return files, ray.data.from_arrow(tables)


@pytest.mark.slow
@pytest.mark.parametrize("verify", ["exact", "signature"])
def test_fuzzy_recall_and_precision_at_jaccard_08(injected, tmp_path, ray_session, verify):
    from pipelines.data.dedup import verify_pairs

    ids, docs, pairs = injected
    n = 2  # word bigrams: a 5% word edit keeps Jaccard around 0.8-0.9
    fuzzy = FuzzyDedupConfig(ngram_size=n, num_perm=128, bands=20, rows=6, threshold=0.8, verify=verify)
    files, key_ds = _work_and_keys(ids, docs, fuzzy, ExactDedupConfig(), tmp_path, partitions=3)
    exact, cand, stats = group_decisions(key_ds, 3)
    assert exact == [] and len(stats) == len(files)
    verified = verify_pairs(cand, files, fuzzy)
    text = dict(zip(ids, docs))

    def jac(a, b):
        sa, sb = py_word_ngrams(text[a], n), py_word_ngrams(text[b], n)
        return len(sa & sb) / len(sa | sb)

    truth = [(a, b) for a, b in pairs if jac(a, b) >= 0.8]
    assert len(truth) >= 60  # most injected copies really are >= 0.8 similar
    # recall: a true pair ends up in one cluster (connected through verified pairs)
    parent = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in verified:
        parent[find(a)] = find(b)
    recall = sum(find(a) == find(b) for a, b in truth) / len(truth)
    precision = sum(jac(a, b) >= 0.8 for a, b in verified) / max(1, len(verified))
    assert precision >= 0.95, precision
    if verify == "signature":
        # the 128-permutation estimate has std ~0.035 at J~0.83, so pairs just above 0.8 are missed: the
        # default (exact verification of LSH candidates) is the one that meets recall at 0.8
        assert recall >= 0.5, recall
        return
    assert recall >= 0.95, recall
    # one survivor per cluster: the smallest doc_id ("copy..." sorts before "doc...": originals lose)
    losers, info = fuzzy_losers(cand, exact, files, fuzzy)
    assert info["verified_pairs"] == len(verified)
    comps = {}
    for x in {x for p in verified for x in p}:
        comps.setdefault(find(x), []).append(x)
    assert losers == sorted(x for c in comps.values() for x in sorted(c)[1:])
    assert sum(max(a, b) in losers for a, b in truth) / len(truth) >= 0.95


@pytest.mark.slow
def test_exact_dedup_keeps_smallest_doc_id(tmp_path, ray_session):
    ids = ["d3", "d1", "d2", "d4", "d5"]
    docs = ["Same text here", "same   TEXT here", "other", "same text here", "another one"]
    files, key_ds = _work_and_keys(ids, docs, None, ExactDedupConfig(), tmp_path, partitions=2)
    exact, cand, _ = group_decisions(key_ds, 2)
    assert exact == ["d3", "d4"] and len(cand) == 0
    assert cluster_losers(np.array([["a", "b"], ["c", "b"], ["x", "y"]], dtype=object)) == ["b", "c", "y"]
