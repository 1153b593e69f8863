"""Packing and shard writing in the workers: tokenized batches are spilled per split, then one task per shard.

    spill = Spill(final_dir, layout)            # final segment, in the workers: batch -> spill file + summary
    summary = spill(batch, out, stats, name)    # one small JSON row for the driver (counts, never tokens)
    plan = SplitPlan(layout); plan.add(...)     # driver: per-batch token counts -> shard items
    shard = ShardTask(output, layout)(item)     # in the workers: spill files -> windows -> one shard file

Every batch of the final segment writes its alive documents, per split, as one flat token stream plus
document lengths (+ loss mask) to `<work>/final/t<order>-<k>.npz`, and hands the driver only counts.
The driver lays the splits out as if every batch had been fed in input order to one Packer (windows of
block_size+1 tokens, stride block_size; SFT pad mode: one row per example) and gives each shard task the
token range of its rows and the spill files covering it. A shard task holds one shard's tokens (about
write.shard_mb) plus one spill file, and writes exactly the bytes the sequential packer and ShardWriter
would. Does not: tokenize (pipelines.data.pack.Tokenize) or write the manifest (pipelines.data.pipeline).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipelines.data.ledger import hist
from pipelines.data.write import ShardWriter

SPLITS = ("train", "val")
MAX_PROBLEMS = 1000  # bad-input examples kept (per batch here, in total on the driver)


@dataclass
class Layout:
    """How token rows are shaped (the same on the driver and in every task)."""

    block_size: int
    with_mask: bool = False
    pad_mode: bool = False  # SFT pad: one example per row of block_size+1 tokens, no packing
    rows_per_shard: int = 1
    row_group_rows: int = 1024
    compression: str = "zstd"

    @property
    def stride(self) -> int:
        return self.block_size + 1 if self.pad_mode else self.block_size

    def windows(self, n_tokens: int) -> int:
        """Rows a stream of n_tokens gives (the packer's count; pad mode: whole rows)."""
        T1 = self.block_size + 1
        if self.pad_mode:
            return n_tokens // T1
        return (n_tokens - 1) // self.block_size if n_tokens >= T1 else 0

    def tail_tokens(self, n_tokens: int) -> int:
        """Tokens never used as a window input (Packer.tail_tokens)."""
        w = self.windows(n_tokens)
        return n_tokens - w * self.block_size - 1 if w else n_tokens


def spill_name(order: int, k: int) -> str:
    return f"t{order:06d}-{k:06d}.npz"


class _SplitAcc:
    """One batch's documents of one split: token pieces, lengths, masks and the counts."""

    def __init__(self):
        self.ids: list[np.ndarray] = []
        self.lens: list[np.ndarray] = []
        self.mask: list[np.ndarray] = []
        self.docs = self.tokens = self.loss_tokens = 0

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        def cat(xs: list[np.ndarray], dt: type) -> np.ndarray:
            return np.concatenate(xs).astype(dt, copy=False) if xs else np.zeros(0, dt)

        return cat(self.ids, np.int32), cat(self.lens, np.int64), cat(self.mask, np.int8)


class Spill:
    """Runs in the final segment's tasks: one tokenized batch -> its spill file + one summary (JSON)."""

    def __init__(self, work_dir: str, layout: Layout):
        self.work_dir, self.layout = work_dir, layout

    def __call__(self, batch: dict[str, list], out: dict[str, Any], stats: dict[str, Any], name: str) -> str:
        drops = out["drop"]
        srcs = batch["source"]
        final_drops: dict[str, int] = {}
        problems = []
        alive = []
        for i, d in enumerate(drops):
            if not d:
                alive.append(i)
                continue
            final_drops[d] = final_drops.get(d, 0) + 1
            if d.startswith("read:") and len(problems) < MAX_PROBLEMS:
                problems.append({"source": srcs[i], "reason": d})
        accs = {s: _SplitAcc() for s in SPLITS}
        if alive:
            vals, offs = out["_ids"]
            if "_cut" in out:
                self._by_position(accs, vals, offs, out["_cut"], alive)
            else:
                self._by_document(accs, vals, offs, out.get("_mask"), out["_val"], alive)
        arrays = {}
        for s, acc in accs.items():
            ids, lens, mask = acc.arrays()
            arrays[f"{s}_ids"], arrays[f"{s}_lens"] = ids, lens
            if self.layout.with_mask:
                arrays[f"{s}_mask"] = mask
        path, tmp = f"{self.work_dir}/{name}", f"{self.work_dir}/.{name}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        texts = batch["text"]
        return json.dumps({
            "file": name, "stats": stats, "drops": final_drops, "problems": problems, "alive": len(alive),
            "hist": hist([len(texts[i]) for i in alive]),
            "splits": {s: {"n": int(arrays[f"{s}_ids"].size), "docs": a.docs, "tokens": a.tokens,
                           "loss_tokens": a.loss_tokens, "n_docs": int(arrays[f"{s}_lens"].size)}
                       for s, a in accs.items()}})

    @staticmethod
    def _by_position(accs: dict[str, _SplitAcc], vals, offs, cuts, alive: list[int]) -> None:
        """split_by=position: each row's first cut tokens go to train, the rest to val."""
        for split, acc in accs.items():
            for i in alive:
                lo, hi = (offs[i], offs[i] + cuts[i]) if split == "train" else (offs[i] + cuts[i], offs[i + 1])
                if hi > lo:
                    acc.ids.append(vals[lo:hi])
                    acc.lens.append(np.array([hi - lo], np.int64))
                    acc.docs += 1
                    acc.tokens += int(hi - lo)

    def _by_document(self, accs: dict[str, _SplitAcc], vals, offs, mask, val, alive: list[int]) -> None:
        T1 = self.layout.block_size + 1
        for split, want in (("train", False), ("val", True)):
            acc = accs[split]
            rows = np.array([i for i in alive if bool(val[i]) == want], dtype=np.int64)
            if not rows.size:
                continue
            lens = offs[rows + 1] - offs[rows]
            idx = np.repeat(offs[rows] - np.concatenate(([0], np.cumsum(lens)[:-1])), lens) + np.arange(lens.sum())
            acc.ids.append(vals[idx])
            acc.lens.append(lens.astype(np.int64))
            acc.docs += int(rows.size)
            m = mask[idx] if mask is not None else None
            if m is not None:
                acc.mask.append(m)
                acc.loss_tokens += int(m.sum(dtype=np.int64))
            if self.layout.pad_mode:  # padding is what follows the last completion token (mask 1)
                m2 = m.reshape(rows.size, T1)
                acc.tokens += int((T1 - np.argmax(m2[:, ::-1] == 1, axis=1)).sum())
            else:
                acc.tokens += int(lens.sum())


# ----------------------------------------------------------------------------------------------- driver

class SplitPlan:
    """Driver side, per split: each spill file's place in the split's token stream (a few ints per batch)."""

    def __init__(self, split: str, layout: Layout):
        self.split, self.layout = split, layout
        self.files: list[tuple[str, int, int]] = []  # (spill file, first token, first doc)
        self.n_tokens = self.n_docs = 0

    def add(self, name: str, n: int, n_docs: int) -> None:
        if n:
            self.files.append((name, self.n_tokens, self.n_docs))
        self.n_tokens += n
        self.n_docs += n_docs

    def items(self, work_dir: str) -> list[dict[str, Any]]:
        """One item per shard: its rows, its token range and the spill files that cover it."""
        lay = self.layout
        W = lay.windows(self.n_tokens)
        rps, T1 = lay.rows_per_shard, lay.block_size + 1
        starts = np.array([f[1] for f in self.files] + [self.n_tokens], np.int64)
        out = []
        for s, w0 in enumerate(range(0, W, rps)):
            w1 = min(W, w0 + rps)
            lo, hi = w0 * lay.stride, (w1 - 1) * lay.stride + T1
            a = int(np.searchsorted(starts, lo, side="right")) - 1
            b = int(np.searchsorted(starts, hi, side="left"))
            out.append({"split": self.split, "index": s, "rows": w1 - w0, "lo": lo, "hi": hi, "dir": work_dir,
                        "files": [list(f) for f in self.files[max(a, 0):b]]})
        return out


class ShardTask:
    """Runs in the workers: one shard item -> its Parquet file, written as the sequential writer would."""

    def __init__(self, output: str, layout: Layout):
        self.output, self.layout = output, layout

    def __getstate__(self):
        return {"output": self.output, "layout": asdict(self.layout)}

    def __setstate__(self, st):
        self.output, self.layout = st["output"], Layout(**st["layout"])

    def __call__(self, item: dict[str, Any]) -> dict[str, str]:
        lay = self.layout
        ids, doc, mask = _gather(item, lay.with_mask)
        T1 = lay.block_size + 1
        w = ShardWriter(self.output, item["split"], lay.block_size, lay.rows_per_shard, lay.row_group_rows,
                        lay.compression, lay.with_mask, first_shard=item["index"])
        try:
            for c0 in range(0, item["rows"], lay.row_group_rows):
                c1 = min(item["rows"], c0 + lay.row_group_rows)
                idx = np.arange(c0, c1)[:, None] * lay.stride + np.arange(T1)[None, :]  # (w, T+1)
                win = ids[idx]
                m = mask[idx] if lay.with_mask else None
                if lay.pad_mode:  # doc_ids 1 on the padding after the last completion token
                    last = T1 - 1 - np.argmax(m[:, ::-1] == 1, axis=1)
                    d = (np.arange(T1)[None, :] > last[:, None]).astype(np.int32)
                else:
                    d = doc[idx]
                    d = (d - d[:, :1]).astype(np.int32)
                w.add(win, d, m)
            shards = w.close()
        except BaseException:
            w.abort()
            raise
        return {"split": item["split"], "shard": json.dumps(shards[0])}


def _gather(item: dict[str, Any], with_mask: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The shard's token range [lo, hi) from its spill files: ids, the global document of every token
    (zero-length documents keep their number, as the packer's np.repeat does), mask."""
    lo, hi, split = item["lo"], item["hi"], item["split"]
    ids, doc, mask = [], [], []
    for name, t0, d0 in item["files"]:
        with np.load(f"{item['dir']}/{name}") as z:
            fid, lens = z[f"{split}_ids"], z[f"{split}_lens"]
            fm = z[f"{split}_mask"] if with_mask else None
        a, b = max(lo, t0) - t0, min(hi, t0 + fid.size) - t0
        starts = np.concatenate(([0], np.cumsum(lens)[:-1])) if lens.size else np.zeros(0, np.int64)
        ids.append(fid[a:b])
        doc.append(d0 + np.searchsorted(starts, np.arange(a, b), side="right") - 1)
        if with_mask:
            mask.append(fm[a:b])
    out_ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    if out_ids.size != hi - lo:
        raise RuntimeError(f"shard {split}/{item['index']}: spill files hold {out_ids.size} of its {hi - lo} tokens")
    return out_ids, np.concatenate(doc), (np.concatenate(mask) if with_mask else None)
