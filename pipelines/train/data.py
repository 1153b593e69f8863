"""Token batches for training, streamed from a `raygpt prep` output (Parquet shards + manifest.json).

    ds = open_dataset("runs/data/shakespeare")                  # or s3://bucket/data/x (any fsspec URL)
    check_compatible(ds.manifest, model_config, tokenizer_id=None, sft=False)
    stream = TrainStream(ds.split_rows("train"), seed=1337, micro_batch=12, grad_accum=1, world=2, rank=0)
    x, y, doc_ids = stream.micro_batch(step=0, micro=0)         # (B, T) each; y == -1 where no loss

Order: the global sample sequence is epoch-wise permutations of the train rows drawn from numpy's
generator seeded with (seed, epoch), so it depends on nothing but the seed and the shard layout of
the manifest. The rows are cut into chunks of CHUNK_ROWS (per shard, prep's row group size); a split
of at most WINDOW_CHUNKS chunks is permuted as a whole, as before streaming existed. A larger split
permutes its chunks, takes them WINDOW_CHUNKS at a time (a window) and permutes the rows of each
window (generator (seed, epoch, window)): every row once per epoch, and a micro batch touches at most
WINDOW_CHUNKS chunks. Optimizer step s consumes samples [s*G, (s+1)*G) (G = global batch); micro batch
m of rank r takes the slice [(m*world + r)*B, +B). The data position is therefore just the step, which
is what the checkpoint records, and a 1-worker run with grad_accum=2 sees exactly the micro batches a
2-worker run sees.

Reading: `Dataset.split_rows` streams (pipelines.train.shards.ShardRows): a rank reads only the chunks
its micro batches touch, into a bounded LRU, with a read-ahead of one micro batch, and shards behind a
URL are cached once per node. `read_split` loads a whole split into RAM (tests, benchmarks: 12 bytes a
token). Does not: tokenize or write data (pipelines.data does), or talk to Ray.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.data.manifest import DatasetNotReadyError, load_manifest, shard_paths
from pipelines.errors import UserError
from pipelines.runtime import fs_and_path, is_local, sha256_file
from pipelines.train.shards import (  # noqa: F401
    CACHE_ENV,
    CHUNK_ROWS,
    DataError,
    ShardRows,
    cache_dir,
    cached_copy,
    check_vocab,
    fixed_list,
    one_line,
)

WINDOW_CHUNKS = 8  # chunks whose rows are permuted together: part of the sample order
EVAL_KEY = 10_000_019  # the eval rows' generator is seeded with (seed, EVAL_KEY)


# ---- the dataset --------------------------------------------------------------------------------------


@dataclass
class Dataset:
    root: str
    manifest: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "pretrain")

    @property
    def block_size(self) -> int:
        return int(self.manifest["block_size"])

    @property
    def is_remote(self) -> bool:
        return not is_local(fs_and_path(self.root)[0])

    def split_rows(self, split: str) -> ShardRows:
        """The split's rows, streamed from the shards (see the module docstring)."""
        return ShardRows(self.manifest, split)

    def tokenizer_path(self) -> str:
        """A local path of the dataset's tokenizer.json (a node-cache copy for a dataset behind a URL;
        a path that does not exist when the dataset has none)."""
        url = f"{str(self.root).rstrip('/')}/tokenizer.json"
        if not self.is_remote:
            return url
        dest = cache_dir(self.manifest) / "tokenizer.json"
        try:
            return str(cached_copy(url, dest, size=None, sha256=self.manifest["tokenizer_id"]))
        except FileNotFoundError:
            return str(dest)


def open_dataset(path: str) -> Dataset:
    """Load and sanity-check a dataset's manifest (DataError with the reason when it is not usable)."""
    try:
        m = load_manifest(path)
    except DatasetNotReadyError as e:
        raise DataError(f"data={path!r}: {e}") from None
    except UserError:
        raise
    except Exception as e:
        raise DataError(f"data={path!r}: cannot read the dataset's manifest.json ({one_line(e)}); check the URL, "
                        f"that this machine reaches it, and the credentials (s3: AWS_* variables or ~/.aws)") from None
    for key in ("tokenizer_id", "vocab_size", "block_size", "splits"):
        if key not in m:
            raise DataError(f"data={path!r}: manifest.json has no {key!r}; re-run `raygpt prep` with this raygpt")
    if "train" not in m["splits"] or not m["splits"]["train"].get("shards"):
        raise DataError(f"data={path!r}: the dataset has no train shards (splits: {sorted(m['splits'])})")
    if m.get("kind", "pretrain") not in ("pretrain", "sft"):
        raise DataError(f"data={path!r}: unknown dataset kind {m.get('kind')!r} (expected pretrain or sft)")
    ds = Dataset(root=path, manifest=m)
    _check_tokenizer_file(ds)
    for split in ("train", "val"):
        if m["splits"].get(split, {}).get("shards"):
            _check_first_shard(m, split)
    return ds


def _check_tokenizer_file(ds: Dataset) -> None:
    """tokenizer.json must be the tokenizer the manifest names (its id is the sha256 of the file)."""
    p = Path(ds.tokenizer_path())
    if p.is_file() and (got := sha256_file(p)) != ds.manifest["tokenizer_id"]:
        raise DataError(f"{ds.root.rstrip('/')}/tokenizer.json is tokenizer {got[:16]}... but manifest.json was "
                        f"written for tokenizer {ds.manifest['tokenizer_id'][:16]}...: the directory mixes two prep "
                        f"runs; re-run `raygpt prep --overwrite` into it")


def _check_first_shard(manifest: dict[str, Any], split: str) -> None:
    """The first shard's footer: its row count and row width (values / rows of input_ids) match the manifest.
    Read in place (a few KB from the end of the file, also for URLs); every chunk is checked again on read."""
    import pyarrow.parquet as pq

    url, info = shard_paths(manifest, split)[0], manifest["splits"][split]["shards"][0]
    width = int(manifest["block_size"]) + 1
    try:
        fs, p = fs_and_path(url)
        with fs.open(p, "rb") as f:
            md = pq.read_metadata(f)
    except Exception as e:
        raise DataError(f"{url}: cannot read the Parquet footer ({one_line(e)}); check that the file is reachable "
                        f"and re-run `raygpt prep` if it is damaged") from None
    if md.num_rows != int(info["rows"]):
        raise DataError(f"{url}: holds {md.num_rows} rows, manifest.json says {info['rows']}; the shard does not "
                        f"belong to this manifest: re-run `raygpt prep --overwrite`")
    names = [md.schema.column(i).path.split(".")[0] for i in range(md.num_columns)]
    if "input_ids" not in names:
        raise DataError(f"{url}: no input_ids column (columns: {names}); not a raygpt token shard: re-run `raygpt prep`")
    if md.num_row_groups and md.row_group(0).num_rows:
        rg = md.row_group(0)
        vals = rg.column(names.index("input_ids")).num_values
        if vals != rg.num_rows * width:
            raise DataError(f"{url}: its rows hold {vals / rg.num_rows:g} tokens, expected block_size+1 = "
                            f"{width} (manifest.json block_size={manifest['block_size']}); the shard and the manifest "
                            f"come from different prep runs: re-run `raygpt prep --overwrite`")


def check_compatible(manifest: dict[str, Any], model_cfg, *, tokenizer_id: str | None, sft: bool | None,
                     data_key: str = "data") -> bool:
    """Refuse a dataset the model cannot train on. Returns the effective `sft` flag."""
    where = f"{data_key}={manifest.get('root')!r}"
    if tokenizer_id is not None and manifest["tokenizer_id"] != tokenizer_id:
        raise DataError(
            f"{where}: tokenizer mismatch: the dataset was tokenized with tokenizer id "
            f"{manifest['tokenizer_id'][:16]}... but the initial checkpoint's tokenizer is {tokenizer_id[:16]}...; "
            f"re-run `raygpt prep` with the checkpoint's tokenizer.json, or train from scratch")
    if int(manifest["vocab_size"]) != model_cfg.vocab_size:
        raise DataError(
            f"{where}: vocab_size mismatch: the dataset's tokenizer has {manifest['vocab_size']} tokens but the "
            f"model has vocab_size={model_cfg.vocab_size}; set model.vocab_size={manifest['vocab_size']} (or "
            f"leave it unset to take the dataset's)")
    if int(manifest["block_size"]) > model_cfg.block_size:
        raise DataError(
            f"{where}: block_size mismatch: dataset rows hold {manifest['block_size']} tokens (+1 target) but the "
            f"model's block_size is {model_cfg.block_size}; set model.block_size={manifest['block_size']} or "
            f"re-run `raygpt prep` with block_size={model_cfg.block_size}")
    kind = manifest.get("kind", "pretrain")
    if sft is True and kind != "sft":
        raise DataError(f"{where}: sft=true needs a dataset of kind 'sft' (with a loss_mask column), this one "
                        f"is {kind!r}; prepare it with the sft template or set sft=false")
    if sft is False and kind == "sft":
        raise DataError(f"{where}: the dataset is of kind 'sft' but sft=false would train on the prompts too; "
                        f"set sft=true (or leave it unset)")
    return kind == "sft"


def has_val(manifest: dict[str, Any]) -> bool:
    """Whether the dataset has val rows (without them training runs, but reports no val loss)."""
    v = manifest.get("splits", {}).get("val") or {}
    return bool(v.get("shards")) and int(v.get("rows", 1) or 0) > 0


# ---- the sample order ---------------------------------------------------------------------------------


def chunk_table(shard_rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(first global row, rows) of every chunk: each shard cut into CHUNK_ROWS-row pieces, in shard order."""
    starts, lens, off = [], [], 0
    for r in shard_rows:
        a = np.arange(0, int(r), CHUNK_ROWS, dtype=np.int64)
        starts.append(off + a)
        lens.append(np.minimum(CHUNK_ROWS, int(r) - a))
        off += int(r)
    return (np.concatenate(starts) if starts else np.zeros(0, np.int64),
            np.concatenate(lens) if lens else np.zeros(0, np.int64))


class SampleOrder:
    """One permutation of a split's rows per key (seed, epoch): random access to any position."""

    def __init__(self, shard_rows: list[int]):
        self.chunk_start, self.chunk_len = chunk_table(shard_rows)
        self.n = int(self.chunk_len.sum())
        self._plans: OrderedDict = OrderedDict()  # small LRUs: per-key plans and per-window permutations
        self._windows: OrderedDict = OrderedDict()

    def _lru(self, cache: OrderedDict, key, make, keep: int = 4):
        v = cache.get(key)
        if v is None:
            v = cache[key] = make()
            while len(cache) > keep:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return v

    def _plan(self, key: tuple[int, ...]):
        """The key's chunk order and the windows' first positions / lengths."""
        def make():
            perm = np.random.default_rng(list(key)).permutation(len(self.chunk_len))
            lens = self.chunk_len[perm]
            wlen = np.add.reduceat(lens, np.arange(0, len(perm), WINDOW_CHUNKS))
            return perm, np.concatenate([[0], np.cumsum(wlen)[:-1]]), wlen
        return self._lru(self._plans, key, make)

    def _window(self, key: tuple[int, ...], w: int):
        """Window w of the key: (its rows' global ids in chunk order, the permutation of those rows)."""
        def make():
            perm, _, wlen = self._plan(key)
            chunks = perm[w * WINDOW_CHUNKS:(w + 1) * WINDOW_CHUNKS]
            rows = np.concatenate([np.arange(self.chunk_start[c], self.chunk_start[c] + self.chunk_len[c])
                                   for c in chunks])
            return rows, np.random.default_rng([*key, w]).permutation(int(wlen[w]))
        return self._lru(self._windows, (key, w), make)

    def rows_at(self, key: tuple[int, ...], pos: np.ndarray) -> np.ndarray:
        """Global row ids at positions `pos` (0 <= pos < n) of the key's permutation."""
        if len(self.chunk_len) <= WINDOW_CHUNKS:  # a small split: one plain permutation (the original order)
            return self._lru(self._plans, key, lambda: np.random.default_rng(list(key)).permutation(self.n))[pos]
        _, wstart, _ = self._plan(key)
        w = np.searchsorted(wstart, pos, side="right") - 1
        out = np.empty(len(pos), dtype=np.int64)
        for wi in np.unique(w):
            sel = w == wi
            rows, perm = self._window(key, int(wi))
            out[sel] = rows[perm[pos[sel] - wstart[wi]]]
        return out


# ---- rows: in RAM, or streamed ------------------------------------------------------------------------


@dataclass
class SplitRows:
    """A whole split in RAM (read_split; tests and benchmarks)."""
    input_ids: np.ndarray  # (N, T+1) int64
    doc_ids: np.ndarray | None  # (N, T+1) int32, or None when absent
    loss_mask: np.ndarray | None  # (N, T+1) int8 (sft), or None
    shard_rows: list[int] | None = None  # the shard layout (it shapes the order); None: one shard

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def layout(self) -> list[int]:
        return list(self.shard_rows) if self.shard_rows else [len(self)]

    def take(self, ix: np.ndarray, columns: tuple[str, ...]) -> dict[str, np.ndarray | None]:
        return {c: None if getattr(self, c) is None else getattr(self, c)[ix] for c in columns}

    def prefetch(self, ix: np.ndarray, columns: tuple[str, ...]) -> None:
        pass



def read_split(manifest: dict[str, Any], split: str) -> SplitRows:
    """A whole split in RAM: int64 input_ids + int32 doc_ids, 12 bytes a token (see ShardRows for training)."""
    import pyarrow.parquet as pq

    width = int(manifest["block_size"]) + 1
    ids, docs, masks = [], [], []
    want_mask = manifest.get("kind") == "sft"
    rows = ShardRows(manifest, split)
    for i, path in enumerate(shard_paths(manifest, split)):
        t = pq.read_table(rows.local_path(i))
        if "input_ids" not in t.column_names:
            raise DataError(f"{path}: no input_ids column (columns: {t.column_names})")
        ids.append(fixed_list(t.column("input_ids"), width, "input_ids", path).astype(np.int64))
        if "doc_ids" in t.column_names:
            docs.append(fixed_list(t.column("doc_ids"), width, "doc_ids", path).astype(np.int32))
        if want_mask:
            if "loss_mask" not in t.column_names:
                raise DataError(f"{path}: an sft dataset needs a loss_mask column (columns: {t.column_names})")
            masks.append(fixed_list(t.column("loss_mask"), width, "loss_mask", path).astype(np.int8))
    input_ids = np.concatenate(ids) if ids else np.zeros((0, width), np.int64)
    doc_ids = np.concatenate(docs) if docs and len(docs) == len(ids) else None
    loss_mask = np.concatenate(masks) if masks else None
    check_vocab(input_ids, int(manifest["vocab_size"]), f"dataset {manifest.get('root')!r} split {split}")
    return SplitRows(input_ids, doc_ids, loss_mask, shard_rows=rows.layout())


# ---- batches ------------------------------------------------------------------------------------------


def make_targets(input_ids: np.ndarray, doc_ids: np.ndarray | None, loss_mask: np.ndarray | None,
                 doc_mask: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Rows of block_size+1 tokens -> (x, y, doc_ids of x); y = -1 where a position gets no loss.

    SFT: the target at position t is token t+1, counted only when token t+1 is a completion token
    (loss_mask 1), so prompt tokens never produce loss or gradient. doc_mask: a target in another
    document than its input (the jump across a packing boundary) gets no loss either.
    """
    x = input_ids[:, :-1]  # (B, T)
    y = input_ids[:, 1:].copy()  # (B, T)
    if loss_mask is not None:
        y[loss_mask[:, 1:] == 0] = -1
    d = None
    if doc_mask and doc_ids is not None:
        d = doc_ids[:, :-1]
        y[doc_ids[:, 1:] != d] = -1
    return x, y, d


def _columns(doc_mask: bool) -> tuple[str, ...]:
    return ("input_ids", "loss_mask") + (("doc_ids",) if doc_mask else ())


def _batch(rows, ix: np.ndarray, doc_mask: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    got = rows.take(ix, _columns(doc_mask))
    ids = got["input_ids"].astype(np.int64, copy=False)
    return make_targets(ids, got.get("doc_ids"), got["loss_mask"], doc_mask)


class TrainStream:
    """Deterministic, resumable micro batches for one rank (see the module docstring for the order)."""

    def __init__(self, rows: SplitRows | ShardRows, *, seed: int, micro_batch: int, grad_accum: int, world: int,
                 rank: int, doc_mask: bool = False):
        if len(rows) == 0:
            raise DataError("the train split is empty")
        self.rows, self.seed, self.B, self.accum = rows, seed, micro_batch, grad_accum
        self.world, self.rank, self.doc_mask = world, rank, doc_mask
        self.global_batch = micro_batch * grad_accum * world
        self.order = SampleOrder(rows.layout())

    def indices(self, step: int, micro: int) -> np.ndarray:
        start = step * self.global_batch + (micro * self.world + self.rank) * self.B
        g = np.arange(start, start + self.B)  # global sample numbers
        n = len(self.rows)
        out = np.empty(self.B, dtype=np.int64)
        for ep in np.unique(g // n):
            sel = (g // n) == ep
            out[sel] = self.order.rows_at((self.seed, int(ep)), g[sel] % n)
        return out

    def micro_batch(self, step: int, micro: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        out = _batch(self.rows, self.indices(step, micro), self.doc_mask)
        nxt = (step, micro + 1) if micro + 1 < self.accum else (step + 1, 0)
        self.rows.prefetch(self.indices(*nxt), _columns(self.doc_mask))  # read-ahead: the next micro batch
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / len(self.rows)


class EvalSet:
    """The fixed validation micro batches of one rank: the same rows at every evaluation."""

    def __init__(self, rows: SplitRows | ShardRows, *, seed: int, micro_batch: int, iters: int, world: int,
                 rank: int, doc_mask: bool = False):
        if len(rows) == 0:
            raise DataError("the val split is empty")
        need = micro_batch * iters * world
        # repeats rows when the split is smaller than the evaluation
        order = SampleOrder(rows.layout()).rows_at((seed, EVAL_KEY), np.arange(need) % len(rows))
        mine = order.reshape(iters, world, micro_batch)[:, rank]  # (iters, B)
        self.batches = [_batch(rows, ix, doc_mask) for ix in mine]
