"""Tokenizer throughput: raygpt `encode_batch` (tiktoken-backed) vs Hugging Face `tokenizers` `encode_batch`.

    .venv/bin/python bench/tokenizer.py [--threads 2] [--repeats 5] [--vocab-size 8192] [--tokenizer tokenizer.json]

Trains (or loads) one byte-level BPE, then encodes >= 5 MB of English from ../shared/data (wikitext-2,
gutenberg, tinyshakespeare, us-presidential-addresses, packed into ~8 KB documents) with both libraries on the
same number of threads, runs them interleaved, and prints a table of MB/s (median, min, max over the repeats)
and the ratio of medians against HF `encode_batch`. It also checks the ids are identical.
Does not: write files, assert on timings, or measure tokenizer training speed beyond one line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RAYGPT_SHARED_DATA", REPO.parent / "shared" / "data"))


def english_docs(doc_chars: int) -> list[str]:
    texts = [(SHARED / "wikitext-2" / "wiki.valid.tokens.txt").read_text(encoding="utf-8")]
    texts += [p.read_text(encoding="utf-8") for p in sorted((SHARED / "gutenberg").glob("*.txt"))]
    texts.append((SHARED / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8"))
    with open(SHARED / "us-presidential-addresses" / "addresses.jsonl", encoding="utf-8") as f:
        texts += [json.loads(line)["text"] for line in f if line.strip()]
    # Pack paragraphs into documents of about doc_chars characters (a realistic batch of many documents).
    docs: list[str] = []
    for text in texts:
        cur: list[str] = []
        size = 0
        for para in text.replace("\r\n", "\n").split("\n\n"):
            cur.append(para)
            size += len(para) + 2
            if size >= doc_chars:
                docs.append("\n\n".join(cur))
                cur, size = [], 0
        if cur:
            docs.append("\n\n".join(cur))
    return docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--doc-chars", type=int, default=8000)
    ap.add_argument("--tokenizer", help="an existing tokenizer.json instead of training one")
    args = ap.parse_args(argv)
    # HF's Rayon pool reads these once, at first use: set them before tokenizers is imported.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    sys.path.insert(0, str(REPO))
    from gptcore.tokenizer import Tokenizer, train_bpe

    if not SHARED.is_dir():
        print(f"shared data folder {SHARED} is absent (set RAYGPT_SHARED_DATA)", file=sys.stderr)
        return 2
    docs = english_docs(args.doc_chars)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    else:
        t0 = time.perf_counter()
        tok = train_bpe(docs, vocab_size=args.vocab_size)
        print(f"trained BPE vocab {tok.vocab_size} on {mb:.2f} MB in {time.perf_counter() - t0:.1f} s")
    hf = tok.hf_tokenizer(encode_special_tokens=True)

    cases = {
        "raygpt encode_batch (tiktoken)": lambda: tok.encode_batch(docs, num_threads=args.threads),
        "HF tokenizers encode_batch": lambda: [e.ids for e in hf.encode_batch(docs)],
        "HF tokenizers encode_batch_fast": lambda: [e.ids for e in hf.encode_batch_fast(docs)],
    }
    ref = None
    for name, fn in cases.items():  # warm-up + identical ids
        ids = fn()
        ref = ids if ref is None else ref
        if ids != ref:
            print(f"ids differ between raygpt and {name}", file=sys.stderr)
            return 1
    n_tokens = sum(map(len, ref))
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every case alike
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    base = statistics.median(times["HF tokenizers encode_batch"])
    print(
        f"{len(docs)} docs, {mb:.2f} MB UTF-8, {n_tokens:,} tokens, vocab {tok.vocab_size}, "
        f"{args.threads} threads, median of {args.repeats} runs; ids identical: yes"
    )
    print(f"| {'encoder':34} | MB/s median | MB/s min | MB/s max | Mtok/s | vs HF encode_batch |")
    print(f"|{'-' * 36}|-------------|----------|----------|--------|--------------------|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"| {name:34} | {mb / med:11.2f} | {mb / max(ts):8.2f} | {mb / min(ts):8.2f} | "
            f"{n_tokens / med / 1e6:6.2f} | {base / med:17.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import run_main  # bench/ is not a package: its folder goes on sys.path

    sys.exit(run_main("tokenizer", main))
