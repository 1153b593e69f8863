"""Token shards: deterministic Parquet files train/part-00000.parquet, ... with page checksums on.

    w = ShardWriter("runs/data/x", "train", block_size=256, rows_per_shard=4096, row_group_rows=1024)
    w.add(ids, doc_ids, mask)      # (W, block_size+1) arrays, in order
    shards = w.close()             # [{"path", "rows", "bytes", "sha256"}]

Columns: input_ids list<int32> and doc_ids list<int32> (both block_size+1 long), plus loss_mask
list<int8> for SFT. Row groups hold exactly row_group_rows rows and shards exactly rows_per_shard
rows (except the last), so the same rows always give the same bytes (no timestamps are written; the
pyarrow version is part of the file, recorded in the manifest's code_version). Does not: pack, or
write the manifest (pipelines.data.manifest.write_manifest, called last by the pipeline).
"""

from __future__ import annotations

import hashlib
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MB = 1 << 20


def rows_per_shard(shard_mb: float, block_size: int, with_mask: bool) -> int:
    """Rows per shard from the target (uncompressed) shard size: (block_size+1) * (4 + 4 [+ 1]) bytes a row."""
    row_bytes = (block_size + 1) * (9 if with_mask else 8)
    return max(1, int(shard_mb * MB) // row_bytes)


def token_schema(with_mask: bool) -> pa.Schema:
    fields = [pa.field("input_ids", pa.list_(pa.int32())), pa.field("doc_ids", pa.list_(pa.int32()))]
    if with_mask:
        fields.append(pa.field("loss_mask", pa.list_(pa.int8())))
    return pa.schema(fields)


def _list_col(a: np.ndarray, typ: pa.DataType) -> pa.ListArray:
    W, T1 = a.shape
    offsets = pa.array(np.arange(0, W * T1 + 1, T1, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(a.reshape(-1), type=typ))


class _HashingFile:
    """File wrapper that hashes and counts what is written (no read-back for the sha256)."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0
        self.closed = False

    def write(self, b) -> int:
        mv = memoryview(b)
        self.h.update(mv)
        self.n += mv.nbytes
        self.f.write(mv)
        return mv.nbytes

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        if not self.closed:
            self.f.close()
            self.closed = True


class ShardWriter:
    def __init__(self, root: str, split: str, block_size: int, rows_per_shard: int, row_group_rows: int = 1024,
                 compression: str = "zstd", with_mask: bool = False, first_shard: int = 0):
        self.first_shard = first_shard  # number of the first shard this writer writes (one task per shard)
        self.root, self.split = root.rstrip("/"), split
        self.T1 = block_size + 1
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = min(row_group_rows, rows_per_shard)
        self.compression = None if compression == "none" else compression
        self.with_mask = with_mask
        self.schema = token_schema(with_mask)
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)
        self.shards: list[dict[str, Any]] = []
        self._buf: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._buf_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._file: _HashingFile | None = None
        self._shard_rows = 0
        self.rows = 0

    # --------------------------------------------------------------------------------------------
    def add(self, ids: np.ndarray, doc_ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        if ids.shape[0] == 0:
            return
        assert ids.shape[1] == self.T1 and doc_ids.shape == ids.shape, (ids.shape, doc_ids.shape, self.T1)
        self._buf.append((ids, doc_ids, mask))
        self._buf_rows += ids.shape[0]
        while self._buf_rows >= self._next_group_rows():
            self._write_group(self._next_group_rows())

    def _next_group_rows(self) -> int:
        # a row group never crosses a shard boundary
        return min(self.row_group_rows, self.rows_per_shard - self._shard_rows)

    def _take(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        ids = np.concatenate([b[0] for b in self._buf])
        doc = np.concatenate([b[1] for b in self._buf])
        mask = np.concatenate([b[2] for b in self._buf]) if self.with_mask else None
        rest = ids.shape[0] - n
        self._buf = [(ids[n:], doc[n:], mask[n:] if mask is not None else None)] if rest else []
        self._buf_rows = rest
        return ids[:n], doc[:n], (mask[:n] if mask is not None else None)

    def _write_group(self, n: int) -> None:
        ids, doc, mask = self._take(n)
        cols = [_list_col(ids, pa.int32()), _list_col(doc, pa.int32())]
        if self.with_mask:
            cols.append(_list_col(mask.astype(np.int8, copy=False), pa.int8()))
        table = pa.Table.from_arrays(cols, schema=self.schema)
        if self._writer is None:
            self._open()
        self._writer.write_table(table, row_group_size=n)
        self._shard_rows += n
        self.rows += n
        if self._shard_rows >= self.rows_per_shard:
            self._close_shard()

    def _rel(self, k: int) -> str:
        return f"{self.split}/part-{k:05d}.parquet"

    def _open(self) -> None:
        rel = self._rel(self.first_shard + len(self.shards))
        path = f"{self._root_path}/{rel}"
        self.fs.makedirs(f"{self._root_path}/{self.split}", exist_ok=True)
        self._file = _HashingFile(self.fs.open(path, "wb"))
        self._writer = pq.ParquetWriter(
            self._file, self.schema, compression=self.compression, write_page_checksum=True,
            use_dictionary=False, write_statistics=False)
        self._shard_rows = 0

    def _close_shard(self) -> None:
        assert self._writer is not None and self._file is not None
        self._writer.close()
        self._file.close()
        self.shards.append({"path": self._rel(self.first_shard + len(self.shards)), "rows": self._shard_rows,
                            "bytes": self._file.n, "sha256": self._file.h.hexdigest()})
        self._writer, self._file, self._shard_rows = None, None, 0

    def close(self) -> list[dict[str, Any]]:
        while self._buf_rows:
            self._write_group(min(self._buf_rows, self._next_group_rows()))
        if self._writer is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
            if self._file is not None:
                self._file.close()
        except Exception:
            pass
