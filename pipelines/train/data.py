"""Token batches for training, read from a `raygpt prep` output (Parquet shards + manifest.json).

    ds = open_dataset("runs/data/shakespeare")                  # refuses a directory without manifest
    check_compatible(ds.manifest, model_config, tokenizer_id=None, sft=False)
    stream = TrainStream(ds.split_rows("train"), seed=1337, global_batch=24, micro_batch=12, world=2, rank=0)
    x, y, doc_ids = stream.micro_batch(step=0, micro=0)         # (B, T) each; y == -1 where no loss

Order: the global sample sequence is epoch-wise permutations of the train rows, each drawn from
numpy's generator seeded with (seed, epoch), so it depends on nothing but the seed. Optimizer step s
consumes samples [s*G, (s+1)*G) (G = global batch); micro batch m of rank r takes the slice
[(m*world + r)*B, +B). The data position is therefore just the step (samples_seen = s*G), which is
what the checkpoint records, and a 1-worker run with grad_accum=2 sees exactly the micro batches a
2-worker run sees. Rows are held in RAM per worker (int32; ~4 bytes/token). Does not: tokenize or
write data (pipelines.data does), or talk to Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.config import ConfigError


class DataError(ConfigError):
    """The dataset cannot be used with this model/config (printed as a one-line CLI error)."""


@dataclass
class SplitRows:
    input_ids: np.ndarray  # (N, T+1) int64
    doc_ids: np.ndarray | None  # (N, T+1) int32, or None when absent
    loss_mask: np.ndarray | None  # (N, T+1) int8 (sft), or None

    def __len__(self) -> int:
        return self.input_ids.shape[0]


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

    def split_rows(self, split: str) -> SplitRows:
        return read_split(self.manifest, split)

    def tokenizer_path(self) -> str:
        return f"{str(self.root).rstrip('/')}/tokenizer.json"


def open_dataset(path: str) -> Dataset:
    """Load and sanity-check a dataset's manifest (DataError with the reason when it is not usable)."""
    from pipelines.data.manifest import DatasetNotReadyError, load_manifest

    try:
        m = load_manifest(path)
    except DatasetNotReadyError as e:
        raise DataError(f"data={path!r}: {e}") from None
    for key in ("tokenizer_id", "vocab_size", "block_size", "splits"):
        if key not in m:
            raise DataError(f"data={path!r}: manifest.json has no {key!r}; re-run `raygpt prep` with this raygpt")
    if "train" not in m["splits"] or not m["splits"]["train"].get("shards"):
        raise DataError(f"data={path!r}: the dataset has no train shards (splits: {sorted(m['splits'])})")
    if m.get("kind", "pretrain") not in ("pretrain", "sft"):
        raise DataError(f"data={path!r}: unknown dataset kind {m.get('kind')!r} (expected pretrain or sft)")
    return Dataset(root=path, manifest=m)


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


def _fixed_list(col, width: int, name: str, path: str) -> np.ndarray:
    """A list<int> column whose rows all have `width` items -> (N, width) numpy array."""
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros((0, width), dtype=np.int64)
    offsets = arr.offsets.to_numpy()
    lens = np.diff(offsets)
    if not (lens == width).all():
        bad = int(np.flatnonzero(lens != width)[0])
        raise DataError(f"{path}: column {name} row {bad} has {lens[bad]} tokens, expected block_size+1 = {width}")
    values = arr.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    return values.reshape(-1, width)


def read_split(manifest: dict[str, Any], split: str) -> SplitRows:
    import pyarrow.parquet as pq

    from pipelines.data.manifest import shard_paths

    width = int(manifest["block_size"]) + 1
    ids, docs, masks = [], [], []
    want_mask = manifest.get("kind") == "sft"
    for path in shard_paths(manifest, split):
        t = pq.read_table(path)
        if "input_ids" not in t.column_names:
            raise DataError(f"{path}: no input_ids column (columns: {t.column_names})")
        ids.append(_fixed_list(t.column("input_ids"), width, "input_ids", path).astype(np.int64))
        if "doc_ids" in t.column_names:
            docs.append(_fixed_list(t.column("doc_ids"), width, "doc_ids", path).astype(np.int32))
        if want_mask:
            if "loss_mask" not in t.column_names:
                raise DataError(f"{path}: an sft dataset needs a loss_mask column (columns: {t.column_names})")
            masks.append(_fixed_list(t.column("loss_mask"), width, "loss_mask", path).astype(np.int8))
    input_ids = np.concatenate(ids) if ids else np.zeros((0, width), np.int64)
    doc_ids = np.concatenate(docs) if docs and len(docs) == len(ids) else None
    loss_mask = np.concatenate(masks) if masks else None
    vocab = int(manifest["vocab_size"])
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= vocab):
        raise DataError(f"dataset {manifest.get('root')!r} split {split}: token ids span "
                        f"[{input_ids.min()}, {input_ids.max()}], outside the vocabulary [0, {vocab})")
    return SplitRows(input_ids, doc_ids, loss_mask)


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


class TrainStream:
    """Deterministic, resumable micro batches for one rank (see the module docstring for the order)."""

    def __init__(self, rows: SplitRows, *, seed: int, micro_batch: int, grad_accum: int, world: int, rank: int,
                 doc_mask: bool = False):
        if len(rows) == 0:
            raise DataError("the train split is empty")
        self.rows, self.seed, self.B, self.accum = rows, seed, micro_batch, grad_accum
        self.world, self.rank, self.doc_mask = world, rank, doc_mask
        self.global_batch = micro_batch * grad_accum * world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        p = self._perms.get(epoch)
        if p is None:
            p = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._perms = {epoch: p, **{k: v for k, v in self._perms.items() if k == epoch - 1}}
        return p

    def indices(self, step: int, micro: int) -> np.ndarray:
        start = step * self.global_batch + (micro * self.world + self.rank) * self.B
        g = np.arange(start, start + self.B)  # global sample numbers
        n = len(self.rows)
        out = np.empty(self.B, dtype=np.int64)
        for ep in np.unique(g // n):
            sel = (g // n) == ep
            out[sel] = self._perm(int(ep))[g[sel] % n]
        return out

    def micro_batch(self, step: int, micro: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        ix = self.indices(step, micro)
        r = self.rows
        return make_targets(r.input_ids[ix], None if r.doc_ids is None else r.doc_ids[ix],
                            None if r.loss_mask is None else r.loss_mask[ix], self.doc_mask)

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / len(self.rows)


class EvalSet:
    """The fixed validation micro batches of one rank: the same rows at every evaluation."""

    def __init__(self, rows: SplitRows, *, seed: int, micro_batch: int, iters: int, world: int, rank: int,
                 doc_mask: bool = False):
        if len(rows) == 0:
            raise DataError("the val split is empty")
        need = micro_batch * iters * world
        order = np.random.default_rng([seed, 10_000_019]).permutation(len(rows))
        order = np.resize(order, need)  # repeats rows when the split is smaller than the evaluation
        mine = order.reshape(iters, world, micro_batch)[:, rank]  # (iters, B)
        self.batches = []
        for ix in mine:
            self.batches.append(make_targets(rows.input_ids[ix], None if rows.doc_ids is None else rows.doc_ids[ix],
                                             None if rows.loss_mask is None else rows.loss_mask[ix], doc_mask))
