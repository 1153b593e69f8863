"""The Ray Data actor of batch generation: loads the checkpoint once, turns prompt rows into output rows.

    ds.map_batches(GenerationPredictor, batch_size=16, batch_format="pyarrow",
                   compute=ray.data.ActorPoolStrategy(size=2), num_gpus=0,
                   fn_constructor_kwargs=dict(checkpoint="runs/ckpt", ...))

Input rows come from pipelines.generate.prepare.prepare_batch (prompt token ids, sampling params as
JSON, per-row error) already sorted by (chunk, prompt length), so one batch pads little; the batch is
sorted once more (cheap) before it reaches the engine. Every input row yields exactly `_n` output rows
(index 0.._n-1), error rows included, so the driver can tell when a chunk is complete.
A failing batch is retried row by row: only the rows that fail alone become error rows.
Does not: write files (the driver commits shards), choose rows, or retry (Ray restarts a dead actor).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pyarrow as pa
import ray
import torch

from gptcore.checkpoint import load_checkpoint
from gptcore.engine import Engine
from gptcore.sampling import SamplingParams
from pipelines.data.clean_quality import repetition_reasons
from pipelines.generate.io import local_checkpoint, output_schema

MIN_WORDS_FOR_REPETITION = 10  # Gopher's n-gram fractions are meaningless on a handful of words


def quality_reasons(texts: list[str | None]) -> list[str | None]:
    """Why each generated text is unusable ("empty", "repetition:top_2gram", ...), or None if it looks
    fine. Reuses data prep's Gopher repetition rules, so a text is judged the same way everywhere."""
    out: list[str | None] = [None] * len(texts)
    check = []
    for i, t in enumerate(texts):
        if t is None:
            continue  # error rows carry their own reason
        if not t.strip():
            out[i] = "empty"
        elif len(t.split()) >= MIN_WORDS_FOR_REPETITION:
            check.append(i)
    if check:
        for i, r in zip(check, repetition_reasons([texts[i] for i in check])):
            if r:
                out[i] = f"repetition:{r}"
    return out


class GenerationPredictor:
    """Callable class for `map_batches`: one Engine per actor, built in __init__ (i.e. once)."""

    def __init__(self, *, checkpoint: str, device: str = "auto", dtype: str = "float32", batch_size: int = 16,
                 torch_threads: int = 0, quality: str = "flag", pid_dir: str | None = None,
                 debug_delay_s: float = 0.0, keep_columns: list[str] | None = None,
                 checkpoint_id: str | None = None, tokenizer_id: str | None = None):
        # lets ops tooling (and the kill tests) find this actor's process and see it progress
        self.pid_file = os.path.join(pid_dir, f"actor-{os.getpid()}.pid") if pid_dir else None
        self.batches_done = 0
        if self.pid_file:
            os.makedirs(pid_dir, exist_ok=True)
            self._write_pid_file()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() and _has_gpu() else "cpu"
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        ckpt = load_checkpoint(local_checkpoint(checkpoint), device=device, dtype=torch_dtype)
        self.engine = Engine(ckpt.model, ckpt.tokenizer, device=device, dtype=torch_dtype, max_batch_size=batch_size)
        self.batch_size = batch_size
        self.quality = quality
        self.debug_delay_s = debug_delay_s
        self.keep_columns = list(keep_columns or [])
        self.checkpoint_id = checkpoint_id or ckpt.id
        self.tokenizer_id = tokenizer_id or ckpt.tokenizer.id

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        results: dict[int, list[dict[str, Any]]] = {}
        todo = []
        for i, r in enumerate(rows):
            err = r["_error"]
            if err is None:
                try:  # invalid per-row parameters make an error row, not a failed batch
                    r["_sp"] = SamplingParams.from_dict(json.loads(r["_params"]))
                    r["_params"] = json.dumps(r["_sp"].to_dict(), sort_keys=True)  # with every default filled in
                except (ValueError, TypeError) as e:
                    err = f"invalid sampling params: {e}"
            if err is not None:
                results[i] = [self._error_row(r, k, err) for k in range(r["_n"])]
            else:
                todo.append(i)
        todo.sort(key=lambda i: rows[i]["_plen"])  # length buckets: little padding per engine call
        for s in range(0, len(todo), self.batch_size):
            part = todo[s:s + self.batch_size]
            try:
                outs = self._generate([rows[i] for i in part])
            except Exception:
                outs = []
                for i in part:  # isolate the culprit: only rows that fail on their own become errors
                    try:
                        outs.extend(self._generate([rows[i]]))
                    except Exception as e:
                        outs.append(e)
            for i, out in zip(part, outs):
                r = rows[i]
                if isinstance(out, Exception):
                    msg = f"{type(out).__name__}: {out}"
                    results[i] = [self._error_row(r, k, msg) for k in range(r["_n"])]
                else:
                    results[i] = self._output_rows(r, out)
        flat = [row for i in range(len(rows)) for row in results[i]]
        if self.quality != "off":
            for row, q in zip(flat, quality_reasons([row["text"] for row in flat])):
                row["quality"] = q
        if self.debug_delay_s:
            time.sleep(self.debug_delay_s)
        self.batches_done += 1
        if self.pid_file:
            self._write_pid_file()
        return pa.Table.from_pylist(flat, schema=self._schema(batch))

    # ---- helpers -----------------------------------------------------------------------------

    def _write_pid_file(self) -> None:
        tmp = f"{self.pid_file}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\nbatches={self.batches_done}\n")
        os.replace(tmp, self.pid_file)

    def _schema(self, batch: pa.Table) -> pa.Schema:
        keep = {c: batch.schema.field(c).type for c in self.keep_columns}
        return output_schema(keep).append(pa.field("_chunk", pa.int32()))

    def _generate(self, rows: list[dict[str, Any]]) -> list[Any]:
        return self.engine.generate([list(r["_prompt_ids"]) for r in rows], [r["_sp"] for r in rows])

    def _base(self, r: dict[str, Any], index: int) -> dict[str, Any]:
        d = {"id": r["_id"], "index": index, "_chunk": r["_chunk"]}
        for c in self.keep_columns:
            d[c] = r.get(c)
        d.update(prompt=r["prompt"], checkpoint_id=self.checkpoint_id, tokenizer_id=self.tokenizer_id,
                 sampling_params=r["_params"], seed=r["_seed"], prompt_tokens=r["_plen"])
        return d

    def _error_row(self, r: dict[str, Any], index: int, msg: str) -> dict[str, Any]:
        return {**self._base(r, index), "text": None, "completion_tokens": 0, "finish_reason": "error",
                "error": msg[:2000], "quality": None}

    def _output_rows(self, r: dict[str, Any], out: Any) -> list[dict[str, Any]]:
        rows = []
        comps = sorted(out.outputs, key=lambda c: c.index)
        for k in range(r["_n"]):
            if k >= len(comps):  # the engine returned fewer completions than asked: say so per missing index
                rows.append(self._error_row(r, k, f"engine returned {len(comps)} completion(s) for n={r['_n']}"))
                continue
            c = comps[k]
            rows.append({**self._base(r, k), "prompt_tokens": len(out.prompt_token_ids), "text": c.text,
                         "completion_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
                         "error": None, "quality": None})
        return rows


def _has_gpu() -> bool:
    try:
        return bool(ray.get_gpu_ids())
    except Exception:
        return False
