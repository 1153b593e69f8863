"""The data-prep pipeline on Ray Data: read -> steps (as listed in the config) -> tokenize -> pack -> write.

    raygpt prep --config jobs/configs/prep-english-bpe.yaml
    python -c "from pipelines.data import run, PrepConfig; run(PrepConfig(output='out', inputs=[...]))"

run(cfg) is the list of stages: plan (pipelines.data.plan: segments cut at the dedup steps, output
reuse), the segments before each dedup barrier (each ONE streaming Ray Data operator, steps fused
in-process: pipelines.data.runner; documents go to work files and their dedup keys to partitioned key
files in <output>/_work, the decision is taken by Ray tasks reading them: pipelines.data.dedup_stage), the tokenizer (loaded, or trained on a
deterministic sample), the final segment (tokenized and spilled in the workers; the driver's sink gets
counts per batch, then one worker task per shard packs and writes it: pipelines.data.sink, .shards),
then the checked ledger
(pipelines.data.ledger), timings, data card and manifest.json, written last. A complete output is
reused, an unfinished one is replaced. Does not: train models or read token shards (pipelines.train).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Any

import fsspec

from pipelines.data import manifest as mf
from pipelines.data.card import write_card
from pipelines.data.config import PrepConfig, PrepError, content_config
from pipelines.data.dedup import Signatures
from pipelines.data.dedup_stage import decide_barrier
from pipelines.data.ledger import MB, check_ledger, merge_stats, no_usable_input_message, step_times
from pipelines.data.pack import Tokenize
from pipelines.data.plan import (
    Segment,
    build_segments,
    config_hash,
    partitions_for,
    prepare_output,
    runner_inputs,
    work_root,
)
from pipelines.data.read import plan_reads
from pipelines.data.runner import DataContext, SegmentRunner, batch_to_table, run_udf
from pipelines.data.shards import Spill
from pipelines.data.sink import Sink, build_manifest, say, summary
from pipelines.runtime import ensure_ray

__all__ = ["run", "batch_to_table"]


def run(cfg: PrepConfig) -> dict[str, Any]:
    """Run the whole prep; returns the manifest (with "root"). Raises PrepError for user-facing problems."""
    t_start = time.time()
    timings: dict[str, float] = {}
    content = content_config(cfg)
    chash = config_hash(content)
    reused = prepare_output(cfg, content)
    if reused is not None:
        say(f"{cfg.output}: complete output with the same config found (id {reused.get('id')}); reused. "
            f"Pass --overwrite to rebuild it.")
        return reused
    tasks = plan_reads(cfg.inputs, cfg.read)
    segments, needs_prep = build_segments(cfg)
    t0 = time.time()
    ensure_ray(cfg.ray_address, num_cpus=cfg.num_cpus or None)
    timings["ray_init_s"] = time.time() - t0
    fs, root = fsspec.core.url_to_fs(cfg.output)
    root = root.rstrip("/")
    wfs, wroot = work_root(cfg, fs, root, chash)
    info: dict[str, Any] = {"extra": {st.name: st.prepare() for st in needs_prep}, "dedup": {}}
    common = runner_inputs(cfg)
    stats: dict[str, Any] = {"steps": {}}
    ledger_order: list[str] = ["read"]
    with DataContext(cfg.progress):
        items = [t.to_dict() for t in tasks]
        items, final_steps = _dedup_segments(segments, items, partitions_for(cfg, tasks, segments), common, wfs, wroot,
                                             stats, ledger_order, info["dedup"], timings)
        ledger_order += [s.name for s in final_steps]
        # tokenizer: load, or train on a deterministic sample (first sample_mb of cleaned docs, in order)
        t0 = time.time()
        tok = _tokenizer(cfg, items, final_steps, common)
        timings["tokenizer_s"] = time.time() - t0
        with fs.open(f"{root}/tokenizer.json", "wb") as f:
            f.write(tok.to_json_str().encode())
        ledger_order.append("tokenize")
        t0 = time.time()
        sink = _final_segment(cfg, tok, items, final_steps, common, stats, f"{wroot}/final", wfs)
        timings["final_s"] = time.time() - t0
    ledger = check_ledger(stats, ledger_order, sink.final_drops, sink.alive_final)
    if sink.alive_final == 0:
        raise PrepError(no_usable_input_message(ledger, sink.problems))
    manifest = build_manifest(cfg, tok, sink, ledger, stats, info, content, chash)
    timings["total_s"] = time.time() - t_start
    times = step_times(stats)
    with fs.open(f"{root}/timings.json", "w") as f:
        json.dump({"timings": {k: round(v, 3) for k, v in timings.items()}, "steps": times}, f, indent=2,
                  sort_keys=True)
    if cfg.write.data_card:

        write_card(cfg.output, manifest)
    try:
        wfs.rm(wroot, recursive=True)
    except FileNotFoundError:
        pass
    mf.write_manifest(cfg.output, manifest)  # LAST: the dataset is complete from this instant
    manifest = mf.load_manifest(cfg.output)
    summary(manifest, times, timings)
    return manifest


def _dedup_segments(segments: list[Segment], items: list[dict[str, Any]], partitions: int, common: dict[str, Any],
                    wfs, wroot: str, stats: dict[str, Any], ledger_order: list[str], dedup_info: dict[str, Any],
                    timings: dict[str, float]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Run every segment before a dedup barrier; return the work files to read next (as items) and the
    steps of the final segment (the last barrier's ApplyLosers first)."""
    pre_steps: list[Any] = []  # ApplyLosers from the previous barrier
    for si, seg in enumerate(segments[:-1]):
        steps = pre_steps + seg.steps
        ledger_order += [s.name for s in steps]
        stage_dir = f"{wroot}/stage{si}"
        wfs.makedirs(stage_dir, exist_ok=True)
        runner = SegmentRunner(steps + [Signatures(seg.barrier.exact, seg.barrier.fuzzy)], "work",
                               work_dir=stage_dir, barrier=seg.barrier, partitions=partitions, **common)
        t0 = time.time()
        dec = decide_barrier(seg.barrier, run_udf(items, runner, f"segment{si}"), partitions, stage_dir)
        for s in dec.stats:
            merge_stats(stats, json.loads(s))
        dedup_info.update(dec.info(seg.barrier))
        pre_steps = dec.steps(seg.barrier)
        timings[f"segment{si}_dedup_s"] = time.time() - t0
        timings.update({f"segment{si}_{k}_s": v for k, v in dec.seconds.items()})  # where the barrier's time went
        timings.update({f"segment{si}_{k}_worker_peak_mib": v for k, v in dec.peak_mib.items()})
        files = sorted(f"{stage_dir}/{p}" for p in os.listdir(stage_dir) if p.endswith(".parquet"))
        items = dec.next_items(files)
    return items, pre_steps + segments[-1].steps


class _Sample:
    """The tokenizer's training input. BPE: the documents themselves (up to the configured limit). Char:
    only the set of characters seen (a char vocabulary is the sorted set), so the driver never holds the
    corpus, and training on the one string of those characters gives the same tokenizer."""

    def __init__(self, chars_only: bool):
        self.chars: set[str] | None = set() if chars_only else None
        self.texts: list[str] = []
        self.size = self.docs = 0

    def add(self, t: str) -> None:
        if self.chars is not None:
            self.chars.update(t)
        else:
            self.texts.append(t)
        self.size += len(t)
        self.docs += 1

    def training_texts(self) -> list[str]:
        return ["".join(sorted(self.chars))] if self.chars is not None else self.texts


def _tokenizer_sample(cfg: PrepConfig, items: list[dict[str, Any]], steps: list[Any],
                      common: dict[str, Any]) -> _Sample:
    """The first tokenizer.sample_mb of cleaned documents in input order (all of them for char or 0)."""
    spec = cfg.tokenizer
    limit = int(spec.sample_mb * MB) if (spec.kind == "bpe" and spec.sample_mb > 0) else None
    sample = _Sample(chars_only=spec.kind == "char")
    runner = SegmentRunner(steps, "text", **common)
    it = run_udf(items, runner, "tokenizer_sample").iter_batches(batch_size=None, batch_format="pyarrow")
    stats: dict[str, Any] = {"steps": {}}
    problems: list[dict[str, str]] = []
    for b in it:
        for s in b.column("_stats").to_pylist():
            if s:
                merge_stats(stats, json.loads(s))
        for t, d, src in zip(b.column("text").to_pylist(), b.column("drop").to_pylist(),
                             b.column("source").to_pylist()):
            if d:
                if d.startswith("read:") and len(problems) < 10:
                    problems.append({"source": src, "reason": d})
                continue
            if limit is not None and sample.size >= limit:
                break
            sample.add(t)
        if limit is not None and sample.size >= limit:
            break
    del it
    if not sample.docs:
        led = [{"step": n, "drops": e["drops"]} for n, e in stats["steps"].items()]
        raise PrepError(no_usable_input_message(led, problems))
    return sample


def _tokenizer(cfg: PrepConfig, items: list[dict[str, Any]], steps: list[Any], common: dict[str, Any]):
    from gptcore.tokenizer import Tokenizer, train_bpe, train_char

    spec = cfg.tokenizer
    if spec.kind == "load":
        try:
            return Tokenizer.load(spec.path)
        except (OSError, ValueError) as e:
            raise PrepError(f"tokenizer.path {spec.path!r}: cannot load it ({e})") from None
    sample = _tokenizer_sample(cfg, items, steps, common)
    say(f"training a {spec.kind} tokenizer on {sample.docs} documents ({sample.size / MB:.1f} MB)")
    texts = sample.training_texts()
    try:
        if spec.kind == "bpe":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return train_bpe(texts, spec.vocab_size, special_tokens=tuple(spec.special_tokens),
                                 min_frequency=spec.min_frequency)
        return train_char(texts, special_tokens=tuple(spec.special_tokens))
    except ValueError as e:
        raise PrepError(f"tokenizer training failed: {e}") from None


def _final_segment(cfg: PrepConfig, tok, items: list[dict[str, Any]], steps: list[Any], common: dict[str, Any],
                   stats: dict[str, Any], final_dir: str, wfs) -> Sink:
    """Tokenize and spill in the workers (the driver gets one summary per batch); then pack and write the
    shards in the workers, one task per shard."""
    import ray

    sft = cfg.kind == "sft"
    tok_step = Tokenize(ray.put(tok.to_json_str()), cfg.kind, cfg.pack.block_size, cfg.pack.val_fraction,
                        cfg.pack.split_seed, cfg.sft if sft else None, split_by=cfg.pack.split_by)
    wfs.makedirs(final_dir, exist_ok=True)
    sink = Sink(cfg, final_dir)
    runner = SegmentRunner(steps, "final", tokenize=tok_step, spill=Spill(final_dir, sink.layout), **common)
    try:
        for b in run_udf(items, runner, "final").iter_batches(batch_size=None, batch_format="pyarrow"):
            sink.add(b, stats)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    return sink
