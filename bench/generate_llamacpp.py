"""Decoding speed: the gptcore engine vs llama.cpp (llama-cpp-python) on the same weights, same threads.

    PYTHONPATH=. .venv/bin/python bench/generate_llamacpp.py [--shapes tiny,gpt2] [--ftypes f32,f16,bf16]
        [--batches 1,16] [--prompt-len 16] [--new-tokens 128] [--repeats 5] [--threads 2] [--json out.json]
    PYTHONPATH=. .venv/bin/python bench/generate_llamacpp.py --shapes tiny --ftypes f32 --batches 1,4 \
        --new-tokens 16 --repeats 1                                                   # smoke run

For each shape (bench/generate.py's: tiny 4x128, vocab 4096; gpt2 = GPT-2 small 124 M; random init, seed 0) it
exports our model through its HF export to GGUF (bench/gguf_export.py) in each --ftype and loads that file
in llama.cpp through llama-cpp-python's C API (no text: token ids in, logits out, tokenizer "none"). Both
decode greedily the same random prompts (generate.py's: torch seed = batch size) for --new-tokens tokens
each, every row to the end (no EOS), as `batch` parallel sequences: llama.cpp gets one llama_batch per step
holding one token of each sequence (seq_id = row) after one prefill batch of all prompts, and greedy is
argmax over the returned logits (numpy, like our engine's). Ours is gptcore.engine.Engine at the matching
torch dtype: f32 -> float32 (equal precision), bf16 -> bfloat16 (equal), f16 -> bfloat16 (NOT equal: our
engine has no float16 CPU path; llama.cpp converts f16 weights to f32 or uses f16 dot products, so this
row compares different number formats of the same size). Threads: torch.set_num_threads(--threads) and
llama.cpp n_threads = n_threads_batch = --threads.
Alternates (ours, llama.cpp, llama.cpp, ours, ...) after one warm-up each; prints per row the median
tokens/s (batch x new tokens / wall of the whole generate, prefill included) of both, the ratio ours /
llama.cpp (goal >= 1.0 at equal precision), and how many greedy tokens agree (at f32 on tiny they should
all agree; a difference in accumulation order can flip a near-tie). Load averages at start and end, CPU
model and both peers' threads go to runs/bench/summary.json as "generate_llamacpp".
Needs the `bench` extra (gguf, llama-cpp-python: built from source with cmake and g++, minutes to hours).
Does not: time prefill separately, quantize (Q8/Q4), sample, or write BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from common import print_conditions, record  # noqa: E402 - bench/ is not a package

_QUIET = None  # keeps the no-op llama.cpp log callback alive
OUR_DTYPE = {"f32": "float32", "f16": "bfloat16", "bf16": "bfloat16"}


class LlamaCppDecoder:
    """A GGUF file loaded by llama.cpp, decoding `max_seqs` sequences in parallel by token ids."""

    def __init__(self, path: Path, max_seqs: int, prompt_len: int, max_len: int, threads: int):
        import llama_cpp

        self.lc = llama_cpp
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        cp = llama_cpp.llama_context_default_params()
        cp.n_seq_max = max_seqs
        cp.n_ctx = max_seqs * (max_len + 16)
        cp.n_batch = cp.n_ubatch = max(max_seqs * prompt_len, 32)  # the prefill of all prompts is one batch
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx {cp.n_ctx}, n_seq_max {max_seqs})")
        self.batch = llama_cpp.llama_batch_init(cp.n_batch, 0, 1)
        self.flash_attn = llama_cpp.llama_flash_attn_type_name(cp.flash_attn_type)

    def _decode(self, rows: list[tuple[int, int, int, bool]]):
        """rows: (token, position, sequence, want logits). Returns the logits of the flagged rows, in order."""
        import numpy as np

        b = self.batch
        n_out = 0
        for i, (tok, pos, seq, out) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
            n_out += out
        b.n_tokens = len(rows)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return np.ctypeslib.as_array(self.lc.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        rows = [(t, p, s, p == len(pr) - 1) for s, pr in enumerate(prompts) for p, t in enumerate(pr)]
        nxt = self._decode(rows).argmax(axis=1).tolist()
        out = [[t] for t in nxt]
        for step in range(1, new_tokens):
            nxt = self._decode([(t, len(prompts[s]) + step - 1, s, True) for s, t in enumerate(nxt)]
                               ).argmax(axis=1).tolist()
            for s, t in enumerate(nxt):
                out[s].append(t)
        return out

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def time_pair(ours, theirs, repeats: int) -> tuple[list[float], list[float], list, list]:
    """Warm-up, then alternate (ours, theirs), (theirs, ours), ...; wall seconds and the last outputs."""
    ours(), theirs()
    t_ours, t_theirs, o_toks, l_toks = [], [], None, None
    for r in range(repeats):
        for who in ((ours, theirs) if r % 2 == 0 else (theirs, ours)):
            t = time.perf_counter()
            toks = who()
            dt = time.perf_counter() - t
            if who is ours:
                t_ours.append(dt)
                o_toks = toks
            else:
                t_theirs.append(dt)
                l_toks = toks
    return t_ours, t_theirs, o_toks, l_toks


def first_divergence(a: list[list[int]], b: list[list[int]]) -> int | None:
    """Smallest generated-token index where any row differs (None when all agree)."""
    pos = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None) for ra, rb in zip(a, b)]
    pos = [p for p in pos if p is not None]
    return min(pos) if pos else None


def bench_row(shape: str, ftype: str, prompts: list[list[int]], engine, params, llama: LlamaCppDecoder,
              args) -> dict:
    """One table row: both decoders on the same prompts, alternating; tokens/s, ratio, greedy agreement."""
    def ours():
        return [o.outputs[0].token_ids for o in engine.generate(prompts, params)]

    t_ours, t_llama, o_toks, l_toks = time_pair(ours, lambda: llama.generate(prompts, args.new_tokens),
                                                args.repeats)
    B = len(prompts)
    n_tok = B * args.new_tokens
    agree = sum(a == b for x, y in zip(o_toks, l_toks) for a, b in zip(x, y)) / n_tok
    fa = llama.flash_attn
    row = dict(shape=shape, gguf=ftype, ours_dtype=OUR_DTYPE[ftype], equal_precision=ftype != "f16", batch=B,
               ours_tok_s=round(n_tok / statistics.median(t_ours), 1),
               llama_tok_s=round(n_tok / statistics.median(t_llama), 1),
               identical=o_toks == l_toks, token_agreement=round(agree, 4),
               first_divergence=first_divergence(o_toks, l_toks),
               ours_runs_s=[round(t, 3) for t in t_ours], llama_runs_s=[round(t, 3) for t in t_llama],
               kernel=engine.kernel, threads=args.threads,
               llama_flash_attn=fa.decode() if isinstance(fa, bytes) else fa)
    row["ratio"] = round(row["ours_tok_s"] / row["llama_tok_s"], 2)
    print(f"| {shape:5} | {ftype:4} vs {OUR_DTYPE[ftype]:8} | {engine.kernel:6} | {B:>5} | {row['ours_tok_s']:>10} | "
          f"{row['llama_tok_s']:>11} | {row['ratio']:>5} | {str(row['identical']):>9} | "
          f"{row['token_agreement']:>6} |", flush=True)
    return row


def bench_shape(shape: str, args, tmp: Path) -> list[dict]:
    import torch
    from generate import build
    from gguf_export import write_gguf

    from gptcore.engine import Engine
    from gptcore.sampling import SamplingParams

    model = build(shape)[0]
    V = model.config.vocab_size
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for ftype in args.ftypes.split(","):
        path = write_gguf(model, tmp / f"{shape}-{ftype}.gguf", ftype)
        dtype = getattr(torch, OUR_DTYPE[ftype])
        engines = {k: Engine(model, None, dtype=dtype, max_batch_size=max(64, max(batches)), kernel=k)
                   for k in args.kernel.split(",")}
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
        for B in batches:  # a llama.cpp context per batch size (n_seq_max = B)
            g = torch.Generator().manual_seed(B)
            prompts = torch.randint(0, V, (B, args.prompt_len), generator=g).tolist()
            llama = LlamaCppDecoder(path, B, args.prompt_len, args.prompt_len + args.new_tokens, args.threads)
            try:  # each of our kernels against the same llama.cpp context, one after the other
                for engine in engines.values():
                    row = bench_row(shape, ftype, prompts, engine, params, llama, args)
                    rows.append({**row, "gguf_mib": round(path.stat().st_size / 2**20, 1)})
            finally:
                llama.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,gpt2")
    ap.add_argument("--ftypes", default="f32,f16,bf16", help="GGUF weight types: f32, f16, bf16")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="threads of both: torch intra-op and llama.cpp")
    ap.add_argument("--kernel", default="auto", help="our Engine kernel(s), comma-separated: auto | gemv | onednn | "
                    "torch | model (each gets its own row against the same llama.cpp context)")
    ap.add_argument("--workdir", default="", help="where the GGUF files go (default: a temporary folder)")
    ap.add_argument("--json", default="", help="also write the rows as JSON to this file")
    ap.add_argument("--verbose", action="store_true", help="llama.cpp's own log on stderr")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    import llama_cpp

    if not args.verbose:  # llama.cpp's loader warns about the dummy tokens of the "none" vocabulary
        global _QUIET
        _QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_QUIET, None)

    start = print_conditions("generate_llamacpp", {"ours": torch.get_num_threads(), "llama.cpp": args.threads})
    print(f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, prompt {args.prompt_len} + "
          f"{args.new_tokens} new tokens, greedy, median of {args.repeats} runs; system: "
          f"{llama_cpp.llama_print_system_info().decode().strip()}", flush=True)
    print("| shape | GGUF vs ours     | kernel | batch | ours tok/s | llama tok/s | ratio | identical | agree  |",
          flush=True)
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="raygpt-gguf-"))
    rows = [r for shape in args.shapes.split(",") for r in bench_shape(shape, args, tmp)]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    record("generate_llamacpp", rows, start)


if __name__ == "__main__":
    main()
