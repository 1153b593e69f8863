"""The driver side of the final segment: token rows in input order -> packed windows -> shards, manifest.

    sink = Sink(cfg)                 # one Packer + ShardWriter per split
    for table in final_stream: sink.add(table, stats)
    shards = sink.close()
    manifest = build_manifest(cfg, tok, sink, ...)

The driver consumes the ordered stream (preserve_order) batch by batch: tombstones are counted (and the
first 1000 bad-input ones kept as examples), alive documents go to their split's Packer, whose full
windows go straight to that split's ShardWriter. What the driver holds is one batch, one partial window
per split, the counters and a fixed-size length histogram: nothing that grows with the corpus.
Does not: tokenize (pipelines.data.pack.Tokenize runs in the workers) or decide dedup.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

import numpy as np
import pyarrow

from pipelines import console
from pipelines.data.config import PrepConfig, PrepError
from pipelines.data.ledger import HIST_EDGES, hist, merge_stats
from pipelines.data.pack import Packer
from pipelines.data.write import ShardWriter, rows_per_shard
from pipelines.runtime import code_version as runtime_code_version

SPLITS = ("train", "val")


class Sink:
    """Packs and writes the final stream for both splits; keeps the counts the manifest needs."""

    def __init__(self, cfg: PrepConfig):
        self.T = T = cfg.pack.block_size
        self.sft = cfg.kind == "sft"
        self.with_mask = self.sft
        self.pad_mode = self.sft and cfg.sft.mode == "pad"
        rps = rows_per_shard(cfg.write.shard_mb, T, self.with_mask)
        self.writers = {s: ShardWriter(cfg.output, s, T, rps, cfg.write.row_group_rows, cfg.write.compression,
                                       self.with_mask) for s in SPLITS}
        self.packers = {s: Packer(T, self.with_mask) for s in SPLITS}
        self.split_docs = {s: 0 for s in SPLITS}
        self.split_tokens = {s: 0 for s in SPLITS}
        self.loss_tokens = {s: 0 for s in SPLITS}
        self.final_drops: dict[str, int] = {}
        self.problems: list[dict[str, str]] = []
        self.hist_after = [0] * (len(HIST_EDGES) - 1)
        self.alive_final = 0
        self.shards: dict[str, list[dict[str, Any]]] = {}

    def add(self, b, stats: dict[str, Any]) -> None:
        """One pyarrow table of the final stream (runner.token_table rows)."""
        for s in b.column("_stats").to_pylist():
            if s:
                merge_stats(stats, json.loads(s))
        drops = b.column("drop").to_pylist()
        srcs = b.column("source").to_pylist()
        alive_idx = []
        for i, d in enumerate(drops):
            if not d:
                alive_idx.append(i)
            elif d != "__meta__":
                self.final_drops[d] = self.final_drops.get(d, 0) + 1
                if d.startswith("read:") and len(self.problems) < 1000:
                    self.problems.append({"source": srcs[i], "reason": d})
        if not alive_idx:
            return
        self.alive_final += len(alive_idx)
        nch = b.column("n_chars").to_numpy()
        self.hist_after = [a + c for a, c in zip(self.hist_after, hist(nch[alive_idx]))]
        ids_col = b.column("ids").combine_chunks()
        if "cut" in b.column_names:
            self._add_by_position(ids_col, b.column("cut").to_numpy(), alive_idx)
            return
        val = b.column("val").to_numpy(zero_copy_only=False)
        mask_col = b.column("mask").combine_chunks() if self.with_mask else None
        for split, want in (("train", False), ("val", True)):
            rows = np.array([i for i in alive_idx if bool(val[i]) == want], dtype=np.int64)
            if rows.size:
                self._add_rows(split, ids_col, mask_col, rows)

    def _add_by_position(self, ids_col, cuts: np.ndarray, alive_idx: list[int]) -> None:
        """split_by=position: each row's first cut tokens go to train, the rest to val."""
        offs = ids_col.offsets.to_numpy()
        vals = ids_col.values.to_numpy()
        for split in SPLITS:
            pieces = []
            for i in alive_idx:
                lo, hi = (offs[i], offs[i] + cuts[i]) if split == "train" else (offs[i] + cuts[i], offs[i + 1])
                if hi > lo:
                    pieces.append(vals[lo:hi])
            if not pieces:
                continue
            self.split_docs[split] += len(pieces)
            flat = np.concatenate(pieces)
            self.split_tokens[split] += int(flat.size)
            res = self.packers[split].add(flat, np.array([p.size for p in pieces], np.int64))
            if res is not None:
                self.writers[split].add(*res)

    def _add_rows(self, split: str, ids_col, mask_col, rows: np.ndarray) -> None:
        T = self.T
        sel = ids_col.take(rows)
        flat = sel.flatten().to_numpy()
        lens = np.diff(sel.offsets.to_numpy())
        msk = mask_col.take(rows).flatten().to_numpy() if self.with_mask else None
        self.split_docs[split] += int(rows.size)
        if self.pad_mode:
            W = rows.size
            win = flat.reshape(W, T + 1)
            m = msk.reshape(W, T + 1)
            # rows come padded to T+1: padding is what follows the last completion token (mask 1)
            last = (T + 1) - 1 - np.argmax(m[:, ::-1] == 1, axis=1)
            doc = (np.arange(T + 1)[None, :] > last[:, None]).astype(np.int32)
            self.split_tokens[split] += int((doc == 0).sum())
            self.loss_tokens[split] += int(m.sum())
            self.writers[split].add(win, doc, m)
            return
        self.split_tokens[split] += int(flat.size)
        if self.with_mask:
            self.loss_tokens[split] += int(msk.sum())
        res = self.packers[split].add(flat, lens, msk)
        if res is not None:
            self.writers[split].add(*res)

    def close(self) -> None:
        self.shards = {s: w.close() for s, w in self.writers.items()}

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()

    def splits(self) -> dict[str, dict[str, Any]]:
        """The manifest's "splits"; refuses a dataset without one training row."""
        out = {}
        for s in SPLITS:
            rows = sum(sh["rows"] for sh in self.shards[s])
            out[s] = {"rows": rows, "docs": self.split_docs[s], "tokens": self.split_tokens[s],
                      "shards": self.shards[s]}
            if not self.pad_mode:
                out[s]["tail_tokens_dropped"] = self.packers[s].tail_tokens()
            if self.sft:
                out[s]["loss_tokens"] = self.loss_tokens[s]
        if out["train"]["rows"] == 0:
            raise PrepError(f"no training rows: {self.split_tokens['train']} train tokens are fewer than one window "
                            f"of block_size+1={self.T + 1}; lower pack.block_size or add input")
        return out


def code_version() -> str:
    """The shared provenance string plus pyarrow's version (it decides the Parquet bytes)."""
    return f"{runtime_code_version()} pyarrow {pyarrow.__version__}"


def build_manifest(cfg: PrepConfig, tok, sink: Sink, ledger: list[dict], stats: dict[str, Any],
                   info: dict[str, Any], content: dict[str, Any], chash: str) -> dict[str, Any]:
    """Everything manifest.json says about the dataset (written last by the pipeline)."""
    manifest = {
        "kind": cfg.kind,
        "name": cfg.name,
        "tokenizer_id": tok.id,
        "tokenizer_kind": tok.kind,
        "tokenizer_file": "tokenizer.json",
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "block_size": sink.T,
        "window_stride": sink.T,
        "columns": ["input_ids", "doc_ids"] + (["loss_mask"] if sink.with_mask else []),
        "splits": sink.splits(),
        "ledger": ledger,
        "problems": {"count": sum(n for r, n in sink.final_drops.items() if r.startswith("read:")),
                     "examples": sink.problems[:200]},
        "dedup": info["dedup"],
        "decontamination": info["extra"].get("decontaminate", {}),
        "stats": {"hist_edges_chars": HIST_EDGES, "doc_chars_before": stats.get("hist_read", []),
                  "doc_chars_after": sink.hist_after},
        "config": content,
        "config_hash": chash,
        "code_version": code_version(),
        "created_at": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "timings_file": "timings.json",
    }
    if sink.sft:
        manifest["sft"] = {"mode": cfg.sft.mode, "pad_id": tok.eos_id if tok.eos_id is not None else 0,
                           "loss_mask": "per input_ids position: 1 on completion tokens (incl. EOS), 0 on prompt "
                                        "and padding; targets are input_ids[1:], so weight them by loss_mask[1:]"}
    return manifest


def say(msg: str) -> None:
    console.get_logger("prep").info("%s", msg)


def summary(m: dict[str, Any], step_times: dict[str, Any], timings: dict[str, float]) -> None:
    for e in m["ledger"]:
        st = step_times.get(e["step"], {})
        drops = ", ".join(f"{r}={n}" for r, n in e["drops"].items()) or "-"
        rate = f" {st['mb_per_s']} MB/s/core" if st.get("mb_per_s") else ""
        say(f"{e['step']:<20} in {e['rows_in']:>8} out {e['rows_out']:>8}  drops: {drops}{rate}")
    for name, st in step_times.items():
        if name.startswith("_") and st.get("mb_per_s"):
            say(f"{name:<20} {st['mb_per_s']} MB/s/core (dedup hashing, not a ledger step)")
    for s, v in m["splits"].items():
        say(f"{s}: {v['rows']} rows, {v['tokens']} tokens, {len(v['shards'])} shards")
    if m["problems"]["count"]:
        say(f"{m['problems']['count']} bad input record(s), e.g. " +
            "; ".join(f"{p['source']} ({p['reason']})" for p in m["problems"]["examples"][:5]))
    say(f"done in {timings.get('total_s', 0):.1f}s -> {m['root']} (id {m['id']})")
