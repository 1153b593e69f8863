"""The dedup barrier on Ray Data: key rows -> groupby decisions -> verification in the workers -> losers per file.

    dec = decide_barrier(bar, key_ds, partitions, stage_dir)     # on the driver, after a segment
    items = dec.next_items(work_files)                            # each work file with its own losers

One groupby on `_part` (pipelines.data.dedup.decide_group) marks exact duplicates and emits LSH candidate
pairs, each with the work files of its two documents. The decisions are materialized in the object store
(spilled to disk when large), never on the driver. Fuzzy candidates are then grouped by their pair of work
files and verified in the workers (VerifyGroup reads only those two files), so the driver receives only
exact losers, verified pairs and one stats row per batch: O(duplicates), not O(candidates) or O(text).
Connected components of the verified pairs pick one survivor per cluster (the smallest doc_id). Each
work file of the next segment gets only its own losers. Does not: hash documents (Signatures, in the
segment) or write work files (pipelines.data.runner).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.data.dedup import (
    KIND_BAND,
    KIND_EXACT,
    KIND_STATS,
    ApplyLosers,
    cluster_losers,
    decide_group,
    verify_pairs,
)
from pipelines.data.plan import Barrier
from pipelines.data.step_configs import FuzzyDedupConfig

FILE_ID_BASE = 1_000_000  # work file w<order>-<k>.parquet has id order * FILE_ID_BASE + k


def work_file_name(order: int, k: int) -> str:
    return f"w{order:06d}-{k:06d}.parquet"


def work_file_id(order: int, k: int) -> int:
    return order * FILE_ID_BASE + k


def file_id_of(name: str) -> int:
    """w000003-000001.parquet -> 3000001."""
    order, k = name.rsplit("/", 1)[-1][1:].split(".")[0].split("-")
    return work_file_id(int(order), int(k))


def file_name_of(fid: int) -> str:
    return work_file_name(fid // FILE_ID_BASE, fid % FILE_ID_BASE)


@dataclass
class Decisions:
    """What the driver learns at a barrier: losers (with their work file), counts, stats rows."""

    exact: dict[str, int] = field(default_factory=dict)  # doc_id -> work file id
    fuzzy: dict[str, int] = field(default_factory=dict)
    stats: list[str] = field(default_factory=list)
    candidate_pairs: int = 0
    verified_pairs: int = 0
    rows_seen: int = 0  # rows the driver received from the workers (the bound the tests check)

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
        by_file: dict[int, dict[str, list[str]]] = {}
        for name, losers in (("exact_dedup", self.exact), ("fuzzy_dedup", self.fuzzy)):
            for doc, fid in sorted(losers.items()):
                by_file.setdefault(fid, {}).setdefault(name, []).append(doc)
        return [{"file": f, "order": k, "losers": by_file.get(file_id_of(f), {})} for k, f in enumerate(files)]


class VerifyGroup:
    """Runs in the workers: candidate pairs between two work files -> the verified ones, plus the number of
    unique candidates (pairs with an exact duplicate are left out: its winner has the same buckets)."""

    def __init__(self, cfg: FuzzyDedupConfig, stage_dir: str, exact_ref: Any):
        self.cfg, self.stage_dir, self.exact_ref = cfg, stage_dir, exact_ref

    def __call__(self, tbl):
        import pyarrow as pa
        import ray

        exact = ray.get(self.exact_ref) if self.exact_ref is not None else np.zeros(0, object)
        a = tbl.column("a").to_numpy(zero_copy_only=False)
        b = tbl.column("b").to_numpy(zero_copy_only=False)
        pairs = sorted(set(zip(a.tolist(), b.tolist())))
        if len(exact) and pairs:
            gone = set(exact.tolist())
            pairs = [(x, y) for x, y in pairs if x not in gone and y not in gone]
        cand = np.array(pairs, dtype=object).reshape(-1, 2)
        fa, fb = int(tbl.column("fa")[0].as_py()), int(tbl.column("fb")[0].as_py())
        files = sorted({f"{self.stage_dir}/{file_name_of(fa)}", f"{self.stage_dir}/{file_name_of(fb)}"})
        ver = verify_pairs(cand, files, self.cfg) if len(cand) else cand
        n = len(ver)
        return pa.table({"a": pa.array([str(x) for x in ver[:, 0]] + [""], pa.string()),
                         "b": pa.array([str(x) for x in ver[:, 1]] + [""], pa.string()),
                         "fa": pa.array([fa] * (n + 1), pa.int64()), "fb": pa.array([fb] * (n + 1), pa.int64()),
                         "n_cand": pa.array([0] * n + [len(cand)], pa.int64())})


def _kinds(want_band: bool):
    def select(t):
        import pyarrow as pa

        mask = t.column("kind").to_numpy() == KIND_BAND
        return t.filter(pa.array(mask if want_band else ~mask))

    return select


def decide_barrier(bar: Barrier, key_ds, partitions: int, stage_dir: str) -> Decisions:
    """Groupby decisions, then (fuzzy) verification in the workers; the driver gets losers and counts only."""
    import ray
    from ray.data.context import ShuffleStrategy

    max_bucket = bar.fuzzy.max_bucket if bar.fuzzy is not None else 5000

    def decide(t):
        return decide_group(t, max_bucket)

    # task-based sort shuffle: the default hash shuffle starts aggregator actors, a fixed cost of
    # seconds per groupby that dominates on small clusters
    key_ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    dec = key_ds.groupby("_part", num_partitions=partitions).map_groups(decide, batch_format="pyarrow")
    if bar.fuzzy is not None:
        dec = dec.materialize()  # read twice (exact + stats, then candidates): kept in the object store
    out = Decisions()
    for b in dec.map_batches(_kinds(False), batch_format="pyarrow").iter_batches(batch_format="pyarrow",
                                                                                 batch_size=None):
        out.rows_seen += b.num_rows
        for k, x, f in zip(b.column("kind").to_numpy(), b.column("a").to_pylist(), b.column("fa").to_pylist()):
            if k == KIND_EXACT and bar.exact is not None:
                out.exact[x] = f
            elif k == KIND_STATS:
                out.stats.append(x)
    if bar.fuzzy is None:
        return out
    exact_ref = ray.put(np.array(sorted(out.exact), dtype=object)) if out.exact else None
    cand = dec.map_batches(_kinds(True), batch_format="pyarrow")
    cand.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    verify_group = VerifyGroup(bar.fuzzy, stage_dir, exact_ref)

    def verify(t):
        return verify_group(t)

    verified = cand.groupby(["fa", "fb"], num_partitions=partitions).map_groups(verify, batch_format="pyarrow")
    pairs, where = [], {}
    for b in verified.iter_batches(batch_format="pyarrow", batch_size=None):
        out.rows_seen += b.num_rows
        out.candidate_pairs += int(b.column("n_cand").to_numpy().sum())
        for x, y, fx, fy in zip(b.column("a").to_pylist(), b.column("b").to_pylist(), b.column("fa").to_pylist(),
                                b.column("fb").to_pylist()):
            if x:
                pairs.append((x, y))
                where[x], where[y] = fx, fy
    out.verified_pairs = len(pairs)
    out.fuzzy = {d: where[d] for d in cluster_losers(np.array(sorted(pairs), dtype=object).reshape(-1, 2))}
    return out
