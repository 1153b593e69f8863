"""Streamed training input (pipelines/train/data.py + shards.py) on datasets written by prep's own ShardWriter:
the streamed micro batches equal the in-RAM ones, the order (every row once an epoch, windows of chunks,
random access for exact resume, 1 worker x grad_accum 2 == 2 workers), the bounded chunk LRU, and the
one-line errors for a shard of another row width, a foreign tokenizer.json and an unreachable URL.

`write_tokens` (also used by test_train_stream_memory.py and test_train_stream_s3.py) writes a dataset
whose row r holds tokens that are a hash of (content id, position), so any row's expected tokens are known
without reading it back."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from gptcore.tokenizer import train_char
from pipelines.config import ConfigError
from pipelines.data.manifest import write_manifest
from pipelines.data.write import ShardWriter
from pipelines.train import shards as shards_mod
from pipelines.train.data import (
    CHUNK_ROWS,
    WINDOW_CHUNKS,
    EvalSet,
    SampleOrder,
    ShardRows,
    TrainStream,
    open_dataset,
    read_split,
)

ALPHABET = "".join(chr(65 + i) for i in range(60))


def tokenizer():
    return train_char([ALPHABET], special_tokens=("<|endoftext|>",))


def row_tokens(content: np.ndarray, width: int, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, doc_ids, loss_mask) of rows with the given content ids: hashes of (content, position)."""
    x = content.astype(np.uint64)[:, None] * np.uint64(width) + np.arange(width, dtype=np.uint64)[None]
    for mul in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        x ^= x >> np.uint64(33)
        x *= np.uint64(mul)
    x ^= x >> np.uint64(33)
    ids = (x % np.uint64(vocab)).astype(np.int32)
    cut = (content.astype(np.int64) * 7919 % width)[:, None]  # one document boundary per row
    docs = (np.arange(width)[None] >= cut).astype(np.int32)
    mask = ((x >> np.uint64(20)) % np.uint64(3) != 0).astype(np.int8)
    return ids, docs, mask


def write_tokens(out: Path, rows: int, *, block_size: int = 16, rows_per_shard: int = 3000,
                 row_group_rows: int = CHUNK_ROWS, kind: str = "pretrain", val_rows: int = 100,
                 content=None) -> Path:
    """A token dataset as `raygpt prep` writes it (ShardWriter, zstd, manifest last). content(global rows)
    -> content ids (default: the row number; val rows use 10**9 + row)."""
    out = Path(out)
    tok = tokenizer()
    width, sft = block_size + 1, kind == "sft"
    splits = {}
    for split, n in (("train", rows), ("val", val_rows)):
        if not n:
            continue
        w = ShardWriter(str(out), split, block_size, rows_per_shard, row_group_rows, with_mask=sft)
        for a in range(0, n, 4096):
            r = np.arange(a, min(n, a + 4096))
            c = (content(r) if content is not None else r) if split == "train" else 10**9 + r
            ids, docs, mask = row_tokens(c, width, tok.vocab_size)
            w.add(ids, docs, mask if sft else None)
        shards = w.close()
        splits[split] = {"rows": n, "tokens": n * width, "shards": shards}
    tok.save(out / "tokenizer.json")
    write_manifest(out, {"kind": kind, "tokenizer_id": tok.id, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                         "block_size": block_size, "splits": splits, "ledger": [], "config": {"test": True},
                         "code_version": "test", "created_at": "2026-01-01T00:00:00Z"})
    return out


def expected(content: np.ndarray, width: int = 17) -> np.ndarray:
    return row_tokens(content, width, tokenizer().vocab_size)[0]


def _same(a, b) -> bool:
    return all((x is None and y is None) or np.array_equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """9,000 rows in 4 shards (2,500 + 2,500 + 2,500 + 1,500): 11 chunks, so the windowed order."""
    return write_tokens(tmp_path_factory.mktemp("big") / "ds", 9000, rows_per_shard=2500)


def test_streamed_batches_equal_in_ram_batches_and_rows_are_the_written_ones(big):
    ds = open_dataset(str(big))
    streamed, ram = ds.split_rows("train"), read_split(ds.manifest, "train")
    assert isinstance(streamed, ShardRows) and len(streamed) == len(ram) == 9000
    assert ram.shard_rows == [2500, 2500, 2500, 1500]
    for doc_mask in (False, True):
        a = TrainStream(streamed, seed=5, micro_batch=16, grad_accum=2, world=2, rank=1, doc_mask=doc_mask)
        b = TrainStream(ram, seed=5, micro_batch=16, grad_accum=2, world=2, rank=1, doc_mask=doc_mask)
        for step in (0, 1, 2, 70, 140, 141, 142, 300):  # 64 rows a step: epoch 1 starts in step 140
            for m in range(2):
                assert _same(a.micro_batch(step, m), b.micro_batch(step, m)), (step, m)
                x, y, d = a.micro_batch(step, m)
                assert (d is not None) == doc_mask
                if not doc_mask:  # the rows the order names, with the tokens written there
                    assert np.array_equal(np.concatenate([x, y[:, -1:]], 1), expected(a.indices(step, m)))
    assert streamed.input_ids[[8999, 3]].tolist() == expected(np.array([8999, 3])).tolist()
    assert streamed.input_ids[5, 2:4].tolist() == expected(np.array([5]))[0, 2:4].tolist()


def test_order_every_row_once_an_epoch_in_windows_random_access_and_accumulation(big):
    rows = open_dataset(str(big)).split_rows("train")
    one = TrainStream(rows, seed=3, micro_batch=8, grad_accum=2, world=1, rank=0)
    two = [TrainStream(rows, seed=3, micro_batch=8, grad_accum=1, world=2, rank=r) for r in range(2)]
    starts = SampleOrder(rows.layout()).chunk_start
    epoch, touched = [], []
    for step in range(9000 // 16 + 1):
        for m in range(2):
            ix = one.indices(step, m)
            assert np.array_equal(ix, two[m].indices(step, 0))  # 1 worker x grad_accum 2 == 2 workers
            epoch.append(ix)
            touched.append(len(set(np.searchsorted(starts, ix, side="right"))))
    seen = np.concatenate(epoch)[:9000]
    assert sorted(seen.tolist()) == list(range(9000))  # every row exactly once per epoch
    assert max(touched) <= 2 * WINDOW_CHUNKS  # a micro batch reads from at most two windows' chunks
    assert not np.array_equal(seen[:200], np.arange(200))  # and it is shuffled
    fresh = TrainStream(rows, seed=3, micro_batch=8, grad_accum=2, world=1, rank=0)
    for s in (400, 17, 0, 600):  # random access: a resumed run continues where it stopped
        assert np.array_equal(fresh.indices(s, 1), one.indices(s, 1))
    other = TrainStream(rows, seed=4, micro_batch=8, grad_accum=2, world=1, rank=0)
    assert not np.array_equal(other.indices(0, 0), one.indices(0, 0))


def test_small_split_keeps_the_plain_permutation(tmp_path):
    """<= WINDOW_CHUNKS chunks: the order of raygpt before streaming (runs resumed across versions agree)."""
    d = write_tokens(tmp_path / "ds", 3000, rows_per_shard=1000)
    rows = open_dataset(str(d)).split_rows("train")
    s = TrainStream(rows, seed=9, micro_batch=10, grad_accum=1, world=1, rank=0)
    old = np.random.default_rng([9, 0]).permutation(3000)
    assert np.concatenate([s.indices(k, 0) for k in range(300)]).tolist() == old.tolist()


def test_chunk_lru_is_bounded_and_each_chunk_is_read_about_once_per_window(big, monkeypatch):
    rows = open_dataset(str(big)).split_rows("train")
    reads = []
    real = ShardRows._read_chunk
    monkeypatch.setattr(ShardRows, "_read_chunk", lambda self, s, c, cols: reads.append((s, c)) or real(self, s, c, cols))
    stream = TrainStream(rows, seed=1, micro_batch=8, grad_accum=1, world=2, rank=0)
    for step in range(9000 // 16):  # one epoch
        stream.micro_batch(step, 0)
        assert len(rows._chunks) <= rows.capacity
    rows._pool.shutdown(wait=True)
    assert len(rows._chunks) <= rows.capacity and len(reads) <= 11 + 2, reads  # 11 chunks, each read once


def test_unaligned_row_groups_and_sft_columns(tmp_path):
    d = write_tokens(tmp_path / "ds", 5000, rows_per_shard=2100, row_group_rows=300, kind="sft", val_rows=40)
    ds = open_dataset(str(d))
    streamed, ram = ds.split_rows("train"), read_split(ds.manifest, "train")
    assert streamed.loss_mask is not None and ram.loss_mask is not None
    for doc_mask in (False, True):
        a = TrainStream(streamed, seed=2, micro_batch=12, grad_accum=1, world=1, rank=0, doc_mask=doc_mask)
        b = TrainStream(ram, seed=2, micro_batch=12, grad_accum=1, world=1, rank=0, doc_mask=doc_mask)
        for step in range(0, 800, 37):
            assert _same(a.micro_batch(step, 0), b.micro_batch(step, 0)), step
    ix = np.array([4999, 0, 2100, 2099])
    assert np.array_equal(streamed.loss_mask[ix, 1:], ram.loss_mask[ix, 1:])
    ev = [EvalSet(r, seed=1, micro_batch=3, iters=5, world=2, rank=1, doc_mask=True)
          for r in (ds.split_rows("val"), read_split(ds.manifest, "val"))]
    assert all(_same(p, q) for p, q in zip(*(e.batches for e in ev)))  # 30 rows of 40, the same either way


def _swap_shard(ds_dir: Path, split: str, k: int, other_dir: Path) -> str:
    """Put other_dir's shard k into ds_dir, with a manifest that lists its real size and hash."""
    import shutil

    from pipelines.data.manifest import load_manifest

    m = load_manifest(ds_dir)
    o = load_manifest(other_dir)
    sh = o["splits"][split]["shards"][k]
    shutil.copy(other_dir / sh["path"], ds_dir / sh["path"])
    m["splits"][split]["shards"][k] = sh
    (ds_dir / "manifest.json").unlink()
    write_manifest(ds_dir, {k2: v for k2, v in m.items() if k2 not in ("root", "id", "format")})
    return str(ds_dir / sh["path"])


def test_shard_of_another_row_width_is_a_one_line_error_naming_the_file(tmp_path):
    other = write_tokens(tmp_path / "b12", 3000, block_size=12, rows_per_shard=1000)
    first = write_tokens(tmp_path / "first", 3000, rows_per_shard=1000)
    bad = _swap_shard(first, "train", 0, other)
    with pytest.raises(ConfigError) as e:
        open_dataset(str(first))  # the first shard is checked from its footer before any worker starts
    msg = str(e.value)
    assert "\n" not in msg and bad in msg and "block_size+1 = 17" in msg and "raygpt prep" in msg
    later = write_tokens(tmp_path / "later", 3000, rows_per_shard=1000)
    bad = _swap_shard(later, "train", 2, other)
    rows = open_dataset(str(later)).split_rows("train")
    with pytest.raises(ConfigError) as e:
        rows.take(np.arange(3000), ("input_ids",))  # later shards: when their first chunk is read
    msg = str(e.value)
    assert "\n" not in msg and bad in msg and "expected block_size+1 = 17" in msg and "raygpt prep" in msg


def test_tokenizer_json_of_another_tokenizer_is_refused(tmp_path):
    d = write_tokens(tmp_path / "ds", 100)
    train_char(["other characters"], special_tokens=("<|endoftext|>",)).save(d / "tokenizer.json")
    with pytest.raises(ConfigError) as e:
        open_dataset(str(d))
    msg = str(e.value)
    assert "\n" not in msg and str(d / "tokenizer.json") in msg and "raygpt prep" in msg


def test_unreachable_url_is_a_one_line_error(monkeypatch):
    import s3fs

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(ConfigError) as e:
            open_dataset("s3://nowhere/tokens")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    msg = str(e.value)
    assert "\n" not in msg and "s3://nowhere/tokens" in msg and "cannot read" in msg and "credentials" in msg


def test_cache_dir_is_per_manifest_and_configurable(big, monkeypatch, tmp_path):
    monkeypatch.setenv(shards_mod.CACHE_ENV, str(tmp_path / "c"))
    m = open_dataset(str(big)).manifest
    assert shards_mod.cache_dir(m) == tmp_path / "c" / m["id"]
