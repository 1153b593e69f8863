"""Batch generation on Ray Data with exactly-once output shards: `run(cfg) -> summary dict`.

    raygpt generate --checkpoint runs/ckpt --input data.jsonl --output runs/gen --task summarize max_new_tokens=64
    python -c "from pipelines.generate import run, GenerateConfig; run(GenerateConfig(...))"

Exactly-once, in four steps (each in its own module; run() below is the list of stages):
  1. plan     every input row gets an id (its id column, or a hash of the row); the sorted ids are cut
              into chunks of `chunk_rows`; chunk k is committed as data/part-<k>-<digest of its ids>.parquet
              (prepare.py, plan.py).
  2. skip     a shard that exists is complete (it only ever appears through an atomic rename): its
              ids are not generated again (plan.py).
  3. generate the missing chunks: their rows, ordered by (chunk, prompt length), go through
              `map_batches` on an actor pool (runner.py, predictor.py); the driver consumes the ordered
              stream and commits a chunk (temp file + rename) once every (id, index) output of it has
              arrived. Duplicates (a retried batch) are dropped by key (commit.py).
Small inputs (<= driver_max_bytes) are read, prepared and ordered on the driver, so the actors are
Ray's first work; bigger ones are read and prepared by Ray Data tasks and ordered by a Ray Data sort.
  4. manifest.json is written last; a directory without it is unfinished (commit.py).
A kill at any moment loses only uncommitted chunks; a re-run regenerates only those. Each run leaves
a record in _runs/ (which chunks it generated, which it skipped). Storage helpers live in io.py.

Does not: train, serve, or coordinate concurrent runs on one output (jobs/nightly_generate.py holds
a lock for that; two racing runs still cannot duplicate an id, they only waste work).
"""

from __future__ import annotations

import time
from typing import Any

import fsspec
import ray

from gptcore.checkpoint import checkpoint_id, read_config
from pipelines import runtime
from pipelines.generate.commit import Committer, RunLog, write_manifest
from pipelines.generate.config import GenerateConfig
from pipelines.generate.io import (
    DATA_DIR,
    MANIFEST,
    list_input_files,
    load_output,
    local_checkpoint,
    peek_schema,
    url_to_fs,
)
from pipelines.generate.plan import (
    OutputMismatchError,
    Plan,
    claim_output,
    make_plan,
    now,
    resolve_inputs,
    skip_committed,
)
from pipelines.generate.prepare import derive_seed, prepare_batch, row_hash, tokenizer
from pipelines.generate.runner import ModelInfo, generation_stream, prepare_input
from pipelines.runtime import ensure_ray, join, sha256_json

# names other modules and tests import from here
__all__ = ["run", "GenerateConfig", "OutputMismatchError", "atomic_write_bytes", "derive_seed", "list_input_files",
           "load_output", "local_checkpoint", "make_plan", "prepare_batch", "row_hash", "url_to_fs"]


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """This module's former signature of pipelines.runtime.atomic_write_bytes(path, data, fs)."""
    runtime.atomic_write_bytes(path, data, fs)


def model_info(uri: str) -> ModelInfo:
    """Stage the checkpoint on this node and read its ids and context size."""
    local_dir = local_checkpoint(uri)
    return ModelInfo(local_dir=local_dir, checkpoint_id=checkpoint_id(local_dir),
                     tokenizer_id=tokenizer(local_dir).id, block_size=read_config(local_dir).block_size)


def run(cfg: GenerateConfig) -> dict[str, Any]:
    """Generate every missing id of cfg.input into cfg.output; returns a summary dict."""
    t = {"start": time.time()}
    fs, root = url_to_fs(cfg.output)
    model = model_info(cfg.checkpoint)
    key_hash = sha256_json({**cfg.generation_key(), "checkpoint_id": model.checkpoint_id})
    fs.makedirs(root, exist_ok=True)
    claim_output(fs, root, cfg, key_hash)
    fs.makedirs(join(root, DATA_DIR), exist_ok=True)
    log = RunLog.start(fs, root, key_hash)
    started_ray = ensure_ray(cfg.ray_address)
    try:
        # 1. read, prepare and plan (the plan is made on the driver, from the ids)
        spec = resolve_inputs(cfg, peek_schema(cfg.input, cfg.input_format))
        prepared = prepare_input(cfg, spec, model)
        t["prepared"] = time.time()
        ids = prepared.ids_table()
        plan = make_plan(ids["_id"].to_pylist(), ids["_hash"].to_pylist(), ids["_n"].to_pylist(),
                         cfg.chunk_rows, cfg.limit)
        # 2. skip committed shards; retire shards that belong to another plan
        done, pending, superseded = skip_committed(fs, root, plan, cfg.quality, log.run_id)
        log.update(chunks_total=len(plan["chunks"]), chunks_skipped=done, chunks_pending=pending,
                   superseded=superseded)
        t["planned"] = time.time()
        # 3. generate the missing chunks, committing each once it is complete
        committer = Committer(fs=fs, data_dir=join(root, DATA_DIR), chunks=plan["chunks"], pending=pending,
                              schema=spec.schema, drop_flagged=cfg.quality == "drop", run_log=log)
        t["generate"] = time.time()
        if pending:
            for batch in generation_stream(cfg, prepared, plan, pending, model):
                committer.add(batch)
        generated = committer.finish()
        gen_seconds = time.time() - t["generate"]
        # 4. manifest, last
        manifest = write_manifest(fs, root, cfg, plan, checkpoint_id=model.checkpoint_id,
                                  tokenizer_id=model.tokenizer_id, key_hash=key_hash, run_id=log.run_id,
                                  template=spec.template)
        seconds = {"read_prepare": round(t["prepared"] - t["start"], 3),
                   "plan": round(t["planned"] - t["prepared"], 3), "generate": round(gen_seconds, 3),
                   "manifest": round(time.time() - t["generate"] - gen_seconds, 3)}
        log.update(status="succeeded", finished_at=now(), chunks_generated=generated,
                   generate_seconds=round(gen_seconds, 3), **committer.stats_dict(), seconds=seconds)
        return _summary(cfg, root=root, plan=plan, manifest=manifest, log=log, committer=committer,
                        skipped=len(done), gen_seconds=gen_seconds, t_start=t["start"])
    except BaseException as e:
        log.failed(e)
        raise
    finally:
        if started_ray:
            ray.shutdown()


def _summary(cfg: GenerateConfig, *, root: str, plan: Plan, manifest: dict[str, Any], log: RunLog,
             committer: Committer, skipped: int, gen_seconds: float, t_start: float) -> dict[str, Any]:
    """What run() returns (and `raygpt generate` prints)."""
    stats = committer.stats
    return {
        "output": cfg.output, "manifest": join(root, MANIFEST), "run_id": log.run_id,
        "ids": plan["ids"], "input_rows": plan["input_rows"], "duplicate_rows": plan["duplicate_rows"],
        "chunks_total": len(plan["chunks"]), "chunks_skipped": skipped, "chunks_generated": len(committer.committed),
        "rows": manifest["counts"]["rows"], "errors": manifest["counts"]["errors"],
        "flagged": manifest["counts"]["flagged"], "generated_rows": stats.rows,
        "completion_tokens": stats.completion_tokens, "generate_seconds": gen_seconds,
        "tokens_per_s": stats.completion_tokens / gen_seconds if gen_seconds > 0 else 0.0,
        "seconds": time.time() - t_start, "phase_seconds": log.record["seconds"],
    }
