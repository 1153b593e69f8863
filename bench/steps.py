"""Per-step throughput of the data-prep cleaning steps (single process), next to HF tokenizers.

    .venv/bin/python bench/steps.py [--mb 30] [--repeats 3] [--batch-rows 512] [--steps a,b]

Builds ~N MB of English documents from ../shared/data (books and speeches split into ~4 KB
documents, news/science articles as they are; cycled to reach N MB), then times every registered
step alone on the same batches (median of --repeats runs) and, in the same script as the peer,
`tokenizers` BPE encode_batch on one thread over a 1 MB slice of the same text, re-timed next to
each step run. Prints medians of MB/s per step, of the peer, and of the per-run ratio. Does not: start Ray or time the whole pipeline (bench/prep.py does).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the peer runs on one core, like each step
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("RAYGPT_SHARED_DATA", REPO.parent / "shared" / "data"))


def english_docs(target_bytes: int, doc_chars: int = 4000) -> list[str]:
    """Real English documents from ../shared/data, cycled up to target_bytes of UTF-8."""
    base: list[str] = []
    books = [*sorted((SHARED / "gutenberg").glob("*.txt")), SHARED / "tinyshakespeare" / "input.txt",
             *sorted((SHARED / "wikitext-2").glob("*.txt")), *sorted((SHARED / "nltk-webtext").glob("*.txt"))]
    for p in books:
        if not p.exists():
            continue
        text = p.read_bytes().decode("utf-8", "replace")
        cur: list[str] = []
        size = 0
        for para in text.replace("\r\n", "\n").split("\n\n"):
            cur.append(para)
            size += len(para) + 2
            if size >= doc_chars:
                base.append("\n\n".join(cur))
                cur, size = [], 0
        if cur:
            base.append("\n\n".join(cur))
    for folder, field in (("us-presidential-addresses", "text"), ("bbc-news-summary", "article"),
                          ("cnndm-frank", "article"), ("xsum-frank", "article"), ("scitldr", "article")):
        for p in sorted((SHARED / folder).glob("*.jsonl")):
            for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                t = rec.get(field) or rec.get("text") or rec.get("article")
                if isinstance(t, list):
                    t = "\n".join(map(str, t))
                if isinstance(t, str) and t.strip():
                    base.append(t)
    if not base:
        raise SystemExit(f"no English text found under {SHARED}")
    docs, total, k = [], 0, 0
    while total < target_bytes:
        d = base[k % len(base)]
        docs.append(d)
        total += len(d.encode("utf-8"))
        k += 1
    return docs


def batches_of(docs: list[str], rows: int, raw: bool):
    from pipelines.data.steps import make_batch

    out = []
    for s in range(0, len(docs), rows):
        chunk = docs[s: s + rows]
        if raw:
            out.append(make_batch([""] * len(chunk), raw=[d.encode("utf-8") for d in chunk]))
        else:
            out.append(make_batch(chunk))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=30.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-rows", type=int, default=512)
    ap.add_argument("--steps", default="", help="comma-separated step names (default: all registered)")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    args = ap.parse_args()

    from pipelines.data.steps import STEP_REGISTRY, build_step

    docs = english_docs(int(args.mb * 1e6))
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(f"corpus: {len(docs)} documents, {mb:.1f} MB of English from {SHARED}", flush=True)

    # peer: HF tokenizers BPE (8k vocab trained on the first 5 MB) encode_batch on one thread, over
    # a fixed ~1 MB slice; it is re-timed next to every step (the machine is shared: load varies)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    sample, size = [], 0
    for d in docs:
        sample.append(d)
        size += len(d)
        if size > 5e6:
            break
    tok.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=8192, show_progress=False))
    peer_docs, size = [], 0
    for d in docs[::7]:
        peer_docs.append(d)
        size += len(d.encode("utf-8"))
        if size > 1e6:
            break
    peer_mb = size / 1e6

    def peer_once() -> float:
        t = time.perf_counter()
        tok.encode_batch(peer_docs)
        return peer_mb / (time.perf_counter() - t)

    names = [s for s in args.steps.split(",") if s] or sorted(STEP_REGISTRY)
    order = ["decode", "fix_text", "normalize_whitespace", "html_extract", "strip_boilerplate",
             "language_id", "gopher_quality", "gopher_repetition", "c4_lines", "pii_redact",
             "min_length", "max_length"]
    names.sort(key=lambda n: order.index(n) if n in order else len(order))
    plain = batches_of(docs, args.batch_rows, raw=False)
    raw = batches_of(docs, args.batch_rows, raw=True)
    results = {"corpus_mb": mb, "docs": len(docs), "peer": "tokenizers BPE-8k encode_batch, 1 thread",
               "steps": {}}
    print(f"{'step':24s} {'MB/s':>9s} {'peer MB/s':>10s} {'ratio':>8s}  (medians of {args.repeats})")
    for name in names:
        step = build_step(name, {})
        data = raw if name == "decode" else plain
        step(data[0])  # warm-up: lazy models/tables load outside the timing
        speeds, peers, ratios = [], [], []
        for _ in range(args.repeats):
            gc.collect()
            p = peer_once()
            t = time.perf_counter()
            for b in data:
                step(b)
            v = mb / (time.perf_counter() - t)
            speeds.append(v)
            peers.append(p)
            ratios.append(v / p)
        kept = sum(1 for b in data for d in step(b)["drop"] if not d)
        r = {"mb_s": statistics.median(speeds), "peer_mb_s": statistics.median(peers),
             "ratio_to_peer": statistics.median(ratios), "kept": kept, "rows": len(docs)}
        results["steps"][name] = r
        print(f"{name:24s} {r['mb_s']:9.2f} {r['peer_mb_s']:10.2f} {r['ratio_to_peer']:7.1f}x  "
              f"(kept {kept}/{len(docs)})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import run_main  # bench/ is not a package: its folder goes on sys.path

    sys.exit(run_main("steps", main))
