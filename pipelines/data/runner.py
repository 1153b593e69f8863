"""The worker side of the prep: one Ray Data task runs one read task or work file through a segment's steps.

    runner = SegmentRunner(steps, "final", tokenize=tok_step, inputs=..., read=...)
    for table in run_udf(items, runner, "final").iter_batches(batch_size=None, batch_format="pyarrow"): ...

A segment's steps are fused in-process over batches of documents; every batch's per-step counts
(rows in/out, drops by reason, seconds, chars) ride along its output as a JSON `_stats` cell. Modes:
"work" writes the batch to a dedup work file and its shuffle key rows to a key file
(pipelines.data.dedup_shuffle) and yields the key file's name, "final" tokenizes, spills
the tokens per split (pipelines.data.shards.Spill) and yields one summary row (counts) for the driver's
sink, "text" yields alive texts for the tokenizer.
Dropped rows keep only their tombstone (text emptied) so every drop is counted at the end.
Does not: take dedup decisions (pipelines.data.dedup), pack or write shards (pipelines.data.shards).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipelines.data.dedup import key_rows
from pipelines.data.dedup_shuffle import key_file_name, shuffle_dir, work_file_id, work_file_name, write_key_file
from pipelines.data.ledger import HIST_EDGES, count_drop, hist, new_entry
from pipelines.data.plan import Barrier
from pipelines.data.read import read_task
from pipelines.data.shards import spill_name

STRING_COLS = ("text", "drop", "doc_id", "source")


class SegmentRunner:
    """Runs in Ray Data tasks: one item (read task or work file) -> batches through this segment's steps.

    mode: "work"  -> write <work_dir>/w<order>-<k>.parquet and its key file per batch, yield the key file's name
          "final" -> tokenize, spill the tokens (spill: shards.Spill), yield one summary row per batch
          "text"  -> yield alive texts (tokenizer training sample)
    """

    def __init__(self, steps: list[Any], mode: str, *, inputs=None, read=None, fields=(), want_raw=False,
                 render=None, tokenize=None, work_dir: str = "", barrier: Barrier | None = None,
                 partitions: int = 1, spill=None):
        self.steps, self.mode = steps, mode
        self.inputs, self.read, self.fields, self.want_raw, self.render = inputs, read, list(fields), want_raw, render
        self.tokenize, self.work_dir = tokenize, work_dir
        self.barrier, self.partitions = barrier, partitions
        self.spill = spill

    # -- sources --------------------------------------------------------------------------------------
    def _source(self, item: dict[str, Any]) -> Iterator[dict[str, list]]:
        if "file" in item:  # a work file from the previous segment
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(item["file"])
            cols = [c for c in pf.schema_arrow.names if c not in ("_xh", "_sig")]
            for rb in pf.iter_batches(batch_size=self.read.batch_rows, columns=cols):
                yield rb.to_pydict()
        else:
            yield from read_task(item, self.inputs, self.read, self.fields, self.want_raw, self.render)

    # -- one batch through the steps -------------------------------------------------------------------
    @staticmethod
    def _count_read(batch: dict[str, list], stats: dict[str, Any]) -> None:
        e = stats["steps"].setdefault("read", new_entry())
        drops = batch["drop"]
        alive = 0
        for d in drops:
            if d:
                count_drop(e, d.split(":", 1)[1] if d.startswith("read:") else d)
            else:
                alive += 1
        e["rows_in"] += len(drops)
        e["rows_out"] += alive
        lens = [len(t) if not d else 0 for t, d in zip(batch["text"], drops)]
        raw = batch.get("raw")
        if raw is not None:  # undecoded: count bytes
            lens = [len(r) if (r is not None and not d) else lens[k] for k, (r, d) in enumerate(zip(raw, drops))]
        stats["hist_read"] = [a + b for a, b in zip(stats.get("hist_read", [0] * (len(HIST_EDGES) - 1)),
                                                    hist([x for x, d in zip(lens, drops) if not d]))]

    @staticmethod
    def _count_step(name: str, e: dict[str, Any], splits: bool, before: list[str], after: list[str],
                    alive_before: list[int]) -> None:
        e["rows_in"] += len(alive_before)
        e["splits"] = splits
        if splits:
            e["rows_out"] += sum(1 for d in after if not d)
            for d in after:
                if d and d.startswith(name + ":"):
                    count_drop(e, d.split(":", 1)[1])
            return
        out = 0
        for i in alive_before:
            d = after[i]
            if not d:
                out += 1
            else:
                count_drop(e, d.split(":", 1)[1] if d.startswith(name + ":") else d)
        e["rows_out"] += out
        for b, a in zip(before, after):
            if b and a != b:
                raise RuntimeError(f"step {name!r} changed an already dropped row ({b!r} -> {a!r})")

    def _run_steps(self, batch: dict[str, list], stats: dict[str, Any], from_read: bool) -> dict[str, list]:
        if from_read:
            self._count_read(batch, stats)
        for step in self.steps:
            name = getattr(step, "name", type(step).__name__)
            before = batch["drop"]
            n_before = len(before)
            alive_before = [i for i, d in enumerate(before) if not d]
            chars = sum(len(batch["text"][i]) for i in alive_before)
            t0 = time.perf_counter()
            batch = step(batch)
            dt = time.perf_counter() - t0
            after = batch["drop"]
            splits = bool(getattr(step, "splits_rows", False))
            if not splits and len(after) != n_before:
                raise RuntimeError(f"step {name!r} changed the number of rows ({n_before} -> {len(after)}) "
                                   f"without splits_rows = True")
            e = stats["steps"].setdefault(name, new_entry())
            e["seconds"] += dt
            e["chars_in"] += chars
            if name.startswith("_"):  # internal helper (dedup signatures): timed, not in the ledger
                continue
            self._count_step(name, e, splits, before, after, alive_before)
            # dropped rows keep only their tombstone: free their text now
            texts = batch["text"]
            if any(d and t for d, t in zip(after, texts)):
                batch = dict(batch)
                batch["text"] = ["" if d else t for d, t in zip(after, texts)]
        return batch

    # -- entry point -----------------------------------------------------------------------------------
    def __call__(self, items) -> Iterator[Any]:
        for raw_item in items["item"]:
            item = json.loads(raw_item)
            from_read = "file" not in item
            for step in self.steps:
                bind = getattr(step, "bind_item", None)
                if bind is not None:
                    bind(item)
            k = 0
            src = self._source(item)
            while True:
                t0 = time.perf_counter()
                batch = next(src, None)
                t_read = time.perf_counter() - t0
                if batch is None:
                    break
                stats: dict[str, Any] = {"steps": {}}
                read_chars = sum(map(len, batch["text"])) + sum(len(r) for r in batch.get("raw") or () if r)
                batch = self._run_steps(batch, stats, from_read)
                if from_read:
                    e = stats["steps"]["read"]
                    e["seconds"] += t_read
                    e["chars_in"] += read_chars
                if self.mode == "work":
                    yield self._write_work(batch, stats, item, k)
                elif self.mode == "final":
                    yield self._final(batch, stats, spill_name(item["order"], k))
                else:
                    yield self._texts(batch, stats)
                k += 1
            if k == 0 and self.mode == "work":
                yield _key_file_row("")

    @staticmethod
    def _texts(batch: dict[str, list], stats: dict[str, Any]):
        """Tokenizer sample: texts, plus tombstones and stats for the "no usable input" message."""
        import pyarrow as pa

        drops = batch["drop"]
        st = [""] * len(drops)
        if st:
            st[0] = json.dumps(stats)
        return pa.table({"text": pa.array(batch["text"], pa.string()),
                         "drop": pa.array(drops, pa.string()),
                         "source": pa.array([s if d else "" for s, d in zip(batch["source"], drops)], pa.string()),
                         "_stats": pa.array(st, pa.string())})

    def _write_work(self, batch: dict[str, list], stats: dict[str, Any], item: dict[str, Any], k: int):
        """Write the batch to the stage's work dir, then its dedup key rows to its key file (one row group per
        partition: pipelines.data.dedup_shuffle); return the key file's name (the barrier's only input)."""
        import pyarrow.parquet as pq

        bar = self.barrier
        keep_sig = bar.fuzzy is not None and bar.fuzzy.verify == "signature"
        table = batch_to_table(batch, drop_cols=("raw", "_xh") + (() if keep_sig else ("_sig",)))
        name = work_file_name(item["order"], k)
        path = f"{self.work_dir}/{name}"
        tmp = f"{self.work_dir}/.{name}.tmp"
        pq.write_table(table, tmp, compression="snappy")
        os.replace(tmp, path)
        keys = key_rows(batch["doc_id"], batch["drop"], batch.get("_xh") if bar.exact is not None else None,
                        batch.get("_sig"), bar.fuzzy, self.partitions, json.dumps(stats),
                        work_file_id(item["order"], k))
        key_dir = shuffle_dir(self.work_dir)
        os.makedirs(key_dir, exist_ok=True)
        return _key_file_row(write_key_file(keys, self.partitions, f"{key_dir}/{key_file_name(item['order'], k)}"))

    def _final(self, batch: dict[str, list], stats: dict[str, Any], name: str):
        import pyarrow as pa

        tok = self.tokenize
        alive_before = [i for i, d in enumerate(batch["drop"]) if not d]
        chars = sum(len(batch["text"][i]) for i in alive_before)
        t0 = time.perf_counter()
        out = tok(batch)
        dt = time.perf_counter() - t0
        drops = out["drop"]
        e = stats["steps"].setdefault(tok.name, new_entry())
        e["rows_in"] += len(alive_before)
        e["seconds"] += dt
        e["chars_in"] += chars
        for i in alive_before:
            if drops[i]:
                count_drop(e, drops[i].split(":", 1)[1])
            else:
                e["rows_out"] += 1
        return pa.table({"summary": pa.array([self.spill(batch, out, stats, name)], pa.string())})


def _key_file_row(path: str):
    import pyarrow as pa

    return pa.table({"key_file": pa.array([path], pa.string())})


def batch_to_table(batch: dict[str, Any], drop_cols: tuple[str, ...] = ()):
    import pyarrow as pa

    cols = {}
    for k, v in batch.items():
        if k in drop_cols:
            continue
        if k in STRING_COLS:
            cols[k] = pa.array(v, pa.string())
        elif k == "_xh":
            cols[k] = pa.array(v, pa.uint64())
        elif k == "_sig":
            sig = np.asarray(v, dtype=np.uint32)
            cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(sig.reshape(-1)), sig.shape[1])
        else:
            cols[k] = pa.array(v)
    return pa.table(cols)


# ----------------------------------------------------------------------------------------------- Ray Data

class DataContext:
    """Set the Ray Data context options this pipeline needs; restore them afterwards."""

    def __init__(self, progress: bool):
        self.progress = progress

    def __enter__(self):
        from ray.data import DataContext as _Ctx

        ctx = _Ctx.get_current()
        self.ctx = ctx
        self.saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
        ctx.execution_options.preserve_order = True  # deterministic row order -> deterministic shards
        ctx.enable_progress_bars = self.progress
        return ctx

    def __exit__(self, *exc):
        self.ctx.execution_options.preserve_order, self.ctx.enable_progress_bars = self.saved


def items_dataset(items: list[dict[str, Any]]):
    import ray.data

    # objects in an item (dedup_stage.FileLosers) travel as their small to_json() reference
    return ray.data.from_items([{"item": json.dumps(it, default=lambda o: o.to_json())} for it in items],
                               override_num_blocks=max(1, len(items)))


def run_udf(items: list[dict[str, Any]], runner: SegmentRunner, label: str):
    ds = items_dataset(items)

    def udf(batch):
        yield from runner(batch)

    udf.__name__ = label
    return ds.map_batches(udf, batch_size=1, batch_format="numpy", zero_copy_batch=True)


def run_items(items: list[dict[str, Any]], fn, label: str):
    """One Ray Data task per item: fn(item) -> a dict of strings, one output row per item (input order)."""
    import pyarrow as pa

    ds = items_dataset(items)

    def udf(batch):
        for raw in batch["item"]:
            res = fn(json.loads(raw))
            yield pa.table({k: pa.array([v], pa.string()) for k, v in res.items()})

    udf.__name__ = label
    return ds.map_batches(udf, batch_size=1, batch_format="numpy", zero_copy_batch=True)
