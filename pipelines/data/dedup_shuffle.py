"""The dedup barrier's file-based shuffle: partitioned key files (one part per partition), read by Ray tasks.

    write_key_file(key_rows_table, partitions, path)      # in the segment's worker, next to its work file
    rows = read_partition(key_files, p)                    # in a task: part p of every key file
    for i, result in run_tasks(decide_task, args, limit): ...   # plain Ray tasks, at most `limit` in flight

The segment before a barrier writes, next to each work file, a *key file*: that batch's dedup key rows
(pipelines.data.dedup.key_rows) sorted by `_part` (key % partitions), then key and doc_id, one part per
partition (PartWriter: Arrow IPC segments and a trailer of their offsets), so a reader of partition p
reads only part p of each file, with a few seeks (not a footer of every partition's offsets). The barrier (pipelines.data.dedup_stage) then runs plain Ray tasks, never a
Ray Data groupby: `decide_task` per partition (decide_group: exact losers, LSH candidate pairs; the
batches' stats rows merged on the way) writes its exact losers partitioned by group of work files, its
candidate pairs partitioned by bucket (doc_bucket of the pair's first doc_id) and the pairs' two ends
(doc, work file, bucket) partitioned by group of work files, one part per group / bucket;
`exact_task` per group writes each work file's exact-loser file; `sets_task` per group reads each of its
work files once and writes the set of every needed document (not an exact loser) to the buckets that need
it; `verify_task` per bucket joins its pairs with those sets and returns only the verified pairs, cut to a
spanning forest of their clusters (spanning_edges; cluster_losers_arrow turns pairs into losers). A task
holds one partition, group or bucket, and one work file, at a time: its memory is set by the partitions and
the batch size, not by the corpus, and every work file is decoded once. Files are written atomically.
Does not: hash documents (pipelines.data.dedup) or run the barrier's phases (pipelines.data.dedup_stage).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.data.dedup import (
    KIND_BAND,
    KIND_EXACT,
    KIND_STATS,
    decide_group,
    doc_sets,
    losers_path,
    read_losers,
    similar,
)
from pipelines.data.ledger import merge_stats
from pipelines.data.step_configs import MAX_DEDUP_PARTITIONS, FuzzyDedupConfig
from pipelines.runtime import atomic_write_bytes

FILE_ID_BASE = 1_000_000  # work file w<order>-<k>.parquet has id order * FILE_ID_BASE + k
KEY_BYTES_PER_PARTITION = 8 << 20  # the default partitions hold ~8 MB of key rows each
KEY_ROW_BYTES = 48  # one key row in Arrow: key, doc_id (~20 chars), kind, file, _part
DOC_BYTES_GUESS = 2048  # input bytes per document assumed when the partitions are chosen (before reading)


def shuffle_dir(stage_dir: str) -> str:
    """Where a stage's key files and the barrier tasks' outputs go (removed once the barrier is decided)."""
    return f"{stage_dir}/shuffle"


def work_file_name(order: int, k: int) -> str:
    return f"w{order:06d}-{k:06d}.parquet"


def key_file_name(order: int, k: int) -> str:
    return f"k{order:06d}-{k:06d}.parts"


def shuffle_file(shuffle: str, kind: str, i: int) -> str:
    """A barrier task's output in the shuffle folder: exact / cand / end (per partition), sets (per group)."""
    return f"{shuffle}/{kind}-{i:05d}.parts"


def work_file_id(order: int, k: int) -> int:
    return order * FILE_ID_BASE + k


def file_id_of(name: str) -> int:
    """w000003-000001.parquet -> 3000001."""
    order, k = name.rsplit("/", 1)[-1][1:].split(".")[0].split("-")
    return work_file_id(int(order), int(k))


def file_name_of(fid: int) -> str:
    return work_file_name(fid // FILE_ID_BASE, fid % FILE_ID_BASE)


def auto_partitions(input_bytes: int, key_rows_per_doc: int) -> int:
    """Dedup partitions from the planned input size, decided before any document is read: ~8 MB of key rows
    (KEY_ROW_BYTES each, key_rows_per_doc per document of DOC_BYTES_GUESS bytes) per partition, 1..1024."""
    key_bytes = input_bytes / DOC_BYTES_GUESS * max(1, key_rows_per_doc) * KEY_ROW_BYTES
    return int(min(MAX_DEDUP_PARTITIONS, max(1, math.ceil(key_bytes / KEY_BYTES_PER_PARTITION))))


def _parquet_bytes(writer_fn: Callable[[Any], None], schema: pa.Schema) -> bytes:
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, schema, compression="snappy") as w:
        writer_fn(w)
    return sink.getvalue().to_pybytes()


PART_MAGIC = b"RGPARTS1"
_TRAILER = struct.Struct("<qqqq8s")  # schema offset, schema length, segments, parts, magic
_IPC = pa.ipc.IpcWriteOptions(compression="lz4")


class PartWriter:
    """A partitioned shuffle file, written as it goes: Arrow IPC segments (lz4) appended in any order, each
    tagged with its part, then the schema, every segment's byte range grouped by part (CSR: the ranges,
    then n_parts + 1 pointers) and a fixed trailer. A reader of part p reads the trailer, two pointers, its
    ranges and its segments: a few seeks whatever the number of parts (a Parquet footer with one row group
    per part is O(parts) to parse on every read, and every file is read once per part). Atomic: written to
    a temp file in the same directory and renamed by close(); readers see the whole file or none."""

    def __init__(self, path: str, schema: pa.Schema, n_parts: int):
        self.path, self.schema, self.n = path, schema, n_parts
        self.tmp = f"{os.path.dirname(path) or '.'}/.{os.path.basename(path)}.tmp-{os.getpid()}"
        self.f = pa.OSFile(self.tmp, "wb")
        self.seg_part: list[int] = []
        self.seg_range: list[tuple[int, int]] = []

    def write(self, p: int, table: pa.Table) -> None:
        if not 0 <= p < self.n:
            raise ValueError(f"{self.path}: part {p} out of range [0, {self.n})")
        if not table.num_rows:
            return
        start = self.f.tell()
        with pa.ipc.new_stream(self.f, self.schema, options=_IPC) as w:
            w.write_table(table)
        self.seg_part.append(p)
        self.seg_range.append((start, self.f.tell()))

    def close(self) -> None:
        schema_at = self.f.tell()
        self.f.write(self.schema.serialize())
        schema_len = self.f.tell() - schema_at
        order = np.argsort(np.asarray(self.seg_part, np.int64), kind="stable")
        ranges = np.asarray(self.seg_range, "<i8").reshape(-1, 2)[order]
        ptr = np.concatenate(([0], np.cumsum(np.bincount(np.asarray(self.seg_part, np.int64),
                                                         minlength=self.n)))).astype("<i8")
        self.f.write(ranges.tobytes())
        self.f.write(ptr.tobytes())
        self.f.write(_TRAILER.pack(schema_at, schema_len, len(ranges), self.n, PART_MAGIC))
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.abort() if exc_type else self.close()


def part_count(path: str) -> int:
    """How many parts a partitioned shuffle file has."""
    with pa.OSFile(path) as f:
        return _trailer(f, path)[3]


def _trailer(f, path: str) -> tuple[int, int, int, int]:
    size = f.size()
    if size < _TRAILER.size:
        raise ValueError(f"{path}: not a raygpt shuffle file ({size} bytes); remove the stage's shuffle folder "
                         "and re-run")
    f.seek(size - _TRAILER.size)
    so, sl, segs, n, magic = _TRAILER.unpack(f.read(_TRAILER.size))
    if magic != PART_MAGIC:
        raise ValueError(f"{path}: not a raygpt shuffle file (trailer {magic!r}, expected {PART_MAGIC!r}); "
                         "remove the stage's shuffle folder and re-run")
    return so, sl, segs, n


def read_part(path: str, p: int, columns: Sequence[str] | None = None) -> pa.Table:
    """Part p of a partitioned shuffle file (only its segments are read; empty with the file's schema)."""
    with pa.OSFile(path) as f:
        so, sl, segs, n = _trailer(f, path)
        if not 0 <= p < n:
            raise ValueError(f"{path}: part {p} out of range [0, {n})")
        ptr_at = f.size() - _TRAILER.size - 8 * (n + 1)
        a, b = struct.unpack("<qq", f.read_at(16, ptr_at + 8 * p))
        ranges = np.frombuffer(f.read_at(16 * (b - a), ptr_at - 16 * segs + 16 * a), "<i8").reshape(-1, 2) \
            if b > a else np.zeros((0, 2), np.int64)
        tables = [pa.ipc.open_stream(f.read_at(int(e - s), int(s))).read_all() for s, e in ranges.tolist()]
        if not tables:
            schema = pa.ipc.read_schema(pa.py_buffer(f.read_at(sl, so)))
            tables = [schema.empty_table()]
    t = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return t.select(list(columns)) if columns else t


def write_partitioned(table: pa.Table, col: str, n: int, path: str, sort_keys: Sequence[str] = ()) -> None:
    """Write `table` to `path` as a partitioned shuffle file of n parts: part p holds the rows whose `col` is
    p, sorted by sort_keys. Atomic: readers see the whole file or none."""
    part = table.column(col).to_numpy()
    if part.size and (part.min() < 0 or part.max() >= n):
        raise ValueError(f"{path}: column {col!r} must be in [0, {n}), got [{part.min()}, {part.max()}]")
    keys = [(col, "ascending")] + [(k, "ascending") for k in sort_keys]
    table = table.take(pc.sort_indices(table, sort_keys=keys)) if table.num_rows > 1 else table
    counts = np.bincount(table.column(col).to_numpy(), minlength=n) if table.num_rows else np.zeros(n, np.int64)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    with PartWriter(path, table.schema, n) as w:  # streamed to a temp file: never the whole file in memory
        for p in np.flatnonzero(counts).tolist():
            w.write(p, table.slice(int(starts[p]), int(counts[p])))


def write_key_file(keys: pa.Table, partitions: int, path: str) -> str:
    """One batch's key rows (with `_part` = key % partitions) -> a key file, one part per partition."""
    write_partitioned(keys, "_part", partitions, path, sort_keys=("key", "doc_id"))
    return path


def read_partition(paths: Sequence[str], p: int, columns: Sequence[str] | None = None) -> pa.Table | None:
    """Part p of every file (only its segments are read: the trailer gives their offsets); None: no files."""
    tables = [read_part(f, p, columns) for f in paths]
    return pa.concat_tables(tables) if tables else None


def spread(ids: np.ndarray, n: int) -> np.ndarray:
    """A deterministic hash of int64 ids -> [0, n) (work files to groups, pairs of files to buckets)."""
    x = np.asarray(ids).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(31))) * np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(29)
    return (x % np.uint64(max(1, n))).astype(np.int64)


DOC_BUCKET_CHUNK_BYTES = 1 << 18  # doc_bucket hashes ids in chunks of ~256 KB of UTF-8: ~40 bytes of numpy per byte


def doc_bucket(ids: pa.Array | pa.ChunkedArray, n: int) -> np.ndarray:
    """A deterministic hash of doc_id strings -> [0, n): a polynomial hash of each id's UTF-8 bytes, computed
    on the Arrow buffers (no Python object per id), then spread. The per-byte work arrays are uint64 (~40
    bytes of numpy per byte of id), so ids are hashed in chunks of DOC_BUCKET_CHUNK_BYTES: memory stays a
    few MB whatever the number of ids (the whole column at once was ~130 MB for a 130k-row partition)."""
    arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    arr = arr.cast(pa.large_string())
    if len(arr) == 0:
        return np.zeros(0, np.int64)
    if arr.offset:
        arr = pa.concat_arrays([arr])  # a fresh array: offsets start at the first id
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[:len(arr) + 1]
    raw = np.frombuffer(arr.buffers()[2], np.uint8) if offsets[-1] > offsets[0] else np.zeros(0, np.uint8)
    h = np.zeros(len(arr), np.uint64)
    # chunk boundaries (id indices) at about every DOC_BUCKET_CHUNK_BYTES of string data
    cuts = np.unique(np.searchsorted(offsets, np.arange(offsets[0], offsets[-1], DOC_BUCKET_CHUNK_BYTES),
                                     side="right") - 1)
    bounds = np.append(cuts[cuts < len(arr)], len(arr)) if cuts.size else np.array([0, len(arr)])
    if bounds[0] != 0:
        bounds = np.insert(bounds, 0, 0)
    for i, j in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if j > i:
            h[i:j] = _poly_hash(raw, offsets[i:j + 1])
    return spread(h.view(np.int64), n)


def _poly_hash(raw: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The polynomial hash of the ids whose UTF-8 bytes are raw[offsets[k]:offsets[k + 1]] (0 when empty)."""
    lens = np.diff(offsets)
    h = np.zeros(lens.size, np.uint64)
    if offsets[-1] <= offsets[0]:
        return h
    data = raw[offsets[0]:offsets[-1]].astype(np.uint64)
    starts = offsets[:-1] - offsets[0]
    pos = np.arange(data.size) - np.repeat(starts, lens)  # position of each byte inside its id
    with np.errstate(over="ignore"):
        powers = np.uint64(1099511628211) ** np.arange(int(lens.max()) + 1, dtype=np.uint64)
        weighted = (data + np.uint64(1)) * powers[pos]
    nz = lens > 0
    if nz.any():
        h[nz] = np.add.reduceat(weighted, starts[nz])
    return h


def write_losers(losers_dir: str, name: str, fid: int, ids) -> None:
    """The sorted losers of one work file (atomic)."""
    table = pa.table({"doc_id": pa.array(sorted(set(ids)), pa.string())})
    atomic_write_bytes(losers_path(losers_dir, name, fid), _parquet_bytes(lambda w: w.write_table(table),
                                                                           table.schema))


# ----------------------------------------------------------------------------------------------- tasks

def run_tasks(fn: Callable[..., Any], args: Sequence[tuple], limit: int,
              peak: dict[str, int] | None = None) -> Iterator[tuple[int, Any]]:
    """fn(*a) for every a in args as Ray tasks (1 CPU each), at most `limit` in flight; yields (index, result)
    as they finish. A result is fetched once and its reference dropped at once (the object store frees it).
    peak["rss"] (when given) becomes the largest peak RSS (bytes) of the worker processes that ran them (a
    worker's lifetime peak: workers are reused, so it also covers what they ran before)."""
    import ray

    remote = ray.remote(num_cpus=1)(_measured)
    pending: dict[Any, int] = {}
    todo = iter(enumerate(args))
    while True:
        while len(pending) < max(1, limit):
            nxt = next(todo, None)
            if nxt is None:
                break
            pending[remote.remote(fn, *nxt[1])] = nxt[0]
        if not pending:
            return
        done, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done[0])
        result, rss = ray.get(done[0])
        del done
        if peak is not None:
            peak["rss"] = max(peak.get("rss", 0), rss)
        yield i, result


def _measured(fn: Callable[..., Any], *a: Any) -> tuple[Any, int]:
    import resource

    result = fn(*a)
    # hand the task's freed Arrow pages back to the OS: the worker runs the next task from its baseline,
    # not from what the allocator kept of this one
    pa.default_memory_pool().release_unused()
    return result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def decide_task(key_files: list[str], p: int, max_bucket: int, n_groups: int, n_buckets: int,
                out_dir: str) -> dict[str, Any]:
    """Partition p: part p of every key file -> decide_group -> exact losers to exact-<p>.parts (one part
    per group of work files). With n_buckets > 0, its candidate pairs to cand-<p>.parts (one part per
    bucket, the bucket of the pair's first doc_id) and the documents they need to
    end-<p>.parts (doc, file, bucket: one part per group of work files, so that each work file is
    read by one sets_task). Returns counts and the partition's stats rows merged."""
    merged: dict[str, Any] = {"steps": {}}
    n_stats = 0
    parts = []
    for f in key_files:
        t = read_part(f, p)
        st = t.column("kind").to_numpy() == KIND_STATS
        if st.any():
            for js in t.column("doc_id").filter(pa.array(st)).to_pylist():
                merge_stats(merged, json.loads(js))
                n_stats += 1
            t = t.filter(pa.array(~st))
        parts.append(t)
    keys = pa.concat_tables(parts) if parts else None
    del parts
    dec = decide_group(keys, max_bucket) if keys is not None and keys.num_rows else decide_group(_no_keys())
    del keys
    kind = dec.column("kind").to_numpy()
    ex = dec.filter(pa.array(kind == KIND_EXACT)).select(["a", "fa"])
    ex = ex.append_column("_g", pa.array(spread(ex.column("fa").to_numpy(), n_groups)))
    write_partitioned(ex, "_g", n_groups, shuffle_file(out_dir, "exact", p), sort_keys=("fa", "a"))
    cand = dec.filter(pa.array(kind == KIND_BAND)).select(["a", "b", "fa", "fb"])
    del dec
    if n_buckets:
        v = pa.array(doc_bucket(cand.column("a"), n_buckets))
        cand = cand.append_column("_v", v)
        write_partitioned(cand, "_v", n_buckets, shuffle_file(out_dir, "cand", p), sort_keys=("a", "b"))
        ends = pa.table({"doc": pa.chunked_array(cand.column("a").chunks + cand.column("b").chunks),
                         "file": pa.chunked_array(cand.column("fa").chunks + cand.column("fb").chunks),
                         "_v": pa.chunked_array(cand.column("_v").chunks * 2)})
        ends = ends.group_by(["doc", "file", "_v"], use_threads=False).aggregate([])
        ends = ends.append_column("_g", pa.array(spread(ends.column("file").to_numpy(), n_groups)))
        write_partitioned(ends, "_g", n_groups, shuffle_file(out_dir, "end", p), sort_keys=("file", "doc", "_v"))
    return {"exact": ex.num_rows, "cand": cand.num_rows, "stats": json.dumps(merged) if n_stats else ""}


def _no_keys() -> pa.Table:
    return pa.table({"key": pa.array([], pa.uint64()), "doc_id": pa.array([], pa.string()),
                     "kind": pa.array([], pa.int8()), "file": pa.array([], pa.int64())})


def _runs(*cols: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of the runs of equal values over sorted columns."""
    n = cols[0].size
    if n == 0:
        return []
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for c in cols:
        change[1:] |= c[1:] != c[:-1]
    starts = np.flatnonzero(change)
    return list(zip(starts.tolist(), np.append(starts[1:], n).tolist()))


def exact_task(exact_files: list[str], g: int, losers_dir: str) -> int:
    """Group g of work files: its exact losers from every partition -> one loser file per work file."""
    t = read_partition(exact_files, g, ["a", "fa"])
    if t is None or not t.num_rows:
        return 0
    t = t.sort_by([("fa", "ascending"), ("a", "ascending")])
    fa = t.column("fa").to_numpy()
    n = 0
    for s, e in _runs(fa):
        ids = t.column("a").slice(s, e - s).to_pylist()
        write_losers(losers_dir, "exact_dedup", int(fa[s]), ids)
        n += len(set(ids))
    return n


def sets_task(end_files: list[str], g: int, n_buckets: int, cfg: FuzzyDedupConfig, stage_dir: str,
              losers_dir: str, out_dir: str) -> int:
    """Group g of work files: the documents that candidate pairs need from them (part g of every end
    file), each work file read once and each document's set (doc_sets: shingle hashes or signature) computed
    once, exact losers left out (their winner has the same buckets, so their pairs are redundant). Writes
    sets-<g>.parts: for each work file of the group in turn, one segment (doc, set) per bucket v that needs
    its documents, tagged part v; so verify_task v reads part v, and this task holds one work file's sets
    at a time. Returns the number of documents written."""
    t = read_partition(end_files, g, ["doc", "file", "_v"])
    schema = pa.schema([("doc", pa.string()), ("set", pa.large_list(_set_type(cfg)))])
    n = 0
    with PartWriter(shuffle_file(out_dir, "sets", g), schema, max(1, n_buckets)) as w:
        if t is not None and t.num_rows:
            t = t.group_by(["file", "doc", "_v"], use_threads=False).aggregate([])
            t = t.sort_by([("file", "ascending"), ("doc", "ascending"), ("_v", "ascending")])
            files = t.column("file").to_numpy()
            for s, e in _runs(files):
                fid = int(files[s])
                part = t.slice(s, e - s)
                gone = pa.array(read_losers(losers_dir, "exact_dedup", fid), pa.string())
                if len(gone):
                    part = part.filter(pc.invert(pc.is_in(part.column("doc"), value_set=gone)))
                docs = part.column("doc").to_pylist()
                sets = doc_sets([os.path.join(stage_dir, file_name_of(fid))], set(docs), cfg)
                part = part.filter(pa.array([d in sets for d in docs], pa.bool_()))
                # by bucket, then doc: each bucket is one slice, its sets gathered in that order (a bucket's
                # worth of set values at a time, no sorted copy of the whole file's sets)
                part = part.sort_by([("_v", "ascending"), ("doc", "ascending")])
                vs = part.column("_v").to_numpy()
                counts = np.bincount(vs, minlength=n_buckets) if vs.size else np.zeros(n_buckets, np.int64)
                starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
                docs = part.column("doc").to_pylist()
                for v in np.flatnonzero(counts).tolist():
                    a, b = int(starts[v]), int(starts[v] + counts[v])
                    vals = [sets[d] for d in docs[a:b]]
                    col = pa.LargeListArray.from_arrays(
                        pa.array(np.cumsum([0] + [x.size for x in vals]), pa.int64()),
                        pa.array(np.concatenate(vals), _set_type(cfg)))
                    w.write(v, pa.table({"doc": part.column("doc").slice(a, b - a), "set": col}))
                n += part.num_rows
                del sets
    return n


def _set_type(cfg: FuzzyDedupConfig) -> pa.DataType:
    return pa.uint32() if cfg.verify == "signature" else pa.uint64()


def verify_task(cand_files: list[str], sets_files: list[str], v: int, n_buckets: int,
                cfg: FuzzyDedupConfig) -> tuple[pa.Table, int, int]:
    """Bucket v: its unique candidate pairs (part v of every cand file) and the sets of the documents
    they need (part v of every sets file) -> the pairs whose two documents both
    have a set (neither is an exact loser) checked with `similar`. Returns the verified pairs reduced to a
    spanning forest (spanning_edges: the same connected components, one edge per member that is not its
    component's smallest doc_id), the number of candidates checked and the number of pairs verified."""
    empty = pa.table({"a": pa.array([], pa.string()), "b": pa.array([], pa.string()),
                      "fa": pa.array([], pa.int64()), "fb": pa.array([], pa.int64())})
    t = read_partition(cand_files, v, ["a", "b", "fa", "fb"])
    if t is None or not t.num_rows:
        return empty, 0, 0
    t = t.group_by(["a", "b", "fa", "fb"], use_threads=False).aggregate([])
    sets = read_partition(sets_files, v)
    if sets is None or not sets.num_rows:
        return empty, 0, 0
    docs = sets.column("doc").combine_chunks()
    col = sets.column("set").combine_chunks()
    offs = col.offsets.to_numpy()
    vals = col.values.to_numpy()
    ia = pc.index_in(t.column("a"), value_set=docs)
    ib = pc.index_in(t.column("b"), value_set=docs)
    both = pc.and_(pc.is_valid(ia), pc.is_valid(ib))  # a document without a set is an exact loser
    t = t.filter(both)
    ia = pc.filter(ia, both).to_numpy(zero_copy_only=False).astype(np.int64)
    ib = pc.filter(ib, both).to_numpy(zero_copy_only=False).astype(np.int64)
    keep = np.fromiter((similar(vals[offs[x]:offs[x + 1]], vals[offs[y]:offs[y + 1]], cfg)
                        for x, y in zip(ia.tolist(), ib.tolist())), dtype=bool, count=len(ia))
    ver = t.filter(pa.array(keep))
    return spanning_edges(ver), int(len(ia)), ver.num_rows


# ----------------------------------------------------------------------------------------------- clusters

def _components(pairs: pa.Table) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray]:
    """Connected components of the pairs (a, b, fa, fb) by vectorised min-label propagation over integer node
    ranks (rank = doc_id order, so a component's label is its smallest doc_id's rank). Returns the unique
    doc_ids (first-seen order), `order` (rank -> index into them), the label of every rank and its work file."""
    # unique doc_ids (first-seen order) and each end's index among them: hash tables over the unique ids
    # only, no copy of the 2 x pairs ends
    nodes = pc.unique(pa.chunked_array(pairs.column("a").chunks + pairs.column("b").chunks))
    rank = np.empty(len(nodes), np.int64)
    order = pc.sort_indices(nodes).to_numpy()  # UTF-8 byte order == code point order == Python's str order
    rank[order] = np.arange(len(nodes))
    e = np.concatenate([rank[pc.index_in(pairs.column(c), value_set=nodes).to_numpy()] for c in ("a", "b")])
    del rank
    u, v = e[:pairs.num_rows], e[pairs.num_rows:]
    label = np.arange(len(nodes), dtype=np.int64)  # by rank
    while True:
        m = np.minimum(label[u], label[v])
        new = label.copy()
        np.minimum.at(new, u, m)
        np.minimum.at(new, v, m)
        while True:  # pointer jumping: a label's own label is at least as small
            nxt = new[new]
            if (nxt == new).all():
                break
            new = nxt
        if (new == label).all():
            break
        label = new
    file_of = np.empty(len(nodes), np.int64)
    file_of[e] = np.concatenate([pairs.column("fa").to_numpy(), pairs.column("fb").to_numpy()])
    return nodes, order, label, file_of


def cluster_losers_arrow(pairs: pa.Table | None) -> tuple[pa.Array, np.ndarray]:
    """dedup.cluster_losers on Arrow columns (a, b, fa, fb): every member of a connected component but its
    smallest doc_id (an Arrow string array) and its work file id."""
    if pairs is None or pairs.num_rows == 0:
        return pa.array([], pa.string()), np.zeros(0, np.int64)
    nodes, order, label, file_of = _components(pairs)
    lose = np.flatnonzero(label != np.arange(len(nodes)))  # ranks that are not their component's minimum
    return nodes.take(pa.array(order[lose])), file_of[lose]


def spanning_edges(pairs: pa.Table) -> pa.Table:
    """Pairs (a, b, fa, fb) -> one pair (smallest doc_id of the component, member) per other member: the same
    components (and losers) from at most as many rows; near-duplicate clusters verified as stars and chains
    shrink about 2x."""
    if pairs.num_rows == 0:
        return pairs
    nodes, order, label, file_of = _components(pairs)
    lose = np.flatnonzero(label != np.arange(len(nodes)))
    root = label[lose]
    return pa.table({"a": nodes.take(pa.array(order[root])), "b": nodes.take(pa.array(order[lose])),
                     "fa": pa.array(file_of[root]), "fb": pa.array(file_of[lose])})
