"""The dedup barrier: key files -> decide / exact / sets / verify Ray tasks -> losers written per work file.

    dec = decide_barrier(bar, key_ds, partitions, stage_dir)     # on the driver, after a segment
    items = dec.next_items(work_files)                            # each item names its own losers file

The segment writes, next to each work file, a key file partitioned by `_part` (one part per
partition: pipelines.data.dedup_shuffle), and the driver receives only the key files' names. Plain Ray
tasks, at most one per CPU in flight, then do the rest through files: one per partition reads part p
of every key file and decides it (pipelines.data.dedup.decide_group: exact losers, LSH candidate pairs,
the stats rows merged); one per group of work files writes `<stage>/losers/exact_dedup-<file>.parquet`;
one per group of work files ("sets") reads each of its work files once and computes the set (shingle
hashes or signature) of every document a candidate pair needs, once, routed to the bucket of the pairs
that need it; one per bucket of candidate pairs (by the pair's first doc_id) joins its pairs with those
sets, verifies them and returns only the verified pairs, cut to a spanning forest of their clusters
(kept as Arrow columns on the driver): O(work files + near duplicates), never the key rows, the
candidates or any text. Each work file is decoded once for the whole verification (linear in the corpus;
the previous design read both files of every pair of work files that shared a candidate).
Connected components of the verified pairs (vectorised min-label propagation) pick one survivor per
cluster (the smallest doc_id); the driver writes those losers per work file. Each task of the next
segment reads only the losers of the work file it reads (ApplyLosers.bind_item). The decisions do not
depend on the number of partitions or tasks. Does not: hash documents (Signatures, in the segment) or
write work files (pipelines.data.runner).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.data.dedup import ApplyLosers, read_losers
from pipelines.data.dedup_shuffle import (
    FILE_ID_BASE,
    cluster_losers_arrow,
    decide_task,
    exact_task,
    file_id_of,
    file_name_of,
    run_tasks,
    sets_task,
    shuffle_dir,
    shuffle_file,
    spanning_edges,
    verify_task,
    work_file_id,
    work_file_name,
    write_key_file,
    write_losers,
)
from pipelines.data.plan import Barrier
from pipelines.data.step_configs import FuzzyDedupConfig

__all__ = ["FILE_ID_BASE", "Decisions", "FileLosers", "LoserSet", "cluster_losers_arrow", "decide_barrier",
           "file_id_of", "file_name_of", "work_file_id", "work_file_name", "write_losers"]


class FileLosers:
    """item["losers"] of a work file: a reference to its loser files, read where they are applied (in the
    worker that reads the work file). Serialized as {"dir", "file", "names"}; .items() reads them."""

    def __init__(self, losers_dir: str, fid: int, names: list[str]):
        self.dir, self.fid, self.names = losers_dir, fid, list(names)

    def to_json(self) -> dict[str, Any]:
        return {"dir": self.dir, "file": self.fid, "names": self.names}

    def items(self) -> list[tuple[str, list[str]]]:
        return [(n, ids) for n in self.names for ids in [read_losers(self.dir, n, self.fid)] if ids]


class LoserSet:
    """All losers of one dedup step at a barrier, on disk (one file per work file); iterating reads them."""

    def __init__(self, losers_dir: str, name: str):
        self.dir, self.name, self.count = losers_dir, name, 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str]:
        prefix = f"{self.name}-"
        for p in sorted(os.listdir(self.dir)) if os.path.isdir(self.dir) else []:
            if p.startswith(prefix) and p.endswith(".parquet"):
                yield from read_losers(self.dir, self.name, int(p[len(prefix):-len(".parquet")]))


@dataclass
class Decisions:
    """What the driver learns at a barrier: loser counts (the losers stay on disk, per work file), stats."""

    losers_dir: str
    exact: LoserSet = field(init=False)
    fuzzy: LoserSet = field(init=False)
    stats: list[str] = field(default_factory=list)  # merged stats JSON (one per group of stats rows)
    candidate_pairs: int = 0
    verified_pairs: int = 0
    rows_seen: int = 0  # rows/results the driver received from the workers (the bound the tests check)
    tasks: int = 0  # barrier tasks run (decide + exact + verify)
    seconds: dict[str, float] = field(default_factory=dict)  # wall per phase: segment, decide, exact, sets, verify
    peak_mib: dict[str, float] = field(default_factory=dict)  # largest worker peak RSS seen by the end of each phase

    def __post_init__(self):
        os.makedirs(self.losers_dir, exist_ok=True)
        self.exact = LoserSet(self.losers_dir, "exact_dedup")
        self.fuzzy = LoserSet(self.losers_dir, "fuzzy_dedup")

    def info(self, bar: Barrier) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if bar.exact is not None:
            out["exact_dedup"] = {"duplicates": len(self.exact)}
        if bar.fuzzy is not None:
            out["fuzzy_dedup"] = {"near_duplicates": len(self.fuzzy), "candidate_pairs": self.candidate_pairs,
                                  "verified_pairs": self.verified_pairs}
        return out

    def steps(self, bar: Barrier) -> list[ApplyLosers]:
        """The steps that start the next segment; each binds the losers of the work file it reads."""
        return [ApplyLosers(name, "duplicate" if name == "exact_dedup" else "near_duplicate", None)
                for name in bar.order]

    def next_items(self, files: list[str]) -> list[dict[str, Any]]:
        names = ["exact_dedup", "fuzzy_dedup"]
        return [{"file": f, "order": k, "losers": FileLosers(self.losers_dir, file_id_of(f), names)}
                for k, f in enumerate(files)]


BUCKETS_PER_PARTITION = 4


class KeyFiles:
    """Runs in the workers, after the segment: a block of its output rows -> the key-file names they carry
    (the segment wrote its key files next to its work files), or a block of raw key rows (a caller that
    built them itself) -> one key file written here. Either way one small row per key file goes on."""

    def __init__(self, shuffle_dir: str, partitions: int):
        self.dir, self.partitions = shuffle_dir, partitions

    def __call__(self, t):
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # this worker's peak so far (Linux: KiB)
        if "key_file" in t.column_names:
            t = t.select(["key_file"])
        else:
            os.makedirs(self.dir, exist_ok=True)
            path = f"{self.dir}/x-{uuid.uuid4().hex}.parts"
            write_key_file(t, self.partitions, path)
            t = pa.table({"key_file": pa.array([path], pa.string())})
        return t.append_column("rss", pa.array(np.full(t.num_rows, rss, np.int64)))


def task_limit() -> int:
    """Barrier tasks in flight: the cluster's CPUs (each task holds one partition, group or bucket)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def decide_barrier(bar: Barrier, key_ds, partitions: int, stage_dir: str, limit: int = 0) -> Decisions:
    """The segment's key files -> decisions, exact losers written per work file and fuzzy verification, all
    in Ray tasks (at most `limit` in flight; 0: the cluster's CPUs); the driver gets the key-file names, one
    small result per task, merged stats and the verified pairs only."""
    import ray

    t0 = time.perf_counter()
    out = Decisions(f"{stage_dir}/losers")
    shuffle = shuffle_dir(stage_dir)
    os.makedirs(shuffle, exist_ok=True)
    key_files: list[str] = []
    seg_peak = 0
    for b in key_ds.map_batches(KeyFiles(shuffle, partitions), batch_format="pyarrow",
                                batch_size=None).iter_batches(batch_format="pyarrow", batch_size=None):
        out.rows_seen += b.num_rows
        key_files += [f for f in b.column("key_file").to_pylist() if f]
        seg_peak = max([seg_peak] + b.column("rss").to_pylist())
    key_files.sort()
    out.seconds["segment"] = time.perf_counter() - t0
    out.peak_mib["segment"] = seg_peak / 2**20
    limit = limit or task_limit()
    n = max(1, len(key_files))
    groups = min(partitions, n)  # groups of work files (exact losers)
    # buckets of candidate pairs (by doc_id): a verify task holds its pairs' document sets, a few KB per
    # document and ~3 per near duplicate, so 4 per partition keep it to tens of MB where half the corpus is
    # near duplicates
    buckets = BUCKETS_PER_PARTITION * max(partitions, limit) if bar.fuzzy is not None else 0
    max_bucket = bar.fuzzy.max_bucket if bar.fuzzy is not None else 5000
    t0 = time.perf_counter()
    ref = ray.put(key_files)
    peak: dict[str, int] = {}
    for _, r in run_tasks(decide_task, [(ref, p, max_bucket, groups, buckets, shuffle)
                                        for p in range(partitions)], limit, peak):
        out.rows_seen += 1
        out.stats += [r["stats"]] if r["stats"] else []
    del ref
    out.tasks += partitions
    out.seconds["decide"] = time.perf_counter() - t0
    out.peak_mib["decide"] = peak.get("rss", 0) / 2**20
    t0 = time.perf_counter()
    ref = ray.put([shuffle_file(shuffle, "exact", p) for p in range(partitions)])
    for _, count in run_tasks(exact_task, [(ref, g, out.losers_dir) for g in range(groups)], limit, peak):
        out.rows_seen += 1
        out.exact.count += count
    del ref
    out.tasks += groups
    out.seconds["exact"] = time.perf_counter() - t0
    out.peak_mib["exact"] = peak.get("rss", 0) / 2**20
    if bar.fuzzy is not None:
        _fuzzy(bar.fuzzy, shuffle, partitions, groups, buckets, limit, stage_dir, out, peak)
    shutil.rmtree(shuffle, ignore_errors=True)
    return out


class Forest:
    """The verified pairs on the driver, as Arrow columns (no Python object per document), cut back to a
    spanning forest of their clusters (one edge per member that is not its cluster's smallest doc_id)
    whenever the pairs added since outnumber it: O(near-duplicate documents) rows, not O(verified pairs)."""

    MIN_ROWS = 1 << 16

    def __init__(self):
        self.tables: list[pa.Table] = []
        self.forest_rows = self.pending = 0

    def add(self, t: pa.Table) -> None:
        if not t.num_rows:
            return
        self.tables.append(t)
        self.pending += t.num_rows
        if self.pending >= max(self.MIN_ROWS, self.forest_rows):
            merged = spanning_edges(pa.concat_tables(self.tables))
            self.tables, self.forest_rows, self.pending = [merged], merged.num_rows, 0

    def table(self) -> pa.Table | None:
        return pa.concat_tables(self.tables) if self.tables else None


def _fuzzy(cfg: FuzzyDedupConfig, shuffle: str, partitions: int, groups: int, buckets: int, limit: int,
           stage_dir: str, out: Decisions, peak: dict[str, int]) -> None:
    """Verify the candidates in Ray tasks: a sets_task per group of work files (each work file read once,
    each needed document's set computed once), then a verify_task per bucket of candidate pairs; cluster
    the verified pairs on the driver and write each work file's near-duplicate losers."""
    import ray

    t0 = time.perf_counter()
    ref = ray.put([shuffle_file(shuffle, "end", p) for p in range(partitions)])
    for _, _n in run_tasks(sets_task, [(ref, g, buckets, cfg, stage_dir, out.losers_dir, shuffle)
                                       for g in range(groups)], limit, peak):
        out.rows_seen += 1
    del ref
    out.tasks += groups
    out.seconds["sets"] = time.perf_counter() - t0
    out.peak_mib["sets"] = peak.get("rss", 0) / 2**20
    t0 = time.perf_counter()
    forest = Forest()
    cref = ray.put([shuffle_file(shuffle, "cand", p) for p in range(partitions)])
    sref = ray.put([shuffle_file(shuffle, "sets", g) for g in range(groups)])
    for _, (t, n_cand, n_ver) in run_tasks(verify_task, [(cref, sref, v, buckets, cfg)
                                                         for v in range(buckets)], limit, peak):
        out.rows_seen += t.num_rows + 1
        out.candidate_pairs += n_cand
        out.verified_pairs += n_ver
        forest.add(t)
    del cref, sref
    out.tasks += buckets
    out.seconds["verify"] = time.perf_counter() - t0
    out.peak_mib["verify"] = peak.get("rss", 0) / 2**20
    losers, files = cluster_losers_arrow(forest.table())
    del forest
    order = np.argsort(files, kind="stable")
    bounds = np.flatnonzero(np.diff(files[order])) + 1
    for idx in np.split(order, bounds) if order.size else []:
        write_losers(out.losers_dir, "fuzzy_dedup", int(files[idx[0]]), losers.take(pa.array(idx)).to_pylist())
        out.fuzzy.count += int(idx.size)
