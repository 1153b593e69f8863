"""Deduplication: exact (hash of normalized text) and fuzzy (MinHash + LSH), global across the dataset.

    from pipelines.data.dedup import word_ngram_hashes, minhash_signatures, group_decisions, fuzzy_losers
    (run by pipelines.data.dedup_stage for the steps `exact_dedup` and `fuzzy_dedup`)

How it runs: the segment before the dedup barrier computes, per alive document, `_xh` (hash of the
normalized text) and `_sig` (MinHash signature), writes the documents to work Parquet files and the
shuffle rows to key files: (key=_xh, doc_id) for exact, (key=LSH band bucket, doc_id) per band for fuzzy,
and one stats row, partitioned by `_part` = key % P (pipelines.data.dedup_shuffle). One Ray task per
partition hands it to `decide_group`, which sorts (key, doc_id) with pyarrow and, vectorised, marks every
exact duplicate but the smallest doc_id and emits candidate pairs from buckets holding several
documents. Candidates are verified (exact Jaccard of the word-n-gram sets, or the signature estimate)
in Ray tasks, per pair of work files (pipelines.data.dedup_stage runs the barrier; group_decisions /
fuzzy_losers here are the small driver-side path the tests compare with), and connected components of
verified pairs give one survivor per cluster, the smallest doc_id (deterministic, independent of order
and partitioning). Fuzzy runs among exact survivors.
Hashing is numpy-vectorised over the bytes of a whole batch (no Python loop per word or shingle).
Words: runs of ASCII letters/digits and non-ASCII bytes, ASCII-lowercased. Does not: remove
near-duplicate lines or paragraphs inside a document (gopher_repetition does).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipelines.data.step_configs import ExactDedupConfig, FuzzyDedupConfig

U64 = np.uint64
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------- hashing

def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised (uint64 wraps)."""
    x = x.astype(U64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> U64(30)
        x *= U64(0xBF58476D1CE4E5B9)
        x ^= x >> U64(27)
        x *= U64(0x94D049BB133111EB)
        x ^= x >> U64(31)
    return x


_WORD = np.zeros(256, dtype=bool)
for _c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789":
    _WORD[_c] = True
_WORD[0x80:] = True
_LOWER = np.arange(256, dtype=np.uint8)
_LOWER[ord("A"):ord("Z") + 1] += 32
_P = U64(0x100000001B3)  # odd multiplier for the in-word polynomial hash
_Q = U64(0x9E3779B97F4A7C15)  # odd multiplier combining word hashes into n-gram hashes
_MAX_WORD = 64  # bytes of a word that count for its hash
_PPOW = np.ones(_MAX_WORD, dtype=U64)
for _i in range(1, _MAX_WORD):
    _PPOW[_i] = U64((int(_PPOW[_i - 1]) * int(_P)) & _MASK64)
_CHUNK = 1 << 20


def word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-document sequences of word hashes. Returns (hashes uint64 (W,), offsets int64 (n+1,))."""
    parts = [t.encode("utf-8", "replace") for t in texts]
    hs: list[np.ndarray] = []
    counts = np.zeros(len(parts), dtype=np.int64)
    i = 0
    while i < len(parts):  # ~1 MB of text per vectorised chunk bounds the temporaries
        j, size = i, 0
        while j < len(parts) and (size == 0 or size + len(parts[j]) <= _CHUNK):
            size += len(parts[j]) + 1
            j += 1
        h, c = _word_hashes_chunk(parts[i:j])
        hs.append(h)
        counts[i:j] = c
        i = j
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return (np.concatenate(hs) if hs else np.zeros(0, U64)), offsets


def _word_hashes_chunk(parts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    buf = np.frombuffer(b"\n".join(parts) + b"\n", dtype=np.uint8)  # (B,) newline ends every doc
    isw = _WORD[buf]
    prev = np.concatenate(([False], isw[:-1]))
    nxt = np.concatenate((isw[1:], [False]))
    starts = np.flatnonzero(isw & ~prev)  # (W,)
    ends = np.flatnonzero(isw & ~nxt) + 1
    # position of each word byte inside its word -> P^pos weights (words longer than _MAX_WORD truncated)
    word_idx = np.cumsum(isw & ~prev) - 1  # (B,) index of the word a byte belongs to
    pos = np.arange(buf.size) - starts[np.maximum(word_idx, 0)] if starts.size else np.zeros(buf.size, np.int64)
    keep = isw & (pos < _MAX_WORD)
    with np.errstate(over="ignore"):
        contrib = (_LOWER[buf[keep]].astype(U64) + U64(1)) * _PPOW[pos[keep]]
        sums = np.add.reduceat(contrib, np.searchsorted(np.flatnonzero(keep), starts)) if starts.size else \
            np.zeros(0, U64)
        lengths = np.minimum(ends - starts, _MAX_WORD).astype(U64)
        h = _mix64(sums ^ (lengths << U64(56)))
    # documents: byte offset of each doc's start in the joined buffer
    doc_starts = np.zeros(len(parts), dtype=np.int64)
    if parts:
        np.cumsum([len(p) + 1 for p in parts[:-1]], out=doc_starts[1:])
    first_word = np.searchsorted(starts, doc_starts)
    counts = np.diff(np.append(first_word, starts.size))
    return h, counts


def ngram_hashes(wh: np.ndarray, offsets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Word n-gram hashes per document from word hashes. A doc with 1..n-1 words gets one hash of all
    its words; an empty doc gets none. Returns (hashes uint64 (G,), offsets int64 (ndocs+1,))."""
    counts = np.diff(offsets)
    ndocs = counts.size
    full = counts >= n
    gcounts = np.where(full, counts - n + 1, np.where(counts > 0, 1, 0))
    goff = np.zeros(ndocs + 1, dtype=np.int64)
    np.cumsum(gcounts, out=goff[1:])
    out = np.empty(int(goff[-1]), dtype=U64)
    if wh.size == 0:
        return out, goff
    with np.errstate(over="ignore"):
        if full.any():
            L = wh.size - n + 1
            if L > 0:
                acc = np.zeros(L, dtype=U64)
                for k in range(n):
                    acc = acc * _Q + wh[k:k + L]
                acc = _mix64(acc)
                # valid n-gram starts: offsets[d] .. offsets[d+1]-n for docs with >= n words
                fd = np.flatnonzero(full)
                lens = counts[fd] - n + 1
                base = np.repeat(offsets[fd] - np.cumsum(np.concatenate(([0], lens[:-1]))), lens)
                idx = base + np.arange(int(lens.sum()))
                dst = np.repeat(goff[fd] - np.cumsum(np.concatenate(([0], lens[:-1]))), lens) + \
                    np.arange(int(lens.sum()))
                out[dst] = acc[idx]
        short = np.flatnonzero(~full & (counts > 0))
        for d in short:  # few, short documents
            acc = U64(0)
            for v in wh[offsets[d]:offsets[d + 1]]:
                acc = acc * _Q + v
            out[goff[d]] = _mix64(np.array([acc ^ U64(counts[d])], dtype=U64))[0]
    return out, goff


def word_ngram_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    wh, off = word_hashes(texts)
    return ngram_hashes(wh, off, n)


def perm_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random permutations x -> a*x + b (mod 2^32), a odd: bijections of the 32-bit shingle hashes."""
    rng = np.random.Generator(np.random.PCG64(seed))
    a = (rng.integers(0, 2**31, size=num_perm, dtype=np.uint32) << np.uint32(1)) | np.uint32(1)
    b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    return a, b


EMPTY_SIG = np.uint32(0xFFFFFFFF)


def minhash_signatures(gh: np.ndarray, goff: np.ndarray, num_perm: int, seed: int,
                       chunk: int = 8192) -> np.ndarray:
    """(ndocs, num_perm) uint32 MinHash signatures over the high 32 bits of the (mixed) shingle hashes.
    uint32 arithmetic, permutations along rows so the per-document min (reduceat) runs over contiguous
    memory: ~5x faster than 64-bit multiply-shift and ~6x faster than reducing along strided columns.
    Documents without shingles get all-0xFFFFFFFF rows."""
    a, b = perm_params(num_perm, seed)
    ndocs = goff.size - 1
    sig = np.full((num_perm, ndocs), EMPTY_SIG, dtype=np.uint32)  # (P, D)
    total = gh.size
    if total == 0:
        return np.ascontiguousarray(sig.T)
    x32 = (gh >> U64(32)).astype(np.uint32)
    doc_of = np.repeat(np.arange(ndocs), np.diff(goff))  # (G,) doc index of each shingle
    A, B = a[:, None], b[:, None]
    with np.errstate(over="ignore"):
        for s in range(0, total, chunk):
            e = min(total, s + chunk)
            m = x32[None, s:e] * A + B  # (P, chunk) uint32, wraps mod 2^32
            d = doc_of[s:e]
            seg = np.flatnonzero(np.concatenate(([True], d[1:] != d[:-1])))
            part = np.minimum.reduceat(m, seg, axis=1)  # (P, segments)
            docs = d[seg]
            sig[:, docs] = np.minimum(sig[:, docs], part)
    return np.ascontiguousarray(sig.T)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(ndocs, bands) uint64 bucket keys; the band index is mixed in so bands never collide."""
    n = sig.shape[0]
    out = np.empty((n, bands), dtype=U64)
    with np.errstate(over="ignore"):
        for j in range(bands):
            acc = np.full(n, U64(j + 1) * U64(0xD6E8FEB86659FD93), dtype=U64)
            for k in range(rows):
                acc = acc * _Q + sig[:, j * rows + k].astype(U64)
            out[:, j] = _mix64(acc)
    return out


def exact_hash(text: str, lowercase: bool = True, collapse_whitespace: bool = True) -> int:
    if lowercase:
        text = text.lower()
    if collapse_whitespace:
        text = " ".join(text.split())
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little")


def py_word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Pure-Python reference of the shingling (for tests and reports): same word definition."""
    import re

    words = [w.translate(_PY_LOWER)[:_MAX_WORD] for w in
             re.findall(rb"[A-Za-z0-9\x80-\xff]+", text.encode("utf-8", "replace"))]
    if not words:
        return set()
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


_PY_LOWER = bytes(_LOWER.tolist())


# ----------------------------------------------------------------------------------------------- decisions

KIND_EXACT, KIND_BAND, KIND_STATS = 0, 1, 2


def key_rows(doc_ids: list[str], drops: list[str], xh: np.ndarray | None, sig: np.ndarray | None,
             fuzzy: FuzzyDedupConfig | None, partitions: int, stats_json: str, file_id: int = -1):
    """The shuffle input for one batch: (key, doc_id, kind, file, _part) rows. Exact rows carry the text hash,
    band rows one LSH bucket key per (document, band); one stats row rides along to the driver. `file` is
    the work file holding the batch (work_file_id; -1: none), so verification can read just that file."""
    import pyarrow as pa

    alive = np.array([not d for d in drops], dtype=bool)
    ids = np.asarray(doc_ids, dtype=object)
    keys, kinds, rid = [], [], []
    if xh is not None:
        keys.append(np.asarray(xh, dtype=U64)[alive])
        kinds.append(np.full(int(alive.sum()), KIND_EXACT, np.int8))
        rid.append(ids[alive])
    if sig is not None and fuzzy is not None:
        s = sig[alive]
        nonempty = ~(s == EMPTY_SIG).all(axis=1)
        bk = band_keys(s[nonempty], fuzzy.bands, fuzzy.rows)  # (m, bands)
        keys.append(bk.reshape(-1))
        kinds.append(np.full(bk.size, KIND_BAND, np.int8))
        rid.append(np.repeat(ids[alive][nonempty], fuzzy.bands))
    keys.append(np.zeros(1, U64))
    kinds.append(np.full(1, KIND_STATS, np.int8))
    rid.append(np.array([stats_json], dtype=object))
    key = np.concatenate(keys)
    return pa.table({"key": pa.array(key, pa.uint64()),
                     "doc_id": pa.array(np.concatenate(rid).tolist(), pa.string()),
                     "kind": pa.array(np.concatenate(kinds), pa.int8()),
                     "file": pa.array(np.full(key.size, file_id, np.int64)),
                     "_part": pa.array((key % U64(partitions)).astype(np.int64))})


def decide_group(tbl, max_bucket: int = 5000):
    """One groupby partition -> rows (kind, a, b): kind 0 = exact loser a; kind 1 = candidate pair a < b;
    kind 2 = stats passed through. Exact: within an equal-hash run every doc_id but the smallest loses.
    Buckets with >= 2 documents: the smallest member pairs with every other one, plus consecutive pairs.
    Works on integer codes of the doc_ids (dictionary_encode), not Python strings: the ids are taken back
    from the Arrow dictionary only for the rows written."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = tbl.column("kind").to_numpy()
    if "file" not in tbl.column_names:
        tbl = tbl.append_column("file", pa.array(np.full(tbl.num_rows, -1, np.int64)))
    parts: list[pa.Table] = []
    st = tbl.filter(pa.array(kind == KIND_STATS))
    if st.num_rows:
        parts.append(_rows(KIND_STATS, st.column("doc_id"), pa.array([""] * st.num_rows, pa.string()),
                           np.full(st.num_rows, -1, np.int64), np.full(st.num_rows, -1, np.int64)))
    for kd in (KIND_EXACT, KIND_BAND):
        t = tbl.filter(pa.array(kind == kd))
        if t.num_rows < 2:
            continue
        t = t.take(pc.sort_indices(t, sort_keys=[("key", "ascending"), ("doc_id", "ascending")]))
        k = t.column("key").to_numpy()
        enc = pc.dictionary_encode(t.column("doc_id")).combine_chunks()
        names, code = enc.dictionary, enc.indices.to_numpy().astype(np.int64)  # equal ids <=> equal codes
        fid = t.column("file").to_numpy()
        newrun = np.concatenate(([True], k[1:] != k[:-1]))
        run_id = np.cumsum(newrun) - 1
        run_start = np.flatnonzero(newrun)
        run_len = np.diff(np.append(run_start, k.size))
        pos = np.arange(k.size) - run_start[run_id]
        member = pos > 0  # not the smallest doc_id of its run
        if kd == KIND_EXACT:
            n = int(member.sum())
            parts.append(_rows(KIND_EXACT, names.take(pa.array(code[member])), pa.array([""] * n, pa.string()),
                               fid[member], np.full(n, -1, np.int64)))
            continue
        first = run_start[run_id[member]]
        chain = member & (pos > 1) & (run_len[run_id] <= max_bucket)
        ci = np.flatnonzero(chain)
        ia = np.concatenate([first, ci - 1])  # sorted by doc_id inside a run: id[ia] <= id[ib]
        ib = np.concatenate([np.flatnonzero(member), ci])
        diff = code[ia] != code[ib]  # a document repeated inside one bucket (cannot happen; be safe)
        ca, cb, fa, fb = _unique_pairs(code[ia][diff], code[ib][diff], fid[ia][diff], fid[ib][diff])
        parts.append(_rows(KIND_BAND, names.take(pa.array(ca)), names.take(pa.array(cb)), fa, fb))
    return _decision_table(parts)


def _unique_pairs(a: np.ndarray, b: np.ndarray, fa: np.ndarray, fb: np.ndarray):
    """One row per candidate pair (integer codes a, b), each pair's smallest work files: the bands of one
    partition that agree on a pair emit it once (near duplicates share most bands, so this shrinks what the
    verification shuffle moves several times)."""
    if a.size < 2:
        return a, b, fa, fb
    order = np.lexsort((b, a))
    a, b, fa, fb = a[order], b[order], fa[order], fb[order]
    new = np.concatenate(([True], (a[1:] != a[:-1]) | (b[1:] != b[:-1])))
    starts = np.flatnonzero(new)
    return a[starts], b[starts], np.minimum.reduceat(fa, starts), np.minimum.reduceat(fb, starts)


def _rows(kind: int, a, b, fa: np.ndarray, fb: np.ndarray):
    import pyarrow as pa

    return pa.table({"kind": pa.array(np.full(len(a), kind, np.int8)), "a": a.cast(pa.string()),
                     "b": b.cast(pa.string()), "fa": pa.array(np.asarray(fa).astype(np.int64)),
                     "fb": pa.array(np.asarray(fb).astype(np.int64))})


def _decision_table(parts):
    import pyarrow as pa

    if not parts:
        return pa.table({"kind": pa.array([], pa.int8()), "a": pa.array([], pa.string()),
                         "b": pa.array([], pa.string()), "fa": pa.array([], pa.int64()),
                         "fb": pa.array([], pa.int64())})
    return pa.concat_tables(parts)


def group_decisions(key_ds, partitions: int, max_bucket: int = 5000):
    """Ray Data groupby over the key rows -> (exact losers, unique candidate pairs (K, 2), stats JSON list)."""
    from ray.data.context import ShuffleStrategy

    def fn(t):
        return decide_group(t, max_bucket)

    # task-based sort shuffle: the default hash shuffle starts aggregator actors, a fixed cost of
    # seconds per groupby that dominates on small clusters; groups (partitions) stay whole either way
    key_ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    out = key_ds.groupby("_part", num_partitions=partitions).map_groups(fn, batch_format="pyarrow")
    exact: list[str] = []
    aa: list[str] = []
    bb: list[str] = []
    stats: list[str] = []
    for b in out.iter_batches(batch_format="pyarrow", batch_size=None):
        kinds = b.column("kind").to_numpy()
        a = b.column("a").to_pylist()
        bcol = b.column("b").to_pylist()
        for k, x, y in zip(kinds, a, bcol):
            if k == KIND_EXACT:
                exact.append(x)
            elif k == KIND_BAND:
                aa.append(x)
                bb.append(y)
            else:
                stats.append(x)
    pairs = np.array(sorted(set(zip(aa, bb))), dtype=object).reshape(-1, 2)
    return sorted(set(exact)), pairs, stats


def _iter_docs(work_files: list[str], ids: set[str], columns: list[str],
               batch_size: int = 4096) -> Iterator[dict[str, Any]]:
    """Batches of doc_id -> row (dict of the requested columns) for the given ids, streaming over the work
    files batch_size rows at a time."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    value_set = pa.array(sorted(ids), pa.string())
    for f in work_files:
        pf = pq.ParquetFile(f)
        for rb in pf.iter_batches(batch_size=batch_size, columns=["doc_id"] + columns):
            t = pa.Table.from_batches([rb])
            t = t.filter(pc.is_in(t.column("doc_id"), value_set=value_set))
            if t.num_rows:
                d = t.to_pydict()
                yield {did: {c: d[c][j] for c in columns} for j, did in enumerate(d["doc_id"])}


def _read_docs(work_files: list[str], ids: set[str], columns: list[str]) -> dict[str, Any]:
    """doc_id -> row (dict of the requested columns) for the given ids, streaming over the work files."""
    out: dict[str, Any] = {}
    for rows in _iter_docs(work_files, ids, columns):
        out.update(rows)
    return out


SETS_BATCH_ROWS = 512  # doc_sets hashes this many documents at a time: its word and n-gram arrays stay a few MB


def doc_sets(work_files: list[str], ids: set[str], cfg: FuzzyDedupConfig) -> dict[str, np.ndarray]:
    """What verification compares, per document id: its MinHash signature (verify=signature) or its sorted
    unique word-n-gram hashes (verify=exact), read from the work files. Texts are read and hashed
    SETS_BATCH_ROWS documents at a time: only the sets are kept, never a work file's texts and their
    per-word arrays at once (those were ~5x the text, the largest transient of a sets task)."""
    if not ids:
        return {}
    if cfg.verify == "signature":
        return {i: np.asarray(r["_sig"]) for i, r in _read_docs(work_files, ids, ["_sig"]).items()}
    out: dict[str, np.ndarray] = {}
    for rows in _iter_docs(work_files, ids, ["text"], batch_size=SETS_BATCH_ROWS):
        order = sorted(rows)
        gh, goff = word_ngram_hashes([rows[i]["text"] for i in order], cfg.ngram_size)
        del rows
        out.update({i: np.unique(gh[goff[k]:goff[k + 1]]) for k, i in enumerate(order)})
    return out


def similar(sa: np.ndarray, sb: np.ndarray, cfg: FuzzyDedupConfig) -> bool:
    """Two documents' doc_sets: signature agreement, or exact Jaccard of the shingle sets, >= threshold."""
    if cfg.verify == "signature":
        return float(np.mean(sa == sb)) >= cfg.threshold
    inter = np.intersect1d(sa, sb, assume_unique=True).size
    union = sa.size + sb.size - inter
    return union > 0 and inter / union >= cfg.threshold


def verify_pairs(pairs: np.ndarray, work_files: list[str], cfg: FuzzyDedupConfig) -> np.ndarray:
    """Keep candidate pairs whose Jaccard (exact on shingle sets, or estimated) >= threshold."""
    if len(pairs) == 0:
        return pairs
    sets = doc_sets(work_files, set(pairs[:, 0].tolist()) | set(pairs[:, 1].tolist()), cfg)
    keep = np.array([similar(sets[a], sets[b], cfg) for a, b in pairs], dtype=bool)
    return pairs[keep]


def cluster_losers(pairs: np.ndarray) -> list[str]:
    """Connected components of the pair graph; all members but the smallest doc_id lose (sorted)."""
    if len(pairs) == 0:
        return []
    nodes, inv = np.unique(pairs.astype(str).reshape(-1), return_inverse=True)  # sorted: index order == id order
    edges = inv.reshape(-1, 2)
    parent = list(range(nodes.size))

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for a, b in edges.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:  # the smaller index (= smaller doc_id) becomes the root
            parent[max(ra, rb)] = min(ra, rb)
    return sorted(str(nodes[i]) for i in range(nodes.size) if find(i) != i)


def fuzzy_losers(pairs: np.ndarray, exact_losers: list[str], work_files: list[str],
                 cfg: FuzzyDedupConfig) -> tuple[list[str], dict[str, int]]:
    """Candidate pairs -> near-duplicate losers among the exact survivors (verified, clustered)."""
    if len(pairs) and exact_losers:
        # an exact duplicate has the same buckets as its winner, so its pairs are redundant
        gone = set(exact_losers)
        keep = np.array([a not in gone and b not in gone for a, b in pairs], dtype=bool)
        pairs = pairs[keep]
    verified = verify_pairs(pairs, work_files, cfg)
    losers = cluster_losers(verified)
    return losers, {"candidate_pairs": int(len(pairs)), "verified_pairs": int(len(verified))}


# ----------------------------------------------------------------------------------------------- steps

class Signatures:
    """Barrier helper run at the end of the segment before dedup: adds `_xh` and/or `_sig` columns."""

    name = "_signatures"

    def __init__(self, exact: ExactDedupConfig | None, fuzzy: FuzzyDedupConfig | None):
        self.exact, self.fuzzy = exact, fuzzy

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        drops = batch["drop"]
        texts = batch["text"]
        out = dict(batch)
        alive = [i for i, d in enumerate(drops) if not d]
        if self.exact is not None:
            xh = np.zeros(len(drops), dtype=U64)
            lc, cw = self.exact.lowercase, self.exact.collapse_whitespace
            for i in alive:
                xh[i] = exact_hash(texts[i], lc, cw)
            out["_xh"] = xh
        if self.fuzzy is not None:
            f = self.fuzzy
            sig = np.full((len(drops), f.num_perm), EMPTY_SIG, dtype=np.uint32)
            if alive:
                gh, goff = word_ngram_hashes([texts[i] for i in alive], f.ngram_size)
                sig[alive] = minhash_signatures(gh, goff, f.num_perm, f.seed)
            out["_sig"] = sig
        return out


def losers_path(losers_dir: str, name: str, fid: int) -> str:
    """One work file's losers of one dedup step (written by pipelines.data.dedup_stage)."""
    return f"{losers_dir}/{name}-{fid}.parquet"


def read_losers(losers_dir: str, name: str, fid: int) -> list[str]:
    """One work file's losers of one dedup step ([] when it has none)."""
    import pyarrow.parquet as pq

    path = losers_path(losers_dir, name, fid)
    if not os.path.exists(path):
        return []
    return pq.read_table(path).column("doc_id").to_pylist()


class ApplyLosers:
    """After the barrier: mark the documents chosen by the global decision as dropped. With a losers_ref
    (object ref or list) every task gets all losers; with None each task binds the losers of the work
    file it reads (bind_item: item["losers"], a {"dir", "file"} reference to that file's loser files, or
    {name: [doc_id, ...]}), so no process holds more than one file's losers."""

    def __init__(self, name: str, reason: str, losers_ref: Any):
        self.name, self.reason, self._ref = name, reason, losers_ref
        self._set: set[str] | None = None

    def __getstate__(self):
        return {"name": self.name, "reason": self.reason, "_ref": self._ref, "_set": None}

    def bind_item(self, item: dict[str, Any]) -> None:
        if self._ref is None:
            ref = item.get("losers", {})
            if "dir" in ref:
                self._set = set(read_losers(ref["dir"], self.name, ref["file"]))
            else:
                self._set = set(ref.get(self.name, ()))

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self._set is None:
            import ray

            self._set = set(ray.get(self._ref)) if not isinstance(self._ref, (list, set)) else set(self._ref)
        losers = self._set
        tag = f"{self.name}:{self.reason}"
        drops = [tag if (not d and i in losers) else d for d, i in zip(batch["drop"], batch["doc_id"])]
        out = dict(batch)
        out["drop"] = drops
        return out
