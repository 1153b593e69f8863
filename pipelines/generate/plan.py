"""Planning of batch generation: which input columns mean what, which ids go to which shard, what is done.

    from pipelines.generate.plan import resolve_inputs, make_plan, skip_committed
    spec = resolve_inputs(cfg, peek_schema(cfg.input))   # id column, template, param columns, output schema
    plan = make_plan(ids, hashes, ns, chunk_rows=256)    # deterministic chunks: part-<k>-<digest>.parquet
    done, pending, superseded = skip_committed(fs, root, plan, cfg.quality, run_id)

The plan is a pure function of the ids: the sorted unique ids are cut into chunks of `chunk_rows`, and
chunk k is committed as data/part-<k>-<digest of its ids>.parquet. A shard that exists is complete (it
only ever appears through an atomic rename). `select_pending` runs in Ray Data tasks (pyarrow only).
Does not: read rows (io.py, runner.py), generate, or write shards and the manifest (commit.py).
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict

import fsspec
import pyarrow as pa

from pipelines.errors import ConfigError
from pipelines.generate.config import GenerateConfig, sampling_fields
from pipelines.generate.io import (
    CONFIG_FILE,
    DATA_DIR,
    MANIFEST,
    SUPERSEDED_DIR,
    existing_shards,
    output_schema,
    read_json,
)
from pipelines.generate.templates import resolve_template
from pipelines.runtime import atomic_write_json, join


class OutputMismatchError(ConfigError):
    """The output directory was started by a run with different generation settings."""


class Chunk(TypedDict):
    index: int
    name: str  # part-<index>-<digest of its ids>.parquet
    first_id: str
    last_id: str
    ids: int
    rows: int  # outputs expected: the sum of n over its ids


class Plan(TypedDict):
    chunks: list[Chunk]
    ids: int
    input_rows: int
    duplicate_rows: int
    keep_hash: dict[str, str]  # duplicated id -> the row hash that is kept
    last_id: str | None  # the last id under `limit` (None: no limit)


@dataclass(frozen=True)
class InputSpec:
    """What the input's columns mean for this run."""
    id_column: str | None  # None: ids are row hashes
    template: str
    param_columns: list[str]
    schema: pa.Schema  # of the output shards


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---- the input's columns --------------------------------------------------------------------------------

def _resolve_id_column(cfg: GenerateConfig, columns: list[str]) -> str | None:
    if cfg.id_column == "auto":
        return "id" if "id" in columns else None
    if cfg.id_column == "":
        return None
    if cfg.id_column not in columns:
        raise ConfigError(f"id_column={cfg.id_column!r} is not an input column; input columns are {columns} "
                          f"(use id_column=auto to hash rows that have no id)")
    return cfg.id_column


def _resolve_param_columns(cfg: GenerateConfig, columns: list[str], id_col: str | None) -> list[str]:
    sp_fields = sampling_fields()
    if cfg.param_columns is None:
        return [c for c in columns if c in sp_fields and c != id_col]
    bad = [c for c in cfg.param_columns if c not in sp_fields or c not in columns]
    if bad:
        raise ConfigError(f"param_columns {bad} must be input columns named like SamplingParams fields "
                          f"{sp_fields}; input columns are {columns}")
    return list(cfg.param_columns)


def resolve_inputs(cfg: GenerateConfig, in_schema: pa.Schema) -> InputSpec:
    """Check the config's column names against the input and pick the id column, template, param columns."""
    columns = list(in_schema.names)
    id_col = _resolve_id_column(cfg, columns)
    template = resolve_template(cfg.task, cfg.template, columns)
    missing_keep = [c for c in cfg.keep_columns if c not in columns]
    if missing_keep:
        raise ConfigError(f"keep_columns {missing_keep} are not input columns; input columns are {columns}")
    param_columns = _resolve_param_columns(cfg, columns, id_col)
    schema = output_schema({c: in_schema.field(c).type for c in cfg.keep_columns})
    return InputSpec(id_column=id_col, template=template, param_columns=param_columns, schema=schema)


# ---- the plan -------------------------------------------------------------------------------------------

def make_plan(ids: list[str], hashes: list[str], ns: list[int], chunk_rows: int, limit: int = 0) -> Plan:
    """Deterministic chunking of the ids. Duplicated ids keep the row with the smallest row hash."""
    best: dict[str, tuple[str, int]] = {}
    dup_rows = 0
    dups: set[str] = set()
    for rid, h, n in zip(ids, hashes, ns):
        prev = best.get(rid)
        if prev is None:
            best[rid] = (h, n)
            continue
        dup_rows += 1
        dups.add(rid)
        if h < prev[0]:
            best[rid] = (h, n)
    uniq = sorted(best)
    if limit:
        uniq = uniq[:limit]
    chunks: list[Chunk] = []
    for k in range(0, len(uniq), chunk_rows):
        cids = uniq[k:k + chunk_rows]
        digest = hashlib.sha256("\n".join(cids).encode()).hexdigest()[:12]
        chunks.append({
            "index": len(chunks),
            "name": f"part-{len(chunks):05d}-{digest}.parquet",
            "first_id": cids[0], "last_id": cids[-1], "ids": len(cids),
            "rows": sum(best[i][1] for i in cids),
        })
    return {
        "chunks": chunks,
        "ids": len(uniq),
        "input_rows": len(ids),
        "duplicate_rows": dup_rows,
        "keep_hash": {rid: best[rid][0] for rid in dups},
        "last_id": uniq[-1] if (limit and uniq) else None,
    }


def pending_selector(plan: Plan, pending: list[int]) -> dict[str, Any]:
    """The keyword arguments of select_pending for these pending chunks."""
    return dict(boundaries=[c["first_id"] for c in plan["chunks"]], pending=pending, keep_hash=plan["keep_hash"],
                last_id=plan["last_id"])


def select_pending(batch: pa.Table, *, boundaries: list[str], pending: list[int], keep_hash: dict[str, str],
                   last_id: str | None) -> pa.Table:
    """Keep rows of pending chunks (plus the chosen row of a duplicated id), tagged with _chunk."""
    pend = set(pending)
    ids = batch.column("_id").to_pylist()
    hashes = batch.column("_hash").to_pylist()
    keep, chunks = [], []
    for i, (rid, h) in enumerate(zip(ids, hashes)):
        if last_id is not None and rid > last_id:
            continue
        if rid in keep_hash and keep_hash[rid] != h:
            continue
        c = bisect.bisect_right(boundaries, rid) - 1
        if c in pend:
            keep.append(i)
            chunks.append(c)
    out = batch.take(pa.array(keep, type=pa.int64()))
    return out.append_column("_chunk", pa.array(chunks, type=pa.int32()))


# ---- the output directory -------------------------------------------------------------------------------

def claim_output(fs: fsspec.AbstractFileSystem, root: str, cfg: GenerateConfig, key_hash: str) -> None:
    """Refuse to resume an output that another configuration started (unless overwrite=true, which
    deletes its shards and manifest); then record this configuration in _config.json."""
    path = join(root, CONFIG_FILE)
    if fs.exists(path):
        prev = read_json(fs, path)
        if prev.get("hash") != key_hash:
            if not cfg.overwrite:
                mine = cfg.generation_key()
                diff = sorted(k for k in set(mine) | set(prev.get("key", {}))
                              if mine.get(k) != prev.get("key", {}).get(k))
                raise OutputMismatchError(
                    f"output {cfg.output!r} was started with different generation settings (differing: {diff}); "
                    f"use a new output, restore those settings to resume, or pass overwrite=true to replace it")
            for p in (join(root, DATA_DIR), join(root, MANIFEST)):
                if fs.exists(p):
                    fs.rm(p, recursive=True)
    atomic_write_json(path, {"hash": key_hash, "key": cfg.generation_key(), "created_at": now()}, fs)


def skip_committed(fs: fsspec.AbstractFileSystem, root: str, plan: Plan, quality: str,
                   run_id: str) -> tuple[list[int], list[int], list[str]]:
    """(done, pending, superseded): chunks whose shard is committed, chunks still to generate, and the
    shards of another plan (input or limit changed) or unreadable ones, moved to _superseded/<run_id>/."""
    data_dir = join(root, DATA_DIR)
    existing = existing_shards(fs, data_dir)
    chunks = plan["chunks"]

    def is_done(c: Chunk) -> bool:
        rows = existing.get(c["name"])
        # drop mode: a shard may hold fewer rows than outputs; its presence alone proves completion
        return rows is not None and rows >= 0 and (quality == "drop" or rows == c["rows"])

    done = sorted(c["index"] for c in chunks if is_done(c))
    done_names = {chunks[i]["name"] for i in done}
    superseded = sorted(n for n in existing if n not in done_names)
    for n in superseded:
        fs.makedirs(join(root, SUPERSEDED_DIR, run_id), exist_ok=True)
        fs.mv(join(data_dir, n), join(root, SUPERSEDED_DIR, run_id, n))
    done_set = set(done)
    pending = [c["index"] for c in chunks if c["index"] not in done_set]
    return done, pending, superseded
