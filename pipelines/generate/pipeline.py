"""Batch generation on Ray Data with exactly-once output shards: `run(cfg) -> summary dict`.

    raygpt generate --checkpoint runs/ckpt --input data.jsonl --output runs/gen --task summarize max_new_tokens=64
    python -c "from pipelines.generate import run, GenerateConfig; run(GenerateConfig(...))"

Exactly-once, in four steps:
  1. plan     every input row gets an id (its id column, or a hash of the row); the sorted ids are cut
              into chunks of `chunk_rows`; chunk k is committed as data/part-<k>-<digest of its ids>.parquet.
  2. skip     a shard that exists is complete (it only ever appears through an atomic rename): its
              ids are not generated again.
  3. generate the missing chunks: their rows, ordered by (chunk, prompt length), go through
              `map_batches` on an actor pool (pipelines.generate.predictor); the driver consumes the
              ordered stream and commits a chunk (temp file + rename) once every (id, index) output of
              it has arrived. Duplicates (a retried batch) are dropped by key.
Small inputs (<= driver_max_bytes) are read, prepared and ordered on the driver, so the actors are
Ray's first work; bigger ones are read and prepared by Ray Data tasks and ordered by a Ray Data sort.
  4. manifest.json is written last; a directory without it is unfinished.
A kill at any moment loses only uncommitted chunks; a re-run regenerates only those. Each run leaves
a record in _runs/ (which chunks it generated, which it skipped).

Does not: train, serve, or coordinate concurrent runs on one output (jobs/nightly_generate.py holds
a lock for that; two racing runs still cannot duplicate an id, they only waste work).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import socket
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import fsspec

from pipelines.config import ConfigError
from pipelines.generate.config import GenerateConfig

OUTPUT_FORMAT = "raygpt-generations/1"
MANIFEST = "manifest.json"
DATA_DIR = "data"
RUNS_DIR = "_runs"
CONFIG_FILE = "_config.json"
SUPERSEDED_DIR = "_superseded"

# columns every output shard has, in order (keep_columns go right after id/index)
BASE_OUTPUT_COLUMNS = ("prompt", "text", "prompt_tokens", "completion_tokens", "finish_reason", "checkpoint_id",
                       "tokenizer_id", "sampling_params", "seed", "error", "quality")
FORMAT_EXTENSIONS = {
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz"),
    "csv": (".csv", ".csv.gz", ".tsv"),
}


class OutputMismatchError(ConfigError):
    """The output directory was started by a run with different generation settings."""


# ---------------------------------------------------------------------------------------------
# storage helpers (fsspec: local paths and any URL)


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path.rstrip("/") or path


def _join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts)


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see either nothing or the whole file: a dot-prefixed
    temp file in the same directory, then a rename (local: os.replace; object stores: one PUT)."""
    parent = posixpath.dirname(path)
    tmp = _join(parent, f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    fs.makedirs(parent, exist_ok=True)
    with fs.open(tmp, "wb") as f:
        f.write(data)
        if hasattr(f, "flush"):
            f.flush()
        fileno = getattr(f, "fileno", None)
        if fileno is not None:
            try:
                os.fsync(fileno())
            except (OSError, io.UnsupportedOperation, ValueError):
                pass
    if _is_local(fs):
        os.replace(tmp, path)  # atomic on POSIX, also over an existing file
    else:
        fs.mv(tmp, path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def list_input_files(uri: str, input_format: str = "auto") -> tuple[fsspec.AbstractFileSystem, list[str], str]:
    """Resolve a file, directory or glob to a sorted list of data files and their format."""
    fs, path = url_to_fs(uri)
    if any(c in path for c in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(f for f in fs.find(path)
                       if not any(p.startswith((".", "_")) for p in f[len(path):].split("/") if p))
    elif fs.exists(path):
        files = [path]
    else:
        raise ConfigError(f"input {uri!r} does not exist; pass a file, a directory or a glob "
                          f"(any fsspec URL: s3://bucket/dir/, gs://..., /local/path/*.jsonl)")
    if input_format == "auto":
        by_fmt = {fmt: [f for f in files if f.lower().endswith(exts)] for fmt, exts in FORMAT_EXTENSIONS.items()}
        found = {fmt: fs_ for fmt, fs_ in by_fmt.items() if fs_}
        if len(found) > 1:
            raise ConfigError(f"input {uri!r} mixes formats {sorted(found)}; point input at one format or set "
                              f"input_format=parquet|jsonl|csv")
        if not found:
            raise ConfigError(f"input {uri!r} has no .parquet/.jsonl/.json/.csv files (found {len(files)} "
                              f"file(s){': ' + ', '.join(files[:3]) if files else ''}); set input_format "
                              f"explicitly if the extensions are unusual")
        input_format, files = next(iter(found.items()))
    if not files:
        raise ConfigError(f"input {uri!r} holds no files")
    return fs, files, input_format


def peek_schema(uri: str, input_format: str = "auto"):
    """The input's columns and types, read on the driver from the start of the first file (no Ray
    job): a Parquet footer, or the first MiB of JSONL/CSV. Null-typed columns are reported as string."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, files, fmt = list_input_files(uri, input_format)
    with fs.open(files[0], "rb", compression="infer") as f:
        if fmt == "parquet":
            schema = pq.read_schema(f)
        else:
            head = f.read(1 << 20)
            if len(head) == 1 << 20 and b"\n" in head:
                head = head[: head.rindex(b"\n") + 1]  # whole lines only
            reader = pajson.read_json if fmt == "jsonl" else pacsv.read_csv
            try:
                schema = reader(io.BytesIO(head)).schema
            except pa.ArrowInvalid as e:
                raise ConfigError(f"input file {files[0]!r} is not valid {fmt}: {e}") from None
    return pa.schema([pa.field(x.name, pa.string() if pa.types.is_null(x.type) else x.type) for x in schema])


def input_bytes(uri: str, input_format: str = "auto") -> int:
    fs, files, _ = list_input_files(uri, input_format)
    try:
        return sum(int(fs.size(f) or 0) for f in files)
    except Exception:
        return 1 << 62  # unknown: treat as big


def read_input_local(uri: str, input_format: str = "auto"):
    """The whole input as one pyarrow Table, read on the driver (small inputs only)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, files, fmt = list_input_files(uri, input_format)
    tables = []
    for f in files:
        with fs.open(f, "rb", compression="infer") as fh:
            raw = fh.read()
        try:
            if fmt == "parquet":
                tables.append(pq.read_table(io.BytesIO(raw)))
            elif fmt == "jsonl":
                tables.append(pajson.read_json(io.BytesIO(raw)))
            else:
                tables.append(pacsv.read_csv(io.BytesIO(raw)))
        except pa.ArrowInvalid as e:
            raise ConfigError(f"input file {f!r} is not valid {fmt}: {e}") from None
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def read_input(uri: str, input_format: str = "auto"):
    """A Ray Dataset over the input files (Parquet, JSONL or CSV; any fsspec URL)."""
    import ray

    fs, files, fmt = list_input_files(uri, input_format)
    filesystem = None
    if not _is_local(fs):
        import pyarrow.fs as pafs

        filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    # about one block per 32 MiB (Ray's default splits even a small file into many tiny blocks, each
    # a task later on); never fewer blocks than files
    try:
        total = sum(int(fs.size(f) or 0) for f in files)
    except Exception:
        total = 0
    blocks = max(len(files), min(1000, -(-total // (32 << 20))))
    # partitioning=None: a `dt=...` directory must not add columns (ids hash the row's own columns)
    kw = dict(filesystem=filesystem, partitioning=None, override_num_blocks=blocks)
    if fmt == "parquet":
        return ray.data.read_parquet(files, **kw)
    if fmt == "jsonl":
        # the Arrow JSON reader (lines=False) reads JSON Lines and keeps JSON types ("007" stays a string;
        # the pandas reader behind lines=True would turn it into 7)
        return ray.data.read_json(files, file_extensions=None, **kw)
    return ray.data.read_csv(files, file_extensions=None, **kw)


def local_checkpoint(uri: str) -> str:
    """A local directory holding the checkpoint: the path itself, or a per-node cached copy of a URL."""
    fs, path = url_to_fs(uri)
    if _is_local(fs):
        return path
    cache = os.path.join(os.path.expanduser(os.environ.get("RAYGPT_CACHE", "~/.cache/raygpt")), "checkpoints",
                         hashlib.sha256(uri.encode()).hexdigest()[:16])
    if not os.path.exists(os.path.join(cache, "checksums.json")):
        tmp = f"{cache}.tmp-{uuid.uuid4().hex[:8]}"
        fs.get(path.rstrip("/") + "/", tmp, recursive=True)
        try:
            os.rename(tmp, cache)
        except OSError:  # another process on this node won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return cache


# ---------------------------------------------------------------------------------------------
# ids, prompts, sampling params (runs in Ray Data tasks)


def row_hash(row: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()[:32]


def derive_seed(base: int, row_id: str) -> int:
    """Per-row seed from the run seed and the id: the same row samples the same text on every
    re-run, whatever batch it lands in."""
    return int(hashlib.sha256(f"{base}:{row_id}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _py(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


_TOKENIZERS: dict[str, Any] = {}
_INT_FIELDS = {"max_new_tokens", "top_k", "no_repeat_ngram_size", "num_beams", "n", "seed"}


def _tokenizer(ckpt_dir: str):
    tok = _TOKENIZERS.get(ckpt_dir)
    if tok is None:
        from gptcore.tokenizer import Tokenizer

        tok = _TOKENIZERS[ckpt_dir] = Tokenizer.load(os.path.join(ckpt_dir, "tokenizer.json"))
    return tok


def prepare_batch(batch, *, ckpt_dir: str, id_column: str | None, template: str, max_field_chars: int,
                  param_columns: list[str], sampling: dict[str, Any], seed: int, block_size: int):
    """Input rows -> rows with _id, _hash, prompt, _prompt_ids, _plen, _params (JSON), _seed, _n, _error.

    Runs in Ray Data tasks, so it stays light: no torch (SamplingParams is validated by the actor,
    which has torch loaded anyway); only the tokenizer."""
    import pyarrow as pa

    from pipelines.generate.templates import render

    tok = _tokenizer(ckpt_dir)
    rows = batch.to_pylist()
    prompts, ids, hashes, params_json, seeds, ns, errors = [], [], [], [], [], [], []
    for row in rows:
        h = row_hash(row)
        rid = row.get(id_column) if id_column else None
        rid = h if rid is None or str(rid) == "" else str(rid)
        err = None
        try:
            prompt = render(template, row, max_field_chars)
        except Exception as e:  # a malformed value should fail its row, not the job
            prompt, err = "", f"template: {type(e).__name__}: {e}"
        p = dict(sampling)
        for c in param_columns:
            v = _py(row.get(c))
            if isinstance(v, float) and v != v:  # NaN (CSV/pandas null)
                v = None
            if v is not None:
                if c in _INT_FIELDS and isinstance(v, float) and v.is_integer():
                    v = int(v)  # a CSV/JSON column with nulls arrives as float
                p[c] = v
        row_seed = p.get("seed")
        if row_seed is None:
            row_seed = derive_seed(seed, rid)
        p["seed"] = row_seed
        n = p.get("n", 1)
        # an invalid n gives one (error) output row; the actor reports the reason
        n = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 1024 else 1
        ids.append(rid)
        hashes.append(h)
        prompts.append(prompt)
        params_json.append(json.dumps(p, sort_keys=True, default=str))
        seeds.append(int(row_seed) if isinstance(row_seed, int) and not isinstance(row_seed, bool) else None)
        ns.append(n)
        errors.append(err)
    token_ids = tok.encode_batch(prompts) if prompts else []
    for i, ids_i in enumerate(token_ids):
        if errors[i] is not None:
            continue
        p = json.loads(params_json[i])
        truncate = p.get("truncate", "error")  # SamplingParams' defaults
        max_new = p.get("max_new_tokens", 16)
        max_new = max_new if isinstance(max_new, int) and not isinstance(max_new, bool) else 0
        if not ids_i:
            errors[i] = "empty prompt: the template rendered no tokens; check the input columns"
        elif len(ids_i) + max_new > block_size and truncate != "left":  # the engine's context rule
            errors[i] = (f"prompt too long: {len(ids_i)} tokens + max_new_tokens={max_new} > the model's context "
                         f"block_size={block_size}; shorten the input (max_field_chars=...), lower "
                         f"max_new_tokens, or set sampling.truncate=left")
    out = batch
    for name, values, typ in (
        ("_id", ids, pa.string()), ("_hash", hashes, pa.string()), ("prompt", prompts, pa.string()),
        ("_prompt_ids", token_ids, pa.list_(pa.int32())), ("_plen", [len(t) for t in token_ids], pa.int32()),
        ("_params", params_json, pa.string()), ("_seed", seeds, pa.int64()), ("_n", ns, pa.int32()),
        ("_error", errors, pa.string()),
    ):
        arr = pa.array(values, type=typ)
        if name in out.column_names:
            out = out.set_column(out.column_names.index(name), name, arr)
        else:
            out = out.append_column(name, arr)
    return out


def select_pending(batch, *, boundaries: list[str], pending: list[int], keep_hash: dict[str, str],
                   last_id: str | None):
    """Keep rows of pending chunks (plus the chosen row of a duplicated id), tagged with _chunk."""
    import bisect

    import pyarrow as pa

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


# ---------------------------------------------------------------------------------------------
# the plan


def make_plan(ids: list[str], hashes: list[str], ns: list[int], chunk_rows: int, limit: int = 0) -> dict[str, Any]:
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
    chunks = []
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


# ---------------------------------------------------------------------------------------------
# run


def _resolve_id_column(cfg: GenerateConfig, columns: list[str]) -> str | None:
    if cfg.id_column == "auto":
        return "id" if "id" in columns else None
    if cfg.id_column == "":
        return None
    if cfg.id_column not in columns:
        raise ConfigError(f"id_column={cfg.id_column!r} is not an input column; input columns are {columns} "
                          f"(use id_column=auto to hash rows that have no id)")
    return cfg.id_column


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_json(fs, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode())


def _check_output_config(fs, root: str, cfg: GenerateConfig, key_hash: str) -> None:
    """Refuse to resume an output that another configuration started (unless overwrite=true)."""
    path = _join(root, CONFIG_FILE)
    if fs.exists(path):
        prev = _read_json(fs, path)
        if prev.get("hash") != key_hash:
            if not cfg.overwrite:
                mine = cfg.generation_key()
                diff = sorted(k for k in set(mine) | set(prev.get("key", {}))
                              if mine.get(k) != prev.get("key", {}).get(k))
                raise OutputMismatchError(
                    f"output {cfg.output!r} was started with different generation settings (differing: {diff}); "
                    f"use a new output, restore those settings to resume, or pass overwrite=true to replace it")
            for p in (_join(root, DATA_DIR), _join(root, MANIFEST)):
                if fs.exists(p):
                    fs.rm(p, recursive=True)
    atomic_write_bytes(fs, path, json.dumps({"hash": key_hash, "key": cfg.generation_key(), "created_at": _now()},
                                            indent=2, sort_keys=True, default=str).encode())


def _existing_shards(fs, data_dir: str) -> dict[str, int]:
    """name -> num_rows of committed shards; removes temp files left by a killed run."""
    import pyarrow.parquet as pq

    out: dict[str, int] = {}
    if not fs.exists(data_dir):
        return out
    for p in fs.ls(data_dir, detail=False):
        name = posixpath.basename(p.rstrip("/"))
        if name.startswith(".") and ".tmp-" in name:
            fs.rm(p)  # uncommitted leftovers of a killed run (never visible to readers)
            continue
        if name.startswith("part-") and name.endswith(".parquet"):
            try:
                with fs.open(p, "rb") as f:
                    out[name] = pq.ParquetFile(f).metadata.num_rows
            except Exception:
                out[name] = -1  # unreadable: regenerate
    return out


def output_schema(keep_types: dict[str, Any]):
    import pyarrow as pa

    fields = [pa.field("id", pa.string()), pa.field("index", pa.int32())]
    fields += [pa.field(c, t) for c, t in keep_types.items()]
    fields += [
        pa.field("prompt", pa.string()), pa.field("text", pa.string()),
        pa.field("prompt_tokens", pa.int32()), pa.field("completion_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()), pa.field("checkpoint_id", pa.string()),
        pa.field("tokenizer_id", pa.string()), pa.field("sampling_params", pa.string()),
        pa.field("seed", pa.int64()), pa.field("error", pa.string()), pa.field("quality", pa.string()),
    ]
    return pa.schema(fields)


def _shard_bytes(rows: list[dict[str, Any]], schema) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _ensure_ray(cfg: GenerateConfig) -> bool:
    """Connect to (or start) Ray; True if this call started it (and so must stop it)."""
    from pipelines.runtime import ensure_ray

    return ensure_ray(cfg.ray_address)


def run(cfg: GenerateConfig) -> dict[str, Any]:
    """Generate every missing id of cfg.input into cfg.output; returns a summary dict."""
    import pyarrow as pa

    from gptcore.checkpoint import checkpoint_id, read_config
    from pipelines.generate.config import sampling_fields
    from pipelines.generate.templates import resolve_template

    t_start = time.time()
    fs, root = url_to_fs(cfg.output)
    ckpt_dir = local_checkpoint(cfg.checkpoint)
    ckpt_id = checkpoint_id(ckpt_dir)
    block_size = read_config(ckpt_dir).block_size
    tok_id = _tokenizer(ckpt_dir).id
    key = {**cfg.generation_key(), "checkpoint_id": ckpt_id}
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    fs.makedirs(root, exist_ok=True)
    _check_output_config(fs, root, cfg, key_hash)
    data_dir = _join(root, DATA_DIR)
    fs.makedirs(data_dir, exist_ok=True)
    run_id = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:6]}"
    run_log = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started_at": _now(),
               "status": "running", "config_hash": key_hash}
    run_log_path = _join(root, RUNS_DIR, f"{run_id}.json")
    atomic_write_bytes(fs, run_log_path, json.dumps(run_log, indent=2).encode())

    started_ray = _ensure_ray(cfg)
    try:
        import ray

        in_schema = peek_schema(cfg.input, cfg.input_format)
        columns = list(in_schema.names)
        id_col = _resolve_id_column(cfg, columns)
        template = resolve_template(cfg.task, cfg.template, columns)
        missing_keep = [c for c in cfg.keep_columns if c not in columns]
        if missing_keep:
            raise ConfigError(f"keep_columns {missing_keep} are not input columns; input columns are {columns}")
        sp_fields = sampling_fields()
        if cfg.param_columns is None:
            param_columns = [c for c in columns if c in sp_fields and c != id_col]
        else:
            bad = [c for c in cfg.param_columns if c not in sp_fields or c not in columns]
            if bad:
                raise ConfigError(f"param_columns {bad} must be input columns named like SamplingParams fields "
                                  f"{sp_fields}; input columns are {columns}")
            param_columns = list(cfg.param_columns)
        keep_types = {c: in_schema.field(c).type for c in cfg.keep_columns}
        schema = output_schema(keep_types)

        prep_kw = dict(ckpt_dir=ckpt_dir, id_column=id_col, template=template, max_field_chars=cfg.max_field_chars,
                       param_columns=param_columns, sampling=dict(cfg.sampling), seed=cfg.seed, block_size=block_size)
        local_blocks = prepared = None
        if input_bytes(cfg.input, cfg.input_format) <= cfg.driver_max_bytes:
            # small input: read and prepare right here; Ray's first work is the generation itself
            table = read_input_local(cfg.input, cfg.input_format)
            step = 8192
            local_blocks = [prepare_batch(table.slice(i, step), **prep_kw) for i in range(0, table.num_rows, step)]
        else:
            prepared = read_input(cfg.input, cfg.input_format).map_batches(
                prepare_batch, batch_format="pyarrow", zero_copy_batch=False, fn_kwargs=prep_kw).materialize()
        t_prepared = time.time()

        # 1. plan (on the driver, from the ids)
        if local_blocks is not None:
            id_parts = [t.select(["_id", "_hash", "_n"]) for t in local_blocks]
        else:
            id_parts = [ray.get(r) for r in prepared.select_columns(["_id", "_hash", "_n"]).to_arrow_refs()]
        id_parts = [t for t in id_parts if t.num_rows]
        ids_tbl = pa.concat_tables(id_parts) if id_parts else pa.table(
            {"_id": pa.array([], pa.string()), "_hash": pa.array([], pa.string()), "_n": pa.array([], pa.int32())})
        plan = make_plan(ids_tbl["_id"].to_pylist(), ids_tbl["_hash"].to_pylist(), ids_tbl["_n"].to_pylist(),
                         cfg.chunk_rows, cfg.limit)
        chunks = plan["chunks"]

        # 2. skip committed shards; retire shards that belong to another plan
        existing = _existing_shards(fs, data_dir)

        def is_done(c: dict[str, Any]) -> bool:
            rows = existing.get(c["name"])
            # drop mode: a shard may hold fewer rows than outputs; its presence alone proves completion
            return rows is not None and rows >= 0 and (cfg.quality == "drop" or rows == c["rows"])

        done = {c["index"] for c in chunks if is_done(c)}
        done_names = {chunks[i]["name"] for i in done}
        superseded = sorted(n for n in existing if n not in done_names)
        for n in superseded:  # another plan's shard (input changed, limit changed) or an unreadable one
            fs.makedirs(_join(root, SUPERSEDED_DIR, run_id), exist_ok=True)
            fs.mv(_join(data_dir, n), _join(root, SUPERSEDED_DIR, run_id, n))
        pending = [c["index"] for c in chunks if c["index"] not in done]
        run_log.update(chunks_total=len(chunks), chunks_skipped=sorted(done), chunks_pending=pending,
                       superseded=superseded)
        atomic_write_bytes(fs, run_log_path, json.dumps(run_log, indent=2).encode())

        t_planned = time.time()
        # 3. generate the missing chunks
        stats = {"rows": 0, "errors": 0, "flagged": 0, "dropped": 0, "completion_tokens": 0}
        generated: list[int] = []
        t_gen = time.time()
        if pending:
            generated = _generate(cfg, prepared, local_blocks, plan, pending, ckpt_id, tok_id, schema,
                                  fs, data_dir, stats, run_log, run_log_path)
        gen_seconds = time.time() - t_gen

        # 4. manifest, last
        manifest = write_manifest(fs, root, cfg, plan, ckpt_id, tok_id, key_hash, run_id, template)
        run_log.update(status="succeeded", finished_at=_now(), chunks_generated=generated,
                       generate_seconds=round(gen_seconds, 3), **stats,
                       seconds={"read_prepare": round(t_prepared - t_start, 3),
                                "plan": round(t_planned - t_prepared, 3), "generate": round(gen_seconds, 3),
                                "manifest": round(time.time() - t_gen - gen_seconds, 3)})
        atomic_write_bytes(fs, run_log_path, json.dumps(run_log, indent=2).encode())
        return {
            "output": cfg.output, "manifest": _join(root, MANIFEST), "run_id": run_id,
            "ids": plan["ids"], "input_rows": plan["input_rows"], "duplicate_rows": plan["duplicate_rows"],
            "chunks_total": len(chunks), "chunks_skipped": len(done), "chunks_generated": len(generated),
            "rows": manifest["counts"]["rows"], "errors": manifest["counts"]["errors"],
            "flagged": manifest["counts"]["flagged"], "generated_rows": stats["rows"],
            "completion_tokens": stats["completion_tokens"], "generate_seconds": gen_seconds,
            "tokens_per_s": stats["completion_tokens"] / gen_seconds if gen_seconds > 0 else 0.0,
            "seconds": time.time() - t_start, "phase_seconds": run_log["seconds"],
        }
    except BaseException as e:
        run_log.update(status="failed", finished_at=_now(), error=f"{type(e).__name__}: {e}"[:2000])
        try:
            atomic_write_bytes(fs, run_log_path, json.dumps(run_log, indent=2).encode())
        except Exception:
            pass
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _generate(cfg, prepared, local_blocks, plan, pending, ckpt_id, tok_id, schema, fs, data_dir, stats,
              run_log, run_log_path) -> list[int]:
    import ray

    from pipelines.generate.predictor import GenerationPredictor

    chunks = plan["chunks"]
    sel = dict(boundaries=[c["first_id"] for c in chunks], pending=pending, keep_hash=plan["keep_hash"],
               last_id=plan["last_id"])
    n_rows = sum(chunks[i]["ids"] for i in pending)
    # two batches per block (= per actor task): actors share the work and a block's outputs reach the
    # driver, which commits the chunks they complete, soon after it was generated
    rows_per_block = cfg.batch_size * 2
    if local_blocks is not None:
        # small job: order the rows on the driver (one pass, no shuffle tasks)
        import pyarrow as pa

        parts = [select_pending(t, **sel) for t in local_blocks]
        table = pa.concat_tables(parts, promote_options="default").sort_by([("_chunk", "ascending"),
                                                                              ("_plen", "ascending")])
        work = ray.data.from_arrow([table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)])
    else:
        # big job: Ray Data sort by (chunk, prompt length); the sort's output blocks = its input blocks
        n_blocks = max(2 * cfg.concurrency, min(2000, -(-n_rows // rows_per_block)))
        work = (prepared.map_batches(select_pending, batch_format="pyarrow", zero_copy_batch=False, fn_kwargs=sel)
                .repartition(n_blocks).sort(["_chunk", "_plen"]))
    # Bounded restarts/retries (Ray Data's own default is unlimited, which turns a deterministic crash
    # into a hang). Ray 2.60 has no named map_batches parameter for them; the generic
    # **ray_remote_args path still works but is deprecated (removal announced for Ray 2.64).
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RayDeprecationWarning)
        out = work.map_batches(
            GenerationPredictor,
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=False,
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            fn_constructor_kwargs=dict(
                checkpoint=cfg.checkpoint, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size,
                torch_threads=cfg.torch_threads, quality=cfg.quality, pid_dir=cfg.pid_dir,
                debug_delay_s=cfg.debug_delay_s, keep_columns=list(cfg.keep_columns),
                checkpoint_id=ckpt_id, tokenizer_id=tok_id),
            max_restarts=cfg.max_restarts,
            max_task_retries=cfg.max_task_retries,
        )
    ctx = out.context
    ctx.execution_options.preserve_order = True  # chunks reach the driver in order -> early commits
    ctx.enable_progress_bars = bool(cfg.progress)

    expected = {i: chunks[i]["rows"] for i in pending}
    buffers: dict[int, dict[tuple[str, int], dict[str, Any]]] = {i: {} for i in pending}
    committed: list[int] = []
    columns = schema.names
    for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
        touched = set()
        for row in batch.to_pylist():
            c = row["_chunk"]
            buf = buffers.get(c)
            if buf is None:  # already committed (a retried batch repeating itself)
                continue
            k = (row["id"], row["index"])
            if k not in buf:
                buf[k] = {name: row.get(name) for name in columns}
                touched.add(c)
        for c in sorted(touched):
            if len(buffers[c]) >= expected[c]:
                _commit(cfg, fs, data_dir, chunks[c], buffers.pop(c), schema, stats)
                committed.append(c)
                run_log["chunks_generated"] = committed
                atomic_write_bytes(fs, run_log_path, json.dumps(run_log, indent=2).encode())
    if buffers:
        missing = {chunks[c]["name"]: expected[c] - len(b) for c, b in buffers.items()}
        raise RuntimeError(f"generation ended with {len(buffers)} chunk(s) incomplete (missing outputs per "
                           f"shard: {missing}); nothing of them was committed, re-run to finish")
    return committed


def _commit(cfg, fs, data_dir, chunk, buf, schema, stats) -> None:
    rows = [buf[k] for k in sorted(buf)]
    stats["rows"] += len(rows)
    stats["errors"] += sum(r["error"] is not None for r in rows)
    stats["flagged"] += sum(r["quality"] is not None for r in rows)
    stats["completion_tokens"] += sum(r["completion_tokens"] or 0 for r in rows)
    if cfg.quality == "drop":
        kept = [r for r in rows if r["quality"] is None]
        stats["dropped"] += len(rows) - len(kept)
        rows = kept
    atomic_write_bytes(fs, _join(data_dir, chunk["name"]), _shard_bytes(rows, schema))


def write_manifest(fs, root: str, cfg: GenerateConfig, plan: dict[str, Any], ckpt_id: str, tok_id: str,
                   key_hash: str, run_id: str, template: str) -> dict[str, Any]:
    """manifest.json, written LAST through an atomic rename, lists every shard with its checksum."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipelines.config import to_dict

    data_dir = _join(root, DATA_DIR)
    shards = []
    counts = {"rows": 0, "errors": 0, "flagged": 0, "completion_tokens": 0}
    for c in plan["chunks"]:
        p = _join(data_dir, c["name"])
        with fs.open(p, "rb") as f:
            raw = f.read()
        t = pq.read_table(io.BytesIO(raw), columns=["error", "quality", "completion_tokens"])
        n_err = t.num_rows - t["error"].null_count
        n_flag = t.num_rows - t["quality"].null_count
        toks = pc.sum(t["completion_tokens"]).as_py() or 0
        shards.append({"path": f"{DATA_DIR}/{c['name']}", "ids": c["ids"], "rows": t.num_rows,
                       "first_id": c["first_id"], "last_id": c["last_id"], "bytes": len(raw),
                       "sha256": hashlib.sha256(raw).hexdigest(), "errors": n_err, "flagged": n_flag})
        counts["rows"] += t.num_rows
        counts["errors"] += n_err
        counts["flagged"] += n_flag
        counts["completion_tokens"] += toks
    try:
        from gptcore.checkpoint import code_version

        version = code_version()
    except Exception:
        version = None
    manifest = {
        "format": OUTPUT_FORMAT,
        "task": cfg.task, "template": template,
        "checkpoint": cfg.checkpoint, "checkpoint_id": ckpt_id, "tokenizer_id": tok_id,
        "input": cfg.input, "config": to_dict(cfg), "config_hash": key_hash,
        "counts": {**counts, "ids": plan["ids"], "input_rows": plan["input_rows"],
                   "duplicate_rows": plan["duplicate_rows"]},
        "shards": shards, "last_run_id": run_id, "code_version": version, "created_at": _now(),
    }
    manifest["id"] = hashlib.sha256(json.dumps([s["sha256"] for s in shards]).encode()).hexdigest()[:16]
    atomic_write_bytes(fs, _join(root, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    return manifest


def load_output(uri: str, *, require_manifest: bool = True):
    """The generated rows of a finished output as one pyarrow Table (refuses unfinished outputs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = url_to_fs(uri)
    if require_manifest and not fs.exists(_join(root, MANIFEST)):
        raise ConfigError(f"output {uri!r} has no {MANIFEST}: the generation run is unfinished (or this is not a "
                          f"raygpt generate output); re-run `raygpt generate` with the same settings to finish it")
    tables = []
    if require_manifest:
        manifest = _read_json(fs, _join(root, MANIFEST))
        paths = [_join(root, s["path"]) for s in manifest["shards"]]
    else:
        paths = sorted(p for p in fs.ls(_join(root, DATA_DIR), detail=False)
                       if posixpath.basename(p).startswith("part-"))
    for p in paths:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(io.BytesIO(f.read())))
    return pa.concat_tables(tables) if tables else None
