"""The driver side of the final segment: per-batch summaries in input order -> shard tasks -> manifest counts.

    sink = Sink(cfg, work_dir)       # the layout of both splits
    for row in final_stream: sink.add(row, stats)   # one small JSON summary per tokenized batch
    sink.close()                     # shard tasks in the workers; the driver gets one dict per shard
    manifest = build_manifest(cfg, tok, sink, ...)

The workers tokenize, spill each batch's tokens per split (pipelines.data.shards) and send the driver
counts only: drops by reason (the first 1000 bad-input ones as examples), documents, tokens, a length
histogram. The driver places every batch in its split's token stream (a few integers per batch), then
one task per shard packs the windows and writes the shard; the driver receives path, rows, bytes and
sha256 per shard and writes the manifest last. It never holds token ids or text.
Does not: tokenize (pipelines.data.pack.Tokenize), pack or write shards (pipelines.data.shards).
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

import pyarrow

from pipelines import console
from pipelines.data.config import PrepConfig, PrepError
from pipelines.data.ledger import HIST_EDGES, merge_stats
from pipelines.data.runner import run_items
from pipelines.data.shards import MAX_PROBLEMS, SPLITS, Layout, ShardTask, SplitPlan
from pipelines.data.write import rows_per_shard
from pipelines.runtime import code_version as runtime_code_version


def layout_for(cfg: PrepConfig) -> Layout:
    T = cfg.pack.block_size
    sft = cfg.kind == "sft"
    return Layout(block_size=T, with_mask=sft, pad_mode=sft and cfg.sft.mode == "pad",
                  rows_per_shard=rows_per_shard(cfg.write.shard_mb, T, sft), row_group_rows=cfg.write.row_group_rows,
                  compression=cfg.write.compression)


class Sink:
    """Collects the final segment's per-batch summaries; runs the shard tasks; keeps the manifest's counts."""

    def __init__(self, cfg: PrepConfig, work_dir: str):
        self.layout = layout_for(cfg)
        self.T = cfg.pack.block_size
        self.output, self.work_dir = cfg.output, work_dir
        self.sft = cfg.kind == "sft"
        self.with_mask = self.sft
        self.pad_mode = self.layout.pad_mode
        self.plans = {s: SplitPlan(s, self.layout) for s in SPLITS}
        self.split_docs = {s: 0 for s in SPLITS}
        self.split_tokens = {s: 0 for s in SPLITS}
        self.loss_tokens = {s: 0 for s in SPLITS}
        self.final_drops: dict[str, int] = {}
        self.problems: list[dict[str, str]] = []
        self.hist_after = [0] * (len(HIST_EDGES) - 1)
        self.alive_final = 0
        self.shards: dict[str, list[dict[str, Any]]] = {}
        self.rows_seen = 0  # summary rows the driver received (one per batch: the bound the tests check)

    def add(self, b, stats: dict[str, Any]) -> None:
        """One pyarrow table of summaries (shards.Spill JSON strings, in input order)."""
        for js in b.column("summary").to_pylist():
            self.rows_seen += 1
            self.add_summary(json.loads(js), stats)

    def add_summary(self, s: dict[str, Any], stats: dict[str, Any]) -> None:
        merge_stats(stats, s["stats"])
        for d, n in s["drops"].items():
            self.final_drops[d] = self.final_drops.get(d, 0) + n
        self.problems.extend(s["problems"][:MAX_PROBLEMS - len(self.problems)])
        self.alive_final += s["alive"]
        self.hist_after = [a + c for a, c in zip(self.hist_after, s["hist"])]
        for split, v in s["splits"].items():
            self.split_docs[split] += v["docs"]
            self.split_tokens[split] += v["tokens"]
            self.loss_tokens[split] += v["loss_tokens"]
            self.plans[split].add(s["file"], v["n"], v["n_docs"])

    def close(self) -> None:
        """Pack and write every shard in the workers (one task per shard, in shard order)."""
        items = [it for s in SPLITS for it in self.plans[s].items(self.work_dir)]
        task = ShardTask(self.output, self.layout)
        self.shards = {s: [] for s in SPLITS}
        if not items:
            return
        for b in run_items(items, task, "write_shards").iter_batches(batch_size=None, batch_format="pyarrow"):
            for split, js in zip(b.column("split").to_pylist(), b.column("shard").to_pylist()):
                self.rows_seen += 1
                self.shards[split].append(json.loads(js))

    def abort(self) -> None:
        """Nothing to undo: shard files without a manifest are an unfinished output (cleared by the next run)."""

    def splits(self) -> dict[str, dict[str, Any]]:
        """The manifest's "splits"; refuses a dataset without one training row."""
        out = {}
        for s in SPLITS:
            rows = sum(sh["rows"] for sh in self.shards[s])
            out[s] = {"rows": rows, "docs": self.split_docs[s], "tokens": self.split_tokens[s],
                      "shards": self.shards[s]}
            if not self.pad_mode:
                out[s]["tail_tokens_dropped"] = self.layout.tail_tokens(self.plans[s].n_tokens)
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
