"""Committing batch generation: output shards exactly once, the per-run record in _runs/, manifest.json last.

    from pipelines.generate.commit import Committer, RunLog, write_manifest
    log = RunLog.start(fs, root, key_hash)                     # _runs/<run_id>.json, status "running"
    committer = Committer(fs=fs, data_dir=f"{root}/data", chunks=plan["chunks"], pending=pending,
                          schema=spec.schema, drop_flagged=cfg.quality == "drop", run_log=log)
    for batch in stream: committer.add(batch)                   # commits each chunk once it is complete
    committer.finish()                                           # raises if a chunk is incomplete

A chunk is committed (temp file + rename) once every (id, index) output of it has arrived; duplicates
(a retried batch) are dropped by key, and rows of a committed chunk are ignored. The manifest lists
every shard with its checksum and is written last: a directory without it is unfinished.
Does not: generate (runner.py, predictor.py) or choose chunks (plan.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import to_dict
from pipelines.generate.config import GenerateConfig
from pipelines.generate.io import DATA_DIR, MANIFEST, OUTPUT_FORMAT, RUNS_DIR, shard_bytes
from pipelines.generate.plan import Chunk, Plan, now
from pipelines.runtime import atomic_write_bytes, atomic_write_json, code_version, join


@dataclass
class Stats:
    """Counts over the rows this run generated (field order = their order in the run record)."""
    rows: int = 0
    errors: int = 0
    flagged: int = 0
    dropped: int = 0
    completion_tokens: int = 0


@dataclass
class RunLog:
    """_runs/<run_id>.json: what one run did (chunks skipped, generated, timings, status), rewritten atomically."""
    fs: fsspec.AbstractFileSystem
    path: str
    record: dict[str, Any]

    @classmethod
    def start(cls, fs: fsspec.AbstractFileSystem, root: str, key_hash: str) -> RunLog:
        run_id = f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:6]}"
        record = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started_at": now(),
                  "status": "running", "config_hash": key_hash}
        log = cls(fs, join(root, RUNS_DIR, f"{run_id}.json"), record)
        log.write()
        return log

    @property
    def run_id(self) -> str:
        return str(self.record["run_id"])

    def write(self) -> None:
        atomic_write_json(self.path, self.record, self.fs, sort_keys=False)

    def update(self, **fields: Any) -> None:
        self.record.update(fields)
        self.write()

    def failed(self, e: BaseException) -> None:
        """Record a failure; never raises (the original error is what matters)."""
        self.record.update(status="failed", finished_at=now(), error=f"{type(e).__name__}: {e}"[:2000])
        try:
            self.write()
        except Exception:
            pass


@dataclass
class Committer:
    """Collects the generated rows of the pending chunks and commits each chunk once it is complete."""
    fs: fsspec.AbstractFileSystem
    data_dir: str
    chunks: list[Chunk]
    pending: list[int]
    schema: pa.Schema
    drop_flagged: bool  # quality=drop: flagged rows are counted, then left out of the shard
    run_log: RunLog
    stats: Stats = field(default_factory=Stats)
    committed: list[int] = field(default_factory=list)
    _buffers: dict[int, dict[tuple[str, int], dict[str, Any]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._buffers = {i: {} for i in self.pending}

    def add(self, batch: pa.Table) -> None:
        """Take one batch of output rows (with _chunk); commit the chunks it completes."""
        columns = self.schema.names
        touched = set()
        for row in batch.to_pylist():
            c = row["_chunk"]
            buf = self._buffers.get(c)
            if buf is None:  # already committed (a retried batch repeating itself)
                continue
            k = (row["id"], row["index"])
            if k not in buf:
                buf[k] = {name: row.get(name) for name in columns}
                touched.add(c)
        for c in sorted(touched):
            if len(self._buffers[c]) >= self.chunks[c]["rows"]:
                self._commit(self.chunks[c], self._buffers.pop(c))
                self.committed.append(c)
                self.run_log.record["chunks_generated"] = self.committed
                self.run_log.write()

    def finish(self) -> list[int]:
        """The chunks committed by this run; raises if the stream ended before a chunk was complete."""
        if self._buffers:
            missing = {self.chunks[c]["name"]: self.chunks[c]["rows"] - len(b) for c, b in self._buffers.items()}
            raise RuntimeError(f"generation ended with {len(self._buffers)} chunk(s) incomplete (missing outputs "
                               f"per shard: {missing}); nothing of them was committed, re-run to finish")
        return self.committed

    def _commit(self, chunk: Chunk, buf: dict[tuple[str, int], dict[str, Any]]) -> None:
        rows = [buf[k] for k in sorted(buf)]
        s = self.stats
        s.rows += len(rows)
        s.errors += sum(r["error"] is not None for r in rows)
        s.flagged += sum(r["quality"] is not None for r in rows)
        s.completion_tokens += sum(r["completion_tokens"] or 0 for r in rows)
        if self.drop_flagged:
            kept = [r for r in rows if r["quality"] is None]
            s.dropped += len(rows) - len(kept)
            rows = kept
        atomic_write_bytes(join(self.data_dir, chunk["name"]), shard_bytes(rows, self.schema), self.fs)

    def stats_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self.stats)


def _shard_entry(fs: fsspec.AbstractFileSystem, data_dir: str, c: Chunk) -> tuple[dict[str, Any], int]:
    """The manifest entry of a committed shard, and its completion tokens."""
    with fs.open(join(data_dir, c["name"]), "rb") as f:
        raw = f.read()
    t = pq.read_table(io.BytesIO(raw), columns=["error", "quality", "completion_tokens"])
    entry = {"path": f"{DATA_DIR}/{c['name']}", "ids": c["ids"], "rows": t.num_rows,
             "first_id": c["first_id"], "last_id": c["last_id"], "bytes": len(raw),
             "sha256": hashlib.sha256(raw).hexdigest(), "errors": t.num_rows - t["error"].null_count,
             "flagged": t.num_rows - t["quality"].null_count}
    return entry, pc.sum(t["completion_tokens"]).as_py() or 0


def write_manifest(fs: fsspec.AbstractFileSystem, root: str, cfg: GenerateConfig, plan: Plan, *,
                   checkpoint_id: str, tokenizer_id: str, key_hash: str, run_id: str,
                   template: str) -> dict[str, Any]:
    """manifest.json, written LAST through an atomic rename, lists every shard with its checksum."""
    data_dir = join(root, DATA_DIR)
    shards = []
    counts = {"rows": 0, "errors": 0, "flagged": 0, "completion_tokens": 0}
    for c in plan["chunks"]:
        entry, toks = _shard_entry(fs, data_dir, c)
        shards.append(entry)
        counts["rows"] += entry["rows"]
        counts["errors"] += entry["errors"]
        counts["flagged"] += entry["flagged"]
        counts["completion_tokens"] += toks
    try:
        version: str | None = code_version()
    except Exception:
        version = None
    manifest = {
        "format": OUTPUT_FORMAT,
        "task": cfg.task, "template": template,
        "checkpoint": cfg.checkpoint, "checkpoint_id": checkpoint_id, "tokenizer_id": tokenizer_id,
        "input": cfg.input, "config": to_dict(cfg), "config_hash": key_hash,
        "counts": {**counts, "ids": plan["ids"], "input_rows": plan["input_rows"],
                   "duplicate_rows": plan["duplicate_rows"]},
        "shards": shards, "last_run_id": run_id, "code_version": version, "created_at": now(),
    }
    manifest["id"] = hashlib.sha256(json.dumps([s["sha256"] for s in shards]).encode()).hexdigest()[:16]
    atomic_write_json(join(root, MANIFEST), manifest, fs)
    return manifest
