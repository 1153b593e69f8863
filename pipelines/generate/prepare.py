"""Input rows -> prompt rows for batch generation: ids, rendered prompts, token ids, per-row sampling params.

    from pipelines.generate.prepare import prepare_batch, row_hash, derive_seed
    prepared = prepare_batch(table, ckpt_dir="runs/ckpt", id_column="id", template="{article}\\n\\nTL;DR:",
                             max_field_chars=0, param_columns=["temperature"], sampling={}, seed=0,
                             block_size=1024)

Runs on the driver for small inputs and in Ray Data tasks for big ones, so it stays light: the tokenizer
and pyarrow, no torch and no ray (SamplingParams is validated by the actor, which has torch loaded
anyway). Does not: choose which rows to generate (plan.py) or generate anything (predictor.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pyarrow as pa

from gptcore.tokenizer import Tokenizer
from pipelines.generate.templates import render

_TOKENIZERS: dict[str, Tokenizer] = {}
_INT_FIELDS = {"max_new_tokens", "top_k", "no_repeat_ngram_size", "num_beams", "n", "seed"}


def row_hash(row: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()[:32]


def derive_seed(base: int, row_id: str) -> int:
    """Per-row seed from the run seed and the id: the same row samples the same text on every
    re-run, whatever batch it lands in."""
    return int(hashlib.sha256(f"{base}:{row_id}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def tokenizer(ckpt_dir: str) -> Tokenizer:
    """The checkpoint's tokenizer, loaded once per process."""
    tok = _TOKENIZERS.get(ckpt_dir)
    if tok is None:
        tok = _TOKENIZERS[ckpt_dir] = Tokenizer.load(os.path.join(ckpt_dir, "tokenizer.json"))
    return tok


def _py(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _row_params(row: dict[str, Any], rid: str, *, param_columns: list[str], sampling: dict[str, Any],
                seed: int) -> dict[str, Any]:
    """The row's sampling params: the run's defaults, overridden by its non-null param columns, with a
    seed (its own, or one derived from the run seed and the id)."""
    p = dict(sampling)
    for c in param_columns:
        v = _py(row.get(c))
        if isinstance(v, float) and v != v:  # NaN (CSV/pandas null)
            v = None
        if v is not None:
            if c in _INT_FIELDS and isinstance(v, float) and v.is_integer():
                v = int(v)  # a CSV/JSON column with nulls arrives as float
            p[c] = v
    row_seed = p.get("seed")
    if row_seed is None:
        row_seed = derive_seed(seed, rid)
    p["seed"] = row_seed
    return p


def _length_error(n_tokens: int, params: dict[str, Any], block_size: int) -> str | None:
    """Why a prompt of n_tokens cannot be generated from (the engine's context rule), or None."""
    truncate = params.get("truncate", "error")  # SamplingParams' defaults
    max_new = params.get("max_new_tokens", 16)
    max_new = max_new if _is_int(max_new) else 0
    if not n_tokens:
        return "empty prompt: the template rendered no tokens; check the input columns"
    if n_tokens + max_new > block_size and truncate != "left":
        return (f"prompt too long: {n_tokens} tokens + max_new_tokens={max_new} > the model's context "
                f"block_size={block_size}; shorten the input (max_field_chars=...), lower "
                f"max_new_tokens, or set sampling.truncate=left")
    return None


def _set_column(table: pa.Table, name: str, arr: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, arr)
    return table.append_column(name, arr)


def prepare_batch(batch: pa.Table, *, ckpt_dir: str, id_column: str | None, template: str, max_field_chars: int,
                  param_columns: list[str], sampling: dict[str, Any], seed: int, block_size: int) -> pa.Table:
    """Input rows -> rows with _id, _hash, prompt, _prompt_ids, _plen, _params (JSON), _seed, _n, _error."""
    cols: dict[str, list[Any]] = {k: [] for k in ("_id", "_hash", "prompt", "_params", "_seed", "_n", "_error")}
    params: list[dict[str, Any]] = []
    for row in batch.to_pylist():
        h = row_hash(row)
        rid = row.get(id_column) if id_column else None
        rid = h if rid is None or str(rid) == "" else str(rid)
        err = None
        try:
            prompt = render(template, row, max_field_chars)
        except Exception as e:  # a malformed value should fail its row, not the job
            prompt, err = "", f"template: {type(e).__name__}: {e}"
        p = _row_params(row, rid, param_columns=param_columns, sampling=sampling, seed=seed)
        n = p.get("n", 1)
        # an invalid n gives one (error) output row; the actor reports the reason
        n = n if _is_int(n) and 1 <= n <= 1024 else 1
        params_json = json.dumps(p, sort_keys=True, default=str)
        params.append(json.loads(params_json))
        for k, v in (("_id", rid), ("_hash", h), ("prompt", prompt), ("_params", params_json),
                     ("_seed", int(p["seed"]) if _is_int(p["seed"]) else None), ("_n", n), ("_error", err)):
            cols[k].append(v)
    token_ids = tokenizer(ckpt_dir).encode_batch(cols["prompt"]) if cols["prompt"] else []
    for i, ids_i in enumerate(token_ids):
        if cols["_error"][i] is None:
            cols["_error"][i] = _length_error(len(ids_i), params[i], block_size)
    out = batch
    for name, values, typ in (
        ("_id", cols["_id"], pa.string()), ("_hash", cols["_hash"], pa.string()),
        ("prompt", cols["prompt"], pa.string()), ("_prompt_ids", token_ids, pa.list_(pa.int32())),
        ("_plen", [len(t) for t in token_ids], pa.int32()), ("_params", cols["_params"], pa.string()),
        ("_seed", cols["_seed"], pa.int64()), ("_n", cols["_n"], pa.int32()), ("_error", cols["_error"], pa.string()),
    ):
        out = _set_column(out, name, pa.array(values, type=typ))
    return out
