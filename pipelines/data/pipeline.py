"""The data-prep pipeline on Ray Data: read -> steps (as listed in the config) -> tokenize -> pack -> write.

    raygpt prep --config jobs/configs/prep-english-bpe.yaml
    python -c "from pipelines.data import run, PrepConfig; run(PrepConfig(output='out', inputs=[...]))"

Plan: the config's `steps` list is cut at the dedup steps (exact_dedup, fuzzy_dedup), which need the
whole dataset: each segment of steps runs as ONE streaming Ray Data operator (read tasks or work
files in, one task per file/range, steps fused in-process); before a dedup barrier the documents and
their hashes/signatures are written to <output>/_work, the decision is taken by Ray Data groupby
(pipelines.data.dedup), and the next segment streams the work files, applying it. The last segment
tokenizes in the workers; the driver consumes the ordered stream (preserve_order), packs windows per
split and writes shards (pipelines.data.write). Dropped rows travel to the end as tombstones (text
emptied) so every drop is counted and bad input is reported with file and line; each task also
reports per-step counts, which become the ledger (rows_in == rows_out + drops, checked, and checked
again against the tombstones). manifest.json is written last; a complete output is reused, an
unfinished one is replaced. Does not: train models or read token shards (pipelines.train).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipelines import console
from pipelines.data import manifest as mf
from pipelines.data.config import PrepConfig, PrepError, content_config
from pipelines.data.read import ReadTask, plan_reads, read_task

MB = 1 << 20
HIST_EDGES = [0] + [int(round(10 ** (k / 4))) for k in range(0, 37)]  # doc length bins (chars): 1 .. 1e9
OWN_FILES = ("train", "val", "_work", "tokenizer.json", "data_card.md", "doc_lengths.png", "drops.png",
             "timings.json")
STRING_COLS = ("text", "drop", "doc_id", "source")


# ----------------------------------------------------------------------------------------------- plan

@dataclass
class Barrier:
    exact: Any = None  # ExactDedupConfig
    fuzzy: Any = None  # FuzzyDedupConfig
    order: list[str] = field(default_factory=list)  # dedup step names in config order


@dataclass
class Segment:
    steps: list[Any]  # step objects (picklable)
    barrier: Barrier | None = None  # decision taken after this segment


def build_segments(cfg: PrepConfig) -> tuple[list[Segment], list[Any]]:
    """Config steps -> segments separated by dedup barriers; consecutive dedup steps share one barrier
    (fuzzy then runs among the exact survivors). Also returns the steps that need driver-side prep."""
    from pipelines.config import from_dict
    from pipelines.data.dedup import ExactDedupConfig, FuzzyDedupConfig
    from pipelines.data.decontam import DecontamConfig, Decontaminate

    segments: list[Segment] = [Segment([])]
    prep: list[Any] = []
    prev_dedup = False
    for spec in cfg.steps:
        if spec.name in ("exact_dedup", "fuzzy_dedup"):
            if prev_dedup:
                bar = segments[-2].barrier
            else:
                bar = segments[-1].barrier = Barrier()
                segments.append(Segment([]))
            if spec.name == "exact_dedup":
                bar.exact = from_dict(ExactDedupConfig, dict(spec.params))
            else:
                bar.fuzzy = from_dict(FuzzyDedupConfig, dict(spec.params))
            bar.order.append(spec.name)
            prev_dedup = True
            continue
        prev_dedup = False
        if spec.name == "decontaminate":
            step = Decontaminate(from_dict(DecontamConfig, dict(spec.params)))
            prep.append(step)
        else:
            from pipelines.data.steps import build_step

            step = build_step(spec.name, dict(spec.params))
        segments[-1].steps.append(step)
    return segments, prep


# ----------------------------------------------------------------------------------------------- stats

def _new_entry() -> dict[str, Any]:
    return {"rows_in": 0, "rows_out": 0, "drops": {}, "seconds": 0.0, "chars_in": 0, "splits": False}


def _merge_stats(total: dict[str, Any], part: dict[str, Any]) -> None:
    for name, e in part.get("steps", {}).items():
        t = total.setdefault("steps", {}).setdefault(name, _new_entry())
        t["rows_in"] += e["rows_in"]
        t["rows_out"] += e["rows_out"]
        t["seconds"] += e["seconds"]
        t["chars_in"] += e["chars_in"]
        t["splits"] = t["splits"] or e.get("splits", False)
        for r, n in e["drops"].items():
            t["drops"][r] = t["drops"].get(r, 0) + n
    if "hist_read" in part:
        h = total.setdefault("hist_read", [0] * (len(HIST_EDGES) - 1))
        for k, n in enumerate(part["hist_read"]):
            h[k] += n
    for k in ("read_seconds",):
        total[k] = total.get(k, 0.0) + part.get(k, 0.0)


def _hist(lengths: list[int] | np.ndarray) -> list[int]:
    if len(lengths) == 0:
        return [0] * (len(HIST_EDGES) - 1)
    return np.histogram(np.asarray(lengths), bins=HIST_EDGES)[0].astype(int).tolist()


# ----------------------------------------------------------------------------------------------- worker side

class SegmentRunner:
    """Runs in Ray Data tasks: one item (read task or work file) -> batches through this segment's steps.

    mode: "work"  -> write <work_dir>/w<order>-<k>.parquet per batch, yield one summary row per file
          "final" -> tokenize, yield token rows + tombstones for the driver
          "text"  -> yield alive texts (tokenizer training sample)
    """

    def __init__(self, steps: list[Any], mode: str, *, inputs=None, read=None, fields=(), want_raw=False,
                 render=None, tokenize=None, work_dir: str = "", barrier: Barrier | None = None,
                 partitions: int = 1):
        self.steps, self.mode = steps, mode
        self.inputs, self.read, self.fields, self.want_raw, self.render = inputs, read, list(fields), want_raw, render
        self.tokenize, self.work_dir = tokenize, work_dir
        self.barrier, self.partitions = barrier, partitions

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
    def _run_steps(self, batch: dict[str, list], stats: dict[str, Any], from_read: bool) -> dict[str, list]:
        if from_read:
            e = stats["steps"].setdefault("read", _new_entry())
            drops = batch["drop"]
            n = len(drops)
            alive = 0
            for d in drops:
                if d:
                    r = d.split(":", 1)[1] if d.startswith("read:") else d
                    e["drops"][r] = e["drops"].get(r, 0) + 1
                else:
                    alive += 1
            e["rows_in"] += n
            e["rows_out"] += alive
            lens = [len(t) if not d else 0 for t, d in zip(batch["text"], drops)]
            raw = batch.get("raw")
            if raw is not None:  # undecoded: count bytes
                lens = [len(r) if (r is not None and not d) else lens[k] for k, (r, d) in enumerate(zip(raw, drops))]
            stats["hist_read"] = [a + b for a, b in zip(stats.get("hist_read", [0] * (len(HIST_EDGES) - 1)),
                                                        _hist([x for x, d in zip(lens, drops) if not d]))]
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
            e = stats["steps"].setdefault(name, _new_entry())
            if name.startswith("_"):  # internal helper (dedup signatures): timed, not in the ledger
                e["seconds"] += dt
                e["chars_in"] += chars
                continue
            e["rows_in"] += len(alive_before)
            e["seconds"] += dt
            e["chars_in"] += chars
            e["splits"] = splits
            if splits:
                alive_after = [i for i, d in enumerate(after) if not d]
                e["rows_out"] += len(alive_after)
                for d in after:
                    if d and d.startswith(name + ":"):
                        r = d.split(":", 1)[1]
                        e["drops"][r] = e["drops"].get(r, 0) + 1
            else:
                out = 0
                for i in alive_before:
                    d = after[i]
                    if not d:
                        out += 1
                    else:
                        r = d.split(":", 1)[1] if d.startswith(name + ":") else d
                        e["drops"][r] = e["drops"].get(r, 0) + 1
                e["rows_out"] += out
                for i, (b, a) in enumerate(zip(before, after)):
                    if b and a != b:
                        raise RuntimeError(f"step {name!r} changed an already dropped row ({b!r} -> {a!r})")
            # dropped rows keep only their tombstone: free their text now
            texts = batch["text"]
            if any(d and t for d, t in zip(after, texts)):
                batch = dict(batch)
                batch["text"] = ["" if d else t for d, t in zip(after, texts)]
        return batch

    # -- entry point -----------------------------------------------------------------------------------
    def __call__(self, items) -> Iterator[Any]:
        import pyarrow as pa

        for raw_item in items["item"]:
            item = json.loads(raw_item)
            from_read = "file" not in item
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
                    yield self._final(batch, stats)
                else:  # tokenizer sample: texts, plus tombstones and stats for the "no usable input" message
                    drops = batch["drop"]
                    st = [""] * len(drops)
                    if st:
                        st[0] = json.dumps(stats)
                    yield pa.table({"text": pa.array(batch["text"], pa.string()),
                                    "drop": pa.array(drops, pa.string()),
                                    "source": pa.array([s if d else "" for s, d in zip(batch["source"], drops)],
                                                       pa.string()),
                                    "_stats": pa.array(st, pa.string())})
                k += 1
            if k == 0 and self.mode == "work":
                from pipelines.data.dedup import key_rows

                yield key_rows([], [], None, None, None, self.partitions, json.dumps({"steps": {}}))

    def _write_work(self, batch: dict[str, list], stats: dict[str, Any], item: dict[str, Any], k: int):
        """Write the batch to the stage's work dir; return its dedup key rows (the groupby input)."""
        import pyarrow.parquet as pq

        from pipelines.data.dedup import key_rows

        bar = self.barrier
        keep_sig = bar.fuzzy is not None and bar.fuzzy.verify == "signature"
        table = batch_to_table(batch, drop_cols=("raw", "_xh") + (() if keep_sig else ("_sig",)))
        name = f"w{item['order']:06d}-{k:06d}.parquet"
        path = f"{self.work_dir}/{name}"
        tmp = f"{self.work_dir}/.{name}.tmp"
        pq.write_table(table, tmp, compression="snappy")
        os.replace(tmp, path)
        return key_rows(batch["doc_id"], batch["drop"], batch.get("_xh") if bar.exact is not None else None,
                        batch.get("_sig"), bar.fuzzy, self.partitions, json.dumps(stats))

    def _final(self, batch: dict[str, list], stats: dict[str, Any]):
        import pyarrow as pa

        tok = self.tokenize
        name = tok.name
        drops0 = batch["drop"]
        alive_before = [i for i, d in enumerate(drops0) if not d]
        chars = sum(len(batch["text"][i]) for i in alive_before)
        t0 = time.perf_counter()
        out = tok(batch)
        dt = time.perf_counter() - t0
        drops = out["drop"]
        e = stats["steps"].setdefault(name, _new_entry())
        e["rows_in"] += len(alive_before)
        e["seconds"] += dt
        e["chars_in"] += chars
        for i in alive_before:
            if drops[i]:
                r = drops[i].split(":", 1)[1]
                e["drops"][r] = e["drops"].get(r, 0) + 1
            else:
                e["rows_out"] += 1
        vals, offsets = out["_ids"]
        n = len(drops)
        ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(vals, pa.int32()))
        cols = {
            "drop": pa.array(drops, pa.string()),
            "source": pa.array([s if d else "" for s, d in zip(batch["source"], drops)], pa.string()),
            "n_chars": pa.array([len(t) if not d else 0 for t, d in zip(batch["text"], drops)], pa.int64()),
            "ids": ids,
            "val": pa.array(out["_val"]),
        }
        if "_mask" in out:
            cols["mask"] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(out["_mask"], pa.int8()))
        st = [""] * n
        if n:
            st[0] = json.dumps(stats)
        cols["_stats"] = pa.array(st, pa.string())
        if n == 0:
            cols["_stats"] = pa.array([json.dumps(stats)], pa.string())
            for k2 in ("drop", "source"):
                cols[k2] = pa.array(["__meta__" if k2 == "drop" else ""], pa.string())
            cols["n_chars"] = pa.array([0], pa.int64())
            cols["ids"] = pa.ListArray.from_arrays(pa.array([0, 0], pa.int32()), pa.array([], pa.int32()))
            cols["val"] = pa.array([False])
            if "mask" in cols:
                cols["mask"] = pa.ListArray.from_arrays(pa.array([0, 0], pa.int32()), pa.array([], pa.int8()))
        return pa.table(cols)


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


# ----------------------------------------------------------------------------------------------- driver

def _ensure_ray(cfg: PrepConfig) -> None:
    from pipelines.runtime import ensure_ray

    ensure_ray(cfg.ray_address, num_cpus=cfg.num_cpus or None)


def _code_version() -> str:
    """The shared provenance string plus pyarrow's version (it decides the Parquet bytes)."""
    import pyarrow

    from pipelines.runtime import code_version

    return f"{code_version()} pyarrow {pyarrow.__version__}"


def _config_hash(content: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prepare_output(cfg: PrepConfig, content: dict[str, Any]) -> dict[str, Any] | None:
    """Reuse a complete output with the same config; refuse a different one; clear partial output."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(cfg.output)
    root = root.rstrip("/")
    man = f"{root}/{mf.MANIFEST}"
    if fs.exists(man):
        if not cfg.overwrite:
            try:
                m = mf.load_manifest(cfg.output)
            except mf.DatasetNotReadyError:
                m = None
            if m is not None and m.get("config_hash") == _config_hash(content):
                return m
            if m is not None:
                raise PrepError(
                    f"output {cfg.output!r} already holds a complete dataset made with a different config "
                    f"(config_hash {m.get('config_hash')} != {_config_hash(content)}); pass --overwrite to replace "
                    f"it or choose another output")
        fs.rm(man)  # from here on the directory is unfinished for every reader
    if fs.exists(root):
        for name in OWN_FILES:
            p = f"{root}/{name}"
            if fs.exists(p):
                fs.rm(p, recursive=True)
        for p in fs.ls(root, detail=False):
            if p.rsplit("/", 1)[-1].startswith(f".{mf.MANIFEST}.tmp"):
                fs.rm(p)
    fs.makedirs(root, exist_ok=True)
    return None


class _DataContext:
    """Set the Ray Data context options this pipeline needs; restore them afterwards."""

    def __init__(self, progress: bool):
        self.progress = progress

    def __enter__(self):
        from ray.data import DataContext

        ctx = DataContext.get_current()
        self.ctx = ctx
        self.saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
        ctx.execution_options.preserve_order = True  # deterministic row order -> deterministic shards
        ctx.enable_progress_bars = self.progress
        return ctx

    def __exit__(self, *exc):
        self.ctx.execution_options.preserve_order, self.ctx.enable_progress_bars = self.saved


def _items_dataset(items: list[dict[str, Any]]):
    import ray.data

    return ray.data.from_items([{"item": json.dumps(it)} for it in items], override_num_blocks=max(1, len(items)))


def _run_udf(items: list[dict[str, Any]], runner: SegmentRunner, label: str):
    ds = _items_dataset(items)

    def udf(batch):
        yield from runner(batch)

    udf.__name__ = label
    return ds.map_batches(udf, batch_size=1, batch_format="numpy", zero_copy_batch=True)


def _say(msg: str) -> None:
    console.get_logger("prep").info("%s", msg)


def run(cfg: PrepConfig) -> dict[str, Any]:
    """Run the whole prep; returns the manifest (with "root"). Raises PrepError for user-facing problems."""
    t_start = time.time()
    timings: dict[str, float] = {}
    content = content_config(cfg)
    chash = _config_hash(content)
    reused = _prepare_output(cfg, content)
    if reused is not None:
        _say(f"{cfg.output}: complete output with the same config found (id {reused.get('id')}); reused. "
             f"Pass --overwrite to rebuild it.")
        return reused
    tasks = plan_reads(cfg.inputs, cfg.read)
    segments, needs_prep = build_segments(cfg)
    t0 = time.time()
    _ensure_ray(cfg)
    timings["ray_init_s"] = time.time() - t0
    import fsspec

    fs, root = fsspec.core.url_to_fs(cfg.output)
    root = root.rstrip("/")
    wfs, wroot = _work_root(cfg, fs, root, chash)
    extra_info: dict[str, Any] = {}
    for st in needs_prep:
        extra_info[st.name] = st.prepare()

    fields = sorted({f for inp in cfg.inputs for f in inp.fields})
    want_raw = any(inp.encoding == "raw" for inp in cfg.inputs)
    render = (cfg.sft.prompt_template, cfg.sft.completion_template) if cfg.kind == "sft" else None
    common = dict(inputs=cfg.inputs, read=cfg.read, fields=fields, want_raw=want_raw, render=render)
    stats: dict[str, Any] = {"steps": {}}
    ledger_order: list[str] = ["read"]
    dedup_info: dict[str, Any] = {}

    with _DataContext(cfg.progress):
        items: list[dict[str, Any]] = [t.to_dict() for t in tasks]
        pre_steps: list[Any] = []  # ApplyLosers from the previous barrier
        partitions = _auto_partitions(tasks)
        for si, seg in enumerate(segments[:-1]):
            from pipelines.data.dedup import Signatures

            steps = pre_steps + seg.steps
            ledger_order += [s.name for s in steps]
            stage_dir = f"{wroot}/stage{si}"
            wfs.makedirs(stage_dir, exist_ok=True)
            runner = SegmentRunner(steps + [Signatures(seg.barrier.exact, seg.barrier.fuzzy)], "work",
                                   work_dir=stage_dir, barrier=seg.barrier, partitions=partitions, **common)
            t0 = time.time()
            pre_steps = _decide(seg.barrier, _run_udf(items, runner, f"segment{si}"), partitions, stage_dir,
                                stats, dedup_info)
            timings[f"segment{si}_dedup_s"] = time.time() - t0
            files = sorted(f"{stage_dir}/{p}" for p in os.listdir(stage_dir) if p.endswith(".parquet"))
            items = [{"file": f, "order": k} for k, f in enumerate(files)]
        final_steps = pre_steps + segments[-1].steps
        ledger_order += [s.name for s in final_steps]

        # tokenizer: load, or train on a deterministic sample (first sample_mb of cleaned docs, in order)
        t0 = time.time()
        tok = _tokenizer(cfg, items, final_steps, common)
        timings["tokenizer_s"] = time.time() - t0
        tok_path = f"{root}/tokenizer.json"
        with fs.open(tok_path, "wb") as f:
            f.write(tok.to_json_str().encode())

        import ray

        from pipelines.data.pack import Packer, Tokenize
        from pipelines.data.write import ShardWriter, rows_per_shard

        T = cfg.pack.block_size
        sft = cfg.kind == "sft"
        with_mask = sft
        tok_step = Tokenize(ray.put(tok.to_json_str()), cfg.kind, T, cfg.pack.val_fraction, cfg.pack.split_seed,
                            cfg.sft if sft else None)
        ledger_order.append("tokenize")
        runner = SegmentRunner(final_steps, "final", tokenize=tok_step, **common)
        rps = rows_per_shard(cfg.write.shard_mb, T, with_mask)
        writers = {s: ShardWriter(cfg.output, s, T, rps, cfg.write.row_group_rows, cfg.write.compression, with_mask)
                   for s in ("train", "val")}
        pad_mode = sft and cfg.sft.mode == "pad"
        packers = {s: Packer(T, with_mask) for s in ("train", "val")}
        split_docs = {"train": 0, "val": 0}
        split_tokens = {"train": 0, "val": 0}
        loss_tokens = {"train": 0, "val": 0}
        final_drops: dict[str, int] = {}
        problems: list[dict[str, str]] = []
        after_lengths: list[np.ndarray] = []
        alive_final = 0
        t0 = time.time()
        try:
            for b in _run_udf(items, runner, "final").iter_batches(batch_size=None, batch_format="pyarrow"):
                for s in b.column("_stats").to_pylist():
                    if s:
                        _merge_stats(stats, json.loads(s))
                drops = b.column("drop").to_pylist()
                srcs = b.column("source").to_pylist()
                alive_idx = []
                for i, d in enumerate(drops):
                    if not d:
                        alive_idx.append(i)
                    elif d != "__meta__":
                        final_drops[d] = final_drops.get(d, 0) + 1
                        if d.startswith("read:") and len(problems) < 1000:
                            problems.append({"source": srcs[i], "reason": d})
                if not alive_idx:
                    continue
                alive_final += len(alive_idx)
                nch = b.column("n_chars").to_numpy()
                after_lengths.append(nch[alive_idx])
                val = b.column("val").to_numpy(zero_copy_only=False)
                ids_col = b.column("ids").combine_chunks()
                mask_col = b.column("mask").combine_chunks() if with_mask else None
                for split, want in (("train", False), ("val", True)):
                    rows = np.array([i for i in alive_idx if bool(val[i]) == want], dtype=np.int64)
                    if rows.size == 0:
                        continue
                    sel = ids_col.take(rows)
                    flat = sel.flatten().to_numpy()
                    lens = np.diff(sel.offsets.to_numpy())
                    msk = mask_col.take(rows).flatten().to_numpy() if with_mask else None
                    split_docs[split] += int(rows.size)
                    if pad_mode:
                        W = rows.size
                        win = flat.reshape(W, T + 1)
                        m = msk.reshape(W, T + 1)
                        # rows come padded to T+1: padding is what follows the last completion token (mask 1)
                        last = (T + 1) - 1 - np.argmax(m[:, ::-1] == 1, axis=1)
                        doc = (np.arange(T + 1)[None, :] > last[:, None]).astype(np.int32)
                        split_tokens[split] += int((doc == 0).sum())
                        loss_tokens[split] += int(m.sum())
                        writers[split].add(win, doc, m)
                    else:
                        split_tokens[split] += int(flat.size)
                        if with_mask:
                            loss_tokens[split] += int(msk.sum())
                        res = packers[split].add(flat, lens, msk)
                        if res is not None:
                            writers[split].add(*res)
            shards = {s: w.close() for s, w in writers.items()}
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        timings["final_s"] = time.time() - t0

    ledger = _ledger(stats, ledger_order, final_drops, alive_final)
    if alive_final == 0:
        raise PrepError(_no_usable_input_message(ledger, problems))
    splits = {}
    for s in ("train", "val"):
        rows = sum(sh["rows"] for sh in shards[s])
        splits[s] = {"rows": rows, "docs": split_docs[s], "tokens": split_tokens[s], "shards": shards[s]}
        if not pad_mode:
            splits[s]["tail_tokens_dropped"] = packers[s].tail_tokens()
        if sft:
            splits[s]["loss_tokens"] = loss_tokens[s]
    if splits["train"]["rows"] == 0:
        raise PrepError(f"no training rows: {split_tokens['train']} train tokens are fewer than one window of "
                        f"block_size+1={T + 1}; lower pack.block_size or add input")
    hist_after = _hist(np.concatenate(after_lengths) if after_lengths else [])
    manifest = {
        "kind": cfg.kind,
        "name": cfg.name,
        "tokenizer_id": tok.id,
        "tokenizer_kind": tok.kind,
        "tokenizer_file": "tokenizer.json",
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "block_size": T,
        "window_stride": T,
        "columns": ["input_ids", "doc_ids"] + (["loss_mask"] if with_mask else []),
        "splits": splits,
        "ledger": ledger,
        "problems": {"count": sum(n for r, n in final_drops.items() if r.startswith("read:")),
                     "examples": problems[:200]},
        "dedup": dedup_info,
        "decontamination": extra_info.get("decontaminate", {}),
        "stats": {"hist_edges_chars": HIST_EDGES, "doc_chars_before": stats.get("hist_read", []),
                  "doc_chars_after": hist_after},
        "config": content,
        "config_hash": chash,
        "code_version": _code_version(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "timings_file": "timings.json",
    }
    if sft:
        manifest["sft"] = {"mode": cfg.sft.mode, "pad_id": tok.eos_id if tok.eos_id is not None else 0,
                           "loss_mask": "per input_ids position: 1 on completion tokens (incl. EOS), 0 on prompt "
                                        "and padding; targets are input_ids[1:], so weight them by loss_mask[1:]"}
    timings["total_s"] = time.time() - t_start
    step_times = {n: {"seconds": round(e["seconds"], 3), "chars_in": e["chars_in"],
                      "mb_per_s": round(e["chars_in"] / MB / e["seconds"], 2) if e["seconds"] > 0 else None}
                  for n, e in stats.get("steps", {}).items()}
    with fs.open(f"{root}/timings.json", "w") as f:
        json.dump({"timings": {k: round(v, 3) for k, v in timings.items()}, "steps": step_times}, f, indent=2,
                  sort_keys=True)
    if cfg.write.data_card:
        from pipelines.data.card import write_card

        write_card(cfg.output, manifest)
    try:
        wfs.rm(wroot, recursive=True)
    except FileNotFoundError:
        pass
    mf.write_manifest(cfg.output, manifest)  # LAST: the dataset is complete from this instant
    manifest = mf.load_manifest(cfg.output)
    _summary(manifest, step_times, timings)
    return manifest


def _work_root(cfg: PrepConfig, fs, root: str, chash: str):
    """Where the dedup stages write their intermediate files: <output>/_work for a local output, else
    work_dir (or a local temp dir). Must be a path all workers reach (local disk on one node, a shared
    file system on a cluster). Cleared at the start: leftovers of a killed run are never reused."""
    import tempfile

    import fsspec

    from pipelines.data.read import _is_local

    if cfg.work_dir:
        base = f"{cfg.work_dir.rstrip('/')}/raygpt-prep-{chash}"
    elif _is_local(fs):
        base = f"{root}/_work"
    else:
        base = f"{tempfile.gettempdir()}/raygpt-prep-{chash}"
    wfs, wroot = fsspec.core.url_to_fs(base)
    if not _is_local(wfs):
        raise PrepError(f"work_dir {cfg.work_dir!r}: must be a local or shared-filesystem path (dedup work files "
                        f"are written by the workers with local file I/O)")
    wroot = os.path.abspath(wroot)
    if wfs.exists(wroot):
        wfs.rm(wroot, recursive=True)
    return wfs, wroot


def _auto_partitions(tasks: list[ReadTask]) -> int:
    from pipelines.data.dedup import auto_partitions

    return auto_partitions(sum(t.size for t in tasks))


def _decide(bar: Barrier, key_ds, partitions: int, stage_dir: str, stats: dict[str, Any],
            info: dict[str, Any]) -> list[Any]:
    """Run the segment and the dedup groupby; return steps that apply the decisions (ApplyLosers) at the
    start of the next segment."""
    import ray

    from pipelines.data.dedup import ApplyLosers, fuzzy_losers, group_decisions

    max_bucket = bar.fuzzy.max_bucket if bar.fuzzy is not None else 5000
    exact, pairs, stat_rows = group_decisions(key_ds, partitions, max_bucket)
    for s in stat_rows:
        _merge_stats(stats, json.loads(s))
    files = sorted(f"{stage_dir}/{p}" for p in os.listdir(stage_dir) if p.endswith(".parquet"))
    if bar.exact is not None:
        info["exact_dedup"] = {"duplicates": len(exact)}
    else:
        exact = []
    fuzzy: list[str] = []
    if bar.fuzzy is not None:
        fuzzy, finfo = fuzzy_losers(pairs, exact, files, bar.fuzzy)
        info["fuzzy_dedup"] = {"near_duplicates": len(fuzzy), **finfo}
    steps: list[Any] = []
    for name in bar.order:
        losers = exact if name == "exact_dedup" else fuzzy
        reason = "duplicate" if name == "exact_dedup" else "near_duplicate"
        steps.append(ApplyLosers(name, reason, ray.put(losers)))
    return steps


def _tokenizer(cfg: PrepConfig, items: list[dict[str, Any]], steps: list[Any], common: dict[str, Any]):
    from gptcore.tokenizer import Tokenizer, train_bpe, train_char

    spec = cfg.tokenizer
    if spec.kind == "load":
        try:
            return Tokenizer.load(spec.path)
        except (OSError, ValueError) as e:
            raise PrepError(f"tokenizer.path {spec.path!r}: cannot load it ({e})") from None
    limit = int(spec.sample_mb * MB) if (spec.kind == "bpe" and spec.sample_mb > 0) else None
    texts: list[str] = []
    size = 0
    runner = SegmentRunner(steps, "text", **common)
    it = _run_udf(items, runner, "tokenizer_sample").iter_batches(batch_size=None, batch_format="pyarrow")
    stats: dict[str, Any] = {"steps": {}}
    problems: list[dict[str, str]] = []
    for b in it:
        for s in b.column("_stats").to_pylist():
            if s:
                _merge_stats(stats, json.loads(s))
        for t, d, src in zip(b.column("text").to_pylist(), b.column("drop").to_pylist(),
                             b.column("source").to_pylist()):
            if d:
                if d.startswith("read:") and len(problems) < 10:
                    problems.append({"source": src, "reason": d})
                continue
            if limit is not None and size >= limit:
                break
            texts.append(t)
            size += len(t)
        if limit is not None and size >= limit:
            break
    del it
    if not texts:
        led = [{"step": n, "drops": e["drops"]} for n, e in stats["steps"].items()]
        raise PrepError(_no_usable_input_message(led, problems))
    _say(f"training a {spec.kind} tokenizer on {len(texts)} documents ({size / MB:.1f} MB)")
    try:
        if spec.kind == "bpe":
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return train_bpe(texts, spec.vocab_size, special_tokens=tuple(spec.special_tokens),
                                 min_frequency=spec.min_frequency)
        return train_char(texts, special_tokens=tuple(spec.special_tokens))
    except ValueError as e:
        raise PrepError(f"tokenizer training failed: {e}") from None


def _ledger(stats: dict[str, Any], order: list[str], final_drops: dict[str, int], alive_final: int) -> list[dict]:
    """Per-step counts in pipeline order, checked: rows_in == rows_out + drops, chained, and equal to
    the tombstones that reached the driver."""
    steps = stats.get("steps", {})
    ledger = []
    prev_out = None
    for name in order:
        e = steps.get(name, _new_entry())
        drops = dict(sorted(e["drops"].items()))
        entry = {"step": name, "rows_in": e["rows_in"], "rows_out": e["rows_out"], "drops": drops}
        if e.get("splits"):
            entry["splits_rows"] = True
        elif e["rows_in"] != e["rows_out"] + sum(drops.values()):
            raise RuntimeError(f"ledger check failed for step {name!r}: rows_in {e['rows_in']} != rows_out "
                               f"{e['rows_out']} + drops {sum(drops.values())}")
        if prev_out is not None and e["rows_in"] != prev_out and not e.get("splits"):
            raise RuntimeError(f"ledger check failed: step {name!r} got {e['rows_in']} rows, the step before "
                               f"it passed {prev_out}")
        prev_out = e["rows_out"]
        ledger.append(entry)
    if prev_out is not None and prev_out != alive_final:
        raise RuntimeError(f"ledger check failed: last step passed {prev_out} rows, {alive_final} reached the writer")
    counted: dict[str, int] = {}
    for entry in ledger:
        for r, n in entry["drops"].items():
            key = r if ":" in r else f"{entry['step']}:{r}"
            counted[key] = counted.get(key, 0) + n
    if counted != final_drops and not any(e.get("splits_rows") for e in ledger):
        raise RuntimeError(f"ledger check failed: step drop counts {counted} != tombstones {final_drops}")
    return ledger


def _no_usable_input_message(ledger: list[dict], problems: list[dict[str, str]]) -> str:
    parts = []
    for e in ledger:
        if e["drops"]:
            parts.append(f"{e['step']}: " + ", ".join(f"{r}={n}" for r, n in e["drops"].items()))
    ex = "; ".join(f"{p['source']} ({p['reason']})" for p in problems[:3])
    return ("no usable input: every document was dropped (" + ("; ".join(parts) or "no documents read") + ")"
            + (f"; e.g. {ex}" if ex else ""))


def _summary(m: dict[str, Any], step_times: dict[str, Any], timings: dict[str, float]) -> None:
    for e in m["ledger"]:
        st = step_times.get(e["step"], {})
        drops = ", ".join(f"{r}={n}" for r, n in e["drops"].items()) or "-"
        rate = f" {st['mb_per_s']} MB/s/core" if st.get("mb_per_s") else ""
        _say(f"{e['step']:<20} in {e['rows_in']:>8} out {e['rows_out']:>8}  drops: {drops}{rate}")
    for name, st in step_times.items():
        if name.startswith("_") and st.get("mb_per_s"):
            _say(f"{name:<20} {st['mb_per_s']} MB/s/core (dedup hashing, not a ledger step)")
    for s, v in m["splits"].items():
        _say(f"{s}: {v['rows']} rows, {v['tokens']} tokens, {len(v['shards'])} shards")
    if m["problems"]["count"]:
        _say(f"{m['problems']['count']} bad input record(s), e.g. " +
             "; ".join(f"{p['source']} ({p['reason']})" for p in m["problems"]["examples"][:5]))
    _say(f"done in {timings.get('total_s', 0):.1f}s -> {m['root']} (id {m['id']})")
