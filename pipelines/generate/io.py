"""Storage of batch generation: the output layout, reading inputs on the driver, checkpoint staging, shards.

    from pipelines.generate.io import list_input_files, read_input_local, load_output, local_checkpoint
    fs, files, fmt = list_input_files("s3://bucket/in/*.jsonl")      # sorted data files and their format
    table = load_output("runs/gen")                                  # a finished output as one Table

Inputs are Parquet, JSONL or CSV behind any fsspec URL; outputs are data/part-*.parquet plus manifest.json.
Writes go through pipelines.runtime's atomic writes. Does not: start Ray (pipelines.generate.runner reads
big inputs with Ray Data), decide which rows to generate (plan.py), or write the manifest (commit.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import shutil
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipelines.errors import ConfigError
from pipelines.runtime import is_local, join

OUTPUT_FORMAT = "raygpt-generations/1"
MANIFEST = "manifest.json"
DATA_DIR = "data"
RUNS_DIR = "_runs"
CONFIG_FILE = "_config.json"
SUPERSEDED_DIR = "_superseded"

FORMAT_EXTENSIONS = {
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz"),
    "csv": (".csv", ".csv.gz", ".tsv"),
}


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of `uri` and the path in it, without a trailing "/". Unlike
    pipelines.runtime.fs_and_path it never expands a glob (list_input_files does that itself)."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path.rstrip("/") or path


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode())


# ---- inputs -------------------------------------------------------------------------------------------

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
        input_format, files = _files_of_one_format(uri, files)
    if not files:
        raise ConfigError(f"input {uri!r} holds no files")
    return fs, files, input_format


def _files_of_one_format(uri: str, files: list[str]) -> tuple[str, list[str]]:
    by_fmt = {fmt: [f for f in files if f.lower().endswith(exts)] for fmt, exts in FORMAT_EXTENSIONS.items()}
    found = {fmt: fs_ for fmt, fs_ in by_fmt.items() if fs_}
    if len(found) > 1:
        raise ConfigError(f"input {uri!r} mixes formats {sorted(found)}; point input at one format or set "
                          f"input_format=parquet|jsonl|csv")
    if not found:
        raise ConfigError(f"input {uri!r} has no .parquet/.jsonl/.json/.csv files (found {len(files)} "
                          f"file(s){': ' + ', '.join(files[:3]) if files else ''}); set input_format "
                          f"explicitly if the extensions are unusual")
    return next(iter(found.items()))


def peek_schema(uri: str, input_format: str = "auto") -> pa.Schema:
    """The input's columns and types, read on the driver from the start of the first file (no Ray
    job): a Parquet footer, or the first MiB of JSONL/CSV. Null-typed columns are reported as string."""
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


def read_input_local(uri: str, input_format: str = "auto") -> pa.Table | None:
    """The whole input as one pyarrow Table, read on the driver (small inputs only)."""
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


def local_checkpoint(uri: str) -> str:
    """A local directory holding the checkpoint: the path itself, or a per-node cached copy of a URL."""
    fs, path = url_to_fs(uri)
    if is_local(fs):
        return path
    cache = os.path.join(os.path.expanduser(os.environ.get("RAYGPT_CACHE", "~/.cache/raygpt")), "checkpoints",
                         hashlib.sha256(uri.encode()).hexdigest()[:16])
    if not os.path.exists(os.path.join(cache, "checksums.json")):
        tmp = f"{cache}.tmp-{uuid.uuid4().hex[:8]}"
        fs.get(path.rstrip("/") + "/", tmp, recursive=True)
        try:
            os.rename(tmp, cache)
        except OSError:  # another process on this node won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return cache


# ---- output shards ------------------------------------------------------------------------------------

def output_schema(keep_types: dict[str, Any]) -> pa.Schema:
    """Columns of every output shard, in order: id, index, the kept input columns, then the results."""
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


def shard_bytes(rows: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    """One output shard (zstd Parquet) as bytes, ready for an atomic write."""
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def existing_shards(fs: fsspec.AbstractFileSystem, data_dir: str) -> dict[str, int]:
    """name -> num_rows of committed shards (-1: unreadable); removes temp files left by a killed run."""
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


def load_output(uri: str, *, require_manifest: bool = True) -> pa.Table | None:
    """The generated rows of a finished output as one pyarrow Table (refuses unfinished outputs)."""
    fs, root = url_to_fs(uri)
    if require_manifest and not fs.exists(join(root, MANIFEST)):
        raise ConfigError(f"output {uri!r} has no {MANIFEST}: the generation run is unfinished (or this is not a "
                          f"raygpt generate output); re-run `raygpt generate` with the same settings to finish it")
    tables = []
    if require_manifest:
        manifest = read_json(fs, join(root, MANIFEST))
        paths = [join(root, s["path"]) for s in manifest["shards"]]
    else:
        paths = sorted(p for p in fs.ls(join(root, DATA_DIR), detail=False)
                       if posixpath.basename(p).startswith("part-"))
    for p in paths:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(io.BytesIO(f.read())))
    return pa.concat_tables(tables) if tables else None
