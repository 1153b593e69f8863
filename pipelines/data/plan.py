"""Planning a prep run before any data moves: segments between dedup barriers, output and work directories.

    segments, needs_prep = build_segments(cfg)     # steps cut at exact_dedup / fuzzy_dedup
    reused = prepare_output(cfg, content)          # a complete output with the same config is reused

The config's `steps` list is cut at the dedup steps, which need the whole dataset: each segment runs as
ONE streaming Ray Data operator; consecutive dedup steps share one barrier (fuzzy then runs among the
exact survivors). The output directory is cleared of our own files unless a complete dataset with the
same config hash is there (then it is reused) or one with another config is (then it is refused).
Does not: start Ray or read any input (pipelines.data.pipeline runs the plan).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import fsspec

from pipelines.config import from_dict
from pipelines.data import manifest as mf
from pipelines.data.config import PrepConfig, PrepError
from pipelines.data.decontam import Decontaminate
from pipelines.data.dedup_shuffle import auto_partitions
from pipelines.data.read import ReadTask
from pipelines.data.step_configs import DecontamConfig, ExactDedupConfig, FuzzyDedupConfig
from pipelines.data.steps import build_step
from pipelines.runtime import is_local

OWN_FILES = ("train", "val", "_work", "tokenizer.json", "data_card.md", "doc_lengths.png", "drops.png",
             "timings.json")


@dataclass
class Barrier:
    exact: ExactDedupConfig | None = None
    fuzzy: FuzzyDedupConfig | None = None
    order: list[str] = field(default_factory=list)  # dedup step names in config order


@dataclass
class Segment:
    steps: list[Any]  # step objects (picklable)
    barrier: Barrier | None = None  # decision taken after this segment


def build_segments(cfg: PrepConfig) -> tuple[list[Segment], list[Any]]:
    """Config steps -> segments separated by dedup barriers; consecutive dedup steps share one barrier
    (fuzzy then runs among the exact survivors). Also returns the steps that need driver-side prep."""
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
            step = build_step(spec.name, dict(spec.params))
        segments[-1].steps.append(step)
    return segments, prep


def config_hash(content: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_output(cfg: PrepConfig, content: dict[str, Any]) -> dict[str, Any] | None:
    """Reuse a complete output with the same config; refuse a different one; clear partial output."""
    fs, root = fsspec.core.url_to_fs(cfg.output)
    root = root.rstrip("/")
    man = f"{root}/{mf.MANIFEST}"
    if fs.exists(man):
        if not cfg.overwrite:
            try:
                m = mf.load_manifest(cfg.output)
            except mf.DatasetNotReadyError:
                m = None
            if m is not None and m.get("config_hash") == config_hash(content):
                return m
            if m is not None:
                raise PrepError(
                    f"output {cfg.output!r} already holds a complete dataset made with a different config "
                    f"(config_hash {m.get('config_hash')} != {config_hash(content)}); pass --overwrite to replace "
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


def work_root(cfg: PrepConfig, fs, root: str, chash: str):
    """Where the dedup stages write their intermediate files: <output>/_work for a local output, else
    work_dir (or a local temp dir). Must be a path all workers reach (local disk on one node, a shared
    file system on a cluster). Cleared at the start: leftovers of a killed run are never reused."""
    if cfg.work_dir:
        base = f"{cfg.work_dir.rstrip('/')}/raygpt-prep-{chash}"
    elif is_local(fs):
        base = f"{root}/_work"
    else:
        base = f"{tempfile.gettempdir()}/raygpt-prep-{chash}"
    wfs, wroot = fsspec.core.url_to_fs(base)
    if not is_local(wfs):
        raise PrepError(f"work_dir {cfg.work_dir!r}: must be a local or shared-filesystem path (dedup work files "
                        f"are written by the workers with local file I/O)")
    wroot = os.path.abspath(wroot)
    if wfs.exists(wroot):
        wfs.rm(wroot, recursive=True)
    return wfs, wroot


def partitions_for(cfg: PrepConfig, tasks: list[ReadTask], segments: list[Segment]) -> int:
    """Dedup partitions: cfg.dedup_partitions, or 0 (auto): from the planned input size and the key rows
    per document of the barriers (1 exact + `bands` fuzzy), decided before the data is seen."""
    if cfg.dedup_partitions:
        return cfg.dedup_partitions
    rows = max([int(s.barrier.exact is not None) + (s.barrier.fuzzy.bands if s.barrier.fuzzy is not None else 0)
                for s in segments if s.barrier is not None] or [1])
    return auto_partitions(sum(t.size for t in tasks), rows)


def runner_inputs(cfg: PrepConfig) -> dict[str, Any]:
    """What every SegmentRunner needs to read the inputs (shared by all segments)."""
    fields = sorted({f for inp in cfg.inputs for f in inp.fields})
    want_raw = any(inp.encoding == "raw" for inp in cfg.inputs)
    render = (cfg.sft.prompt_template, cfg.sft.completion_template) if cfg.kind == "sft" else None
    return dict(inputs=cfg.inputs, read=cfg.read, fields=fields, want_raw=want_raw, render=render)
