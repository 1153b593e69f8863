"""Rows of one split of a `raygpt prep` dataset, read from its Parquet shards on demand; the node cache.

    rows = ShardRows(manifest, "train")                 # no I/O yet
    got = rows.take(np.array([5, 70_000]), ("input_ids",))   # {"input_ids": (2, T+1) int64}
    rows.prefetch(ix, ("input_ids",))                   # start reading those rows' chunks in the background
    rows.loss_mask[ix, 1:]                              # numpy-style column access (reads just those rows)

A split is cut into chunks of CHUNK_ROWS rows per shard (prep writes row groups of that many rows). A
chunk is read whole (the Parquet row groups that hold it), checked (row width == block_size+1, token ids
inside the vocabulary, row count as in manifest.json) and kept in an LRU of CACHE_CHUNKS chunks. One
reader thread per ShardRows does all reading, so `prefetch` overlaps reading with training and memory
stays bounded by CACHE_CHUNKS * CHUNK_ROWS * (block_size+1) * 4 bytes per column read, whatever the size
of the dataset. Local shards are read in place; shards behind a URL (s3://, gs://, any fsspec URL) are
copied once per node into the node cache, $RAYGPT_DATA_CACHE (default ~/.cache/raygpt/data), as
<cache>/<manifest id>/<shard path>: the first worker of a node to need a shard downloads it under a file
lock into a temp file, verifies size and sha256 against the manifest and renames it into place; the
others wait for the lock and find it there. Does not: decide the sample order (pipelines.train.data),
evict the node cache (it grows to the dataset's compressed size; delete it when a dataset is retired),
or talk to Ray.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import ConfigError
from pipelines.data.manifest import shard_paths
from pipelines.runtime import fs_and_path, is_local, sha256_json

CHUNK_ROWS = 1024  # rows per chunk (the unit of reading and of the window shuffle): part of the sample order
CACHE_CHUNKS = 16  # decoded chunks a ShardRows keeps (two windows of pipelines.train.data.WINDOW_CHUNKS)
CACHE_ENV = "RAYGPT_DATA_CACHE"
COLUMN_DTYPES = {"input_ids": np.int64, "doc_ids": np.int32, "loss_mask": np.int8}


class DataError(ConfigError):
    """The dataset cannot be used with this model/config (printed as a one-line CLI error)."""


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and message, whitespace collapsed."""
    return " ".join(f"{type(e).__name__}: {e}".split())


# ---- the node cache of shards behind URLs ------------------------------------------------------------


def cache_dir(manifest: dict[str, Any]) -> Path:
    """This node's cache directory of one dataset: $RAYGPT_DATA_CACHE (default ~/.cache/raygpt/data)/<id>."""
    base = Path(os.environ.get(CACHE_ENV) or "~/.cache/raygpt/data").expanduser()
    return base / str(manifest.get("id") or sha256_json(manifest.get("splits")))


def cached_copy(url: str, dest: Path, *, size: int | None, sha256: str | None) -> Path:
    """`dest`, a verified copy of `url`, downloaded at most once per node: the workers of a node take a file
    lock, the first downloads to a temp file (hashing as it goes) and renames it into place, the others find
    it there. FileNotFoundError when `url` does not exist; DataError when it cannot be read or differs."""
    if dest.is_file() and (size is None or dest.stat().st_size == size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(dest.with_name(f".{dest.name}.lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if dest.is_file() and (size is None or dest.stat().st_size == size):
                return dest
            h, n = hashlib.sha256(), 0
            try:
                fs, p = fs_and_path(url)
                with fs.open(p, "rb") as src, open(tmp, "wb") as out:
                    for block in iter(lambda: src.read(8 << 20), b""):
                        h.update(block)
                        out.write(block)
                        n += len(block)
            except FileNotFoundError:
                raise
            except Exception as e:
                raise DataError(f"{url}: cannot copy it into the node cache {dest.parent} ({one_line(e)}); check "
                                f"the URL, the network and credentials, and the room on disk (or set {CACHE_ENV})"
                                ) from None
            if (size is not None and n != size) or (sha256 is not None and h.hexdigest() != sha256):
                want = (f"{size} bytes, " if size is not None else "") + f"sha256 {str(sha256)[:16]}..."
                raise DataError(f"{url}: {n} bytes, sha256 {h.hexdigest()[:16]}... but manifest.json expects {want}; "
                                f"the file changed after prep wrote the manifest: re-run `raygpt prep --overwrite`")
            os.replace(tmp, dest)
            return dest
        finally:
            tmp.unlink(missing_ok=True)
            fcntl.flock(lock, fcntl.LOCK_UN)



# ---- reading ---------------------------------------------------------------------------------------


def fixed_list(col, width: int, name: str, path: str) -> np.ndarray:
    """A list<int> column whose rows all have `width` items -> (N, width) numpy array."""
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros((0, width), dtype=np.int64)
    offsets = arr.offsets.to_numpy()
    lens = np.diff(offsets)
    if not (lens == width).all():
        bad = int(np.flatnonzero(lens != width)[0])
        raise DataError(f"{path}: column {name} row {bad} has {lens[bad]} tokens, expected block_size+1 = {width} "
                        f"(manifest.json); the shard and the manifest come from different prep runs: re-run "
                        f"`raygpt prep --overwrite`")
    values = arr.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    return values.reshape(-1, width)


def check_vocab(ids: np.ndarray, vocab: int, where: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise DataError(f"{where}: token ids span [{ids.min()}, {ids.max()}], outside the vocabulary [0, {vocab}) "
                        f"of manifest.json; the shard and the manifest come from different prep runs: re-run "
                        f"`raygpt prep --overwrite`")



class _Column:
    """`rows.input_ids[ix]`, `rows.loss_mask[ix, 1:]` on streamed rows: reads just those rows."""

    def __init__(self, rows: ShardRows, name: str):
        self.rows, self.name = rows, name
        self.shape = (len(rows), rows.width)
        self.dtype = np.dtype(COLUMN_DTYPES[name])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        ix = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
        out = self.rows.take(ix.reshape(-1), (self.name,))[self.name].reshape(*ix.shape, self.shape[1])
        return out[(Ellipsis, *rest)] if rest else out


class ShardRows:
    """A split's rows, read from its shards on demand (see the module docstring); never all in RAM."""

    def __init__(self, manifest: dict[str, Any], split: str, *, capacity: int = CACHE_CHUNKS):
        self.manifest, self.split = manifest, split
        self.urls = shard_paths(manifest, split)
        self.shards = manifest["splits"][split]["shards"]
        self.shard_rows = [int(s["rows"]) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)
        self.width, self.vocab = int(manifest["block_size"]) + 1, int(manifest["vocab_size"])
        self.sft = manifest.get("kind") == "sft"
        self.capacity = max(1, capacity)
        self._remote: bool | None = None
        self._lock = threading.Lock()
        self._chunks: OrderedDict = OrderedDict()  # (shard, chunk) -> {column: array}; LRU
        self._inflight: dict[tuple[int, int], Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._files: OrderedDict = OrderedDict()  # shard -> open ParquetFile (reader thread only)
        self.input_ids = _Column(self, "input_ids")
        self.doc_ids = _Column(self, "doc_ids")  # zeros (one document a row) for shards without doc_ids
        self.loss_mask = _Column(self, "loss_mask") if self.sft else None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def layout(self) -> list[int]:
        return list(self.shard_rows)

    def __getstate__(self):
        raise TypeError("ShardRows holds a reader thread and open files; build one per process with split_rows()")

    def local_path(self, shard: int) -> str:
        """Where shard `shard` is read: in place, or this node's cached copy of a shard behind a URL."""
        url, info = self.urls[shard], self.shards[shard]
        if self._remote is None:
            self._remote = not is_local(fs_and_path(url)[0])
        if not self._remote:
            return url
        try:
            return str(cached_copy(url, cache_dir(self.manifest) / info["path"], size=int(info["bytes"]),
                                   sha256=info.get("sha256")))
        except FileNotFoundError:
            raise DataError(f"{url}: listed in manifest.json but not found; the dataset changed after prep: re-run "
                            f"`raygpt prep --overwrite`") from None

    def _locate(self, ix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(ix) and (ix.min() < 0 or ix.max() >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)})")
        shard = np.searchsorted(self.offsets, ix, side="right") - 1
        return shard, (ix - self.offsets[shard]) // CHUNK_ROWS

    def _columns(self, columns: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(c for c in columns if c != "loss_mask" or self.sft)

    def take(self, ix: np.ndarray, columns: tuple[str, ...]) -> dict[str, np.ndarray | None]:
        """The rows `ix` (global row ids) of the given columns, as (len(ix), T+1) arrays."""
        ix = np.asarray(ix, dtype=np.int64)
        cols = self._columns(columns)
        shard, chunk = self._locate(ix)
        keys = sorted({(int(s), int(c)) for s, c in zip(shard, chunk)})
        futures = {k: self._request(k, cols) for k in keys}
        out = {c: np.empty((len(ix), self.width), dtype=COLUMN_DTYPES[c]) for c in cols}
        for (s, c), fut in futures.items():
            got = fut.result()
            sel = (shard == s) & (chunk == c)
            local = ix[sel] - self.offsets[s] - c * CHUNK_ROWS
            for name in cols:
                out[name][sel] = got[name][local]
        return {c: out.get(c) for c in columns}

    def prefetch(self, ix: np.ndarray, columns: tuple[str, ...]) -> None:
        """Start reading the chunks of rows `ix` in the background (the LRU bounds what is kept)."""
        shard, chunk = self._locate(np.asarray(ix, dtype=np.int64))
        for k in sorted({(int(s), int(c)) for s, c in zip(shard, chunk)}):
            self._request(k, self._columns(columns))

    def _request(self, key: tuple[int, int], cols: tuple[str, ...]) -> Future:
        with self._lock:
            have = self._chunks.get(key)
            if have is not None and all(c in have for c in cols):
                self._chunks.move_to_end(key)
                done: Future = Future()
                done.set_result(have)
                return done
            fut = self._inflight.get(key)
            if fut is not None and all(c in fut.columns for c in cols):  # type: ignore[attr-defined]
                return fut
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raygpt-data")
            want = tuple(sorted(set(cols) | set(have or ())))
            fut = self._pool.submit(self._load, key, want)
            fut.columns = want  # type: ignore[attr-defined]
            self._inflight[key] = fut
            return fut

    def _load(self, key: tuple[int, int], cols: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Reader thread: decode chunk `key` (its row groups), check it, put it in the LRU."""
        try:
            got = self._read_chunk(*key, cols)
            with self._lock:
                self._chunks[key] = got
                self._chunks.move_to_end(key)
                while len(self._chunks) > self.capacity:
                    self._chunks.popitem(last=False)
            return got
        finally:
            with self._lock:
                fut = self._inflight.get(key)
                if fut is not None and fut.columns == cols:  # type: ignore[attr-defined] - not a newer, wider read
                    del self._inflight[key]

    def _parquet(self, shard: int):
        import pyarrow.parquet as pq

        pf = self._files.get(shard)
        if pf is None:
            pf = self._files[shard] = pq.ParquetFile(self.local_path(shard))
            if pf.metadata.num_rows != self.shard_rows[shard]:
                raise DataError(f"{self.urls[shard]}: holds {pf.metadata.num_rows} rows, manifest.json says "
                                f"{self.shard_rows[shard]}; re-run `raygpt prep --overwrite`")
            while len(self._files) > 4:
                self._files.popitem(last=False)
        self._files.move_to_end(shard)
        return pf

    def _read_chunk(self, shard: int, chunk: int, cols: tuple[str, ...]) -> dict[str, np.ndarray]:
        pf, url = self._parquet(shard), self.urls[shard]
        a = chunk * CHUNK_ROWS
        b = min(a + CHUNK_ROWS, self.shard_rows[shard])
        groups, first, pos = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if pos < b and pos + n > a:
                groups.append(g)
                first = pos if first is None else first
            pos += n
        names = pf.schema_arrow.names
        present = [c for c in cols if c in names]
        if "input_ids" not in names or (self.sft and "loss_mask" not in names):
            raise DataError(f"{url}: a {'sft' if self.sft else 'pretrain'} shard needs the columns input_ids"
                            f"{' and loss_mask' if self.sft else ''} (columns: {names}); re-run `raygpt prep`")
        table = pf.read_row_groups(groups, columns=present).slice(a - first, b - a)
        big = table.num_rows < sum(pf.metadata.row_group(g).num_rows for g in groups)
        out = {}
        for c in cols:
            if c not in names:  # doc_ids absent: every row is one document
                out[c] = np.zeros((b - a, self.width), dtype=np.int32)
                continue
            arr = fixed_list(table.column(c), self.width, c, f"{url} (rows {a}..{b - 1})")
            out[c] = arr.copy() if big else arr  # keep only the chunk of a larger row group
        if "input_ids" in out:
            check_vocab(out["input_ids"], self.vocab, f"{url} (rows {a}..{b - 1})")
        return out

