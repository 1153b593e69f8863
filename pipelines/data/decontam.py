"""Decontamination: drop training documents that share a word n-gram (default 13) with an eval set.

    steps: [..., {name: decontaminate, params: {eval_sets: [{path: ../shared/data/cnndm-frank/*.jsonl,
                                                              fields: [article, summary]}]}}]

The eval sets are read once on the driver (JSONL/Parquet/CSV fields, or plain text files), turned
into a sorted array of 64-bit n-gram hashes (same words and hashing as fuzzy dedup:
pipelines.data.dedup), and shipped to the workers through the object store; each batch hashes its
alive documents' n-grams (vectorised) and drops those with any hit as
"decontaminate:eval_overlap". An eval text shorter than n words contributes one hash of all its
words, which only matches an equally short training document. Does not: do fuzzy matching or
remove only the overlapping span (the whole document goes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.data.config import InputSpec, PrepError, ReadSpec
from pipelines.data.dedup import word_ngram_hashes
from pipelines.data.read import ReadTask, detect_format, list_files, read_task
from pipelines.data.step_configs import DecontamConfig, EvalSetSpec

__all__ = ["DecontamConfig", "Decontaminate", "EvalSetSpec", "build_eval_hashes", "eval_texts"]


def eval_texts(spec: EvalSetSpec) -> list[str]:
    """All texts of one eval set (each listed field of each record is one text)."""
    inp = InputSpec(path=spec.path, fields=list(spec.fields), storage_options=dict(spec.storage_options))
    uris = list_files(inp, 0)
    if not uris:
        raise PrepError(f"decontaminate: eval set path {spec.path!r} matches no file")
    texts: list[str] = []
    read = ReadSpec(batch_rows=4096)
    for uri in uris:
        fmt = detect_format(uri, "auto")
        structured = fmt != "text"
        t = ReadTask(0, uri, fmt, "line" if fmt == "jsonl" else "file")
        # the SFT-style render path keeps the requested fields without needing a text field
        render = ("", "") if structured else None
        for b in read_task(t, [inp], read, list(spec.fields) if structured else [], False, render=render):
            for j, d in enumerate(b["drop"]):
                if d:
                    continue
                if structured:
                    texts.extend(b[f][j] for f in spec.fields if b[f][j])
                else:
                    texts.append(b["text"][j])
    return texts


def build_eval_hashes(cfg: DecontamConfig) -> tuple[np.ndarray, dict[str, int]]:
    arrays, info = [], {}
    for spec in cfg.eval_sets:
        texts = eval_texts(spec)
        gh, _ = word_ngram_hashes(texts, cfg.ngram_size)
        arrays.append(gh)
        info[spec.path] = len(texts)
    hashes = np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, np.uint64)
    return hashes, info


class Decontaminate:
    """The `decontaminate` step. Built on the driver by the pipeline (prepare() loads the eval sets)."""

    name = "decontaminate"
    splits_rows = False

    def __init__(self, cfg: DecontamConfig, hashes_ref: Any = None):
        self.cfg = cfg
        self._ref = hashes_ref
        self._hashes: np.ndarray | None = None

    def prepare(self) -> dict[str, Any]:
        """Driver side: read and hash the eval sets, put them in the object store."""
        import ray

        hashes, info = build_eval_hashes(self.cfg)
        self._ref = ray.put(hashes)
        return {"eval_texts": info, "eval_ngrams": int(hashes.size)}

    def __getstate__(self):
        return {"cfg": self.cfg, "_ref": self._ref, "_hashes": None}

    def _table(self) -> np.ndarray:
        if self._hashes is None:
            import ray

            self._hashes = self._ref if isinstance(self._ref, np.ndarray) else ray.get(self._ref)
        return self._hashes

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        drops = list(batch["drop"])
        alive = [i for i, d in enumerate(drops) if not d]
        table = self._table()
        if alive and table.size:
            gh, goff = word_ngram_hashes([batch["text"][i] for i in alive], self.cfg.ngram_size)
            pos = np.searchsorted(table, gh)
            hit = table[np.minimum(pos, table.size - 1)] == gh  # (G,) n-gram found in an eval set
            cs = np.concatenate(([0], np.cumsum(hit, dtype=np.int64)))
            per_doc = cs[goff[1:]] - cs[goff[:-1]]  # (ndocs,) eval n-grams found per document
            for k, i in enumerate(alive):
                if per_doc[k] > 0:
                    drops[i] = "decontaminate:eval_overlap"
        out = dict(batch)
        out["drop"] = drops
        return out
