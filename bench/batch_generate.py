"""Benchmark: batch generation tokens/s through Ray Data (pipelines.generate.run) vs the gptcore Engine
called directly in one process, vs Hugging Face transformers `generate`, on the same weights, prompts
and batch size.

    .venv/bin/python bench/batch_generate.py [--prompts 2000] [--max-new-tokens 64] [--batch-size 32]
                                             [--repeats 3] [--threads 1] [--actors 2] [--out runs/bench/batch_generate]

Prompts: the first N articles of ../shared/data (bbc-news-summary, cnndm-frank, xsum-frank, scitldr),
templated "{article}\\n\\nTL;DR:" with the article cut to --field-chars characters. Model: preset "tiny"
(4 layers, 128 wide, block 256) with random weights and a 4096-token BPE trained on those articles
(throughput does not depend on the weights' values). Decoding is greedy with ignore_eos, so every
system generates exactly N x max_new_tokens tokens. Every model process uses --threads torch threads
(default 1: on a shared, oversubscribed 2-core box, OpenMP barriers make 2-thread decode of a small
model several times slower, which would swamp what we measure). "ray" runs one actor, i.e. the same
compute as "direct", so ray/direct isolates Ray Data's overhead (reading, tokenizing in tasks, plan,
actor start and checkpoint load, object transfer, committing shards); "ray2" runs --actors actors
(one per core) to show the 2-core throughput.
Each measurement runs in its own fresh process (no system shares an interpreter, thread pools or warm
caches with another), interleaved (direct, ray, ray2, hf, direct, ...) to spread machine noise;
medians and ratios are reported.
Does not: measure GPU throughput or quality.
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
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("RAYGPT_SHARED_DATA", REPO.parent / "shared" / "data"))
SOURCES = ["bbc-news-summary/bbc_news_summary.jsonl", "cnndm-frank/cnndm_test_frank.jsonl",
           "xsum-frank/xsum_test_frank.jsonl", "scitldr/scitldr_a.jsonl"]


def load_articles(n: int) -> list[dict]:
    rows = []
    for rel in SOURCES:
        with open(SHARED / rel) as f:
            for line in f:
                r = json.loads(line)
                rows.append({"id": r["id"], "article": r["article"]})
                if len(rows) == n:
                    return rows
    raise SystemExit(f"only {len(rows)} articles in {SHARED}; need {n}")


def build_checkpoint(cache: Path, rows: list[dict]) -> Path:
    import torch

    from gptcore.checkpoint import save_checkpoint
    from gptcore.config import preset
    from gptcore.model import GPT
    from gptcore.tokenizer import train_bpe

    ck = cache / "ckpt-tiny"
    if (ck / "checksums.json").exists():
        return ck
    tok = train_bpe((r["article"] for r in rows), vocab_size=4096)
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size))
    save_checkpoint(ck, model, tok, {"note": "bench: random weights"})
    return ck


def read_prompts(path: Path, field_chars: int) -> list[str]:
    from pipelines.generate.templates import render

    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [render("{article}\n\nTL;DR:", r, field_chars) for r in rows]


def run_direct(ck: Path, inp: Path, args) -> dict:
    """The gptcore Engine in this process, timed like a job (as the Ray run is): read the prompts, load
    the checkpoint, tokenize, sort by length (as the pipeline does), generate batch by batch."""
    import torch

    from gptcore.checkpoint import load_checkpoint
    from gptcore.engine import Engine
    from gptcore.sampling import SamplingParams

    t0 = time.perf_counter()
    prompts = read_prompts(inp, args.field_chars)
    c = load_checkpoint(ck)
    eng = Engine(c.model, c.tokenizer, device="cpu", dtype=torch.float32, max_batch_size=args.batch_size)
    sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True, truncate="left")
    ids = c.tokenizer.encode_batch(prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    toks = 0
    for s in range(0, len(order), args.batch_size):
        part = [ids[i] for i in order[s:s + args.batch_size]]
        for out in eng.generate(part, [sp] * len(part)):
            toks += sum(len(o.token_ids) for o in out.outputs)
    dt = time.perf_counter() - t0
    return {"tokens": toks, "seconds": dt, "tokens_per_s": toks / dt}


def run_ray(ck: Path, inp: Path, out: Path, args, concurrency: int, threads: int) -> dict:
    import shutil

    from pipelines.generate import GenerateConfig, run

    shutil.rmtree(out, ignore_errors=True)
    cfg = GenerateConfig(checkpoint=str(ck), input=str(inp), output=str(out), task="summarize",
                         max_field_chars=args.field_chars, chunk_rows=args.chunk_rows, batch_size=args.batch_size,
                         concurrency=concurrency, num_cpus=1, torch_threads=threads, quality="off",
                         sampling={"max_new_tokens": args.max_new_tokens, "temperature": 0.0, "ignore_eos": True,
                                   "truncate": "left"})
    t0 = time.perf_counter()
    s = run(cfg)
    dt = time.perf_counter() - t0
    return {"tokens": s["completion_tokens"], "seconds": dt, "tokens_per_s": s["completion_tokens"] / dt,
            "phase_seconds": s["phase_seconds"]}


def run_hf(hf_dir: Path, inp: Path, args) -> dict:
    """transformers generate on the exported weights, timed the same way (read, load, tokenize, generate)."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    t0 = time.perf_counter()
    prompts = read_prompts(inp, args.field_chars)
    model = GPT2LMHeadModel.from_pretrained(str(hf_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    block = model.config.n_positions
    keep = block - args.max_new_tokens
    ids = [x[-keep:] for x in tok(prompts)["input_ids"]]  # left-truncate like truncate="left"
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    toks = 0
    with torch.inference_mode():
        for s in range(0, len(order), args.batch_size):
            part = [ids[i] for i in order[s:s + args.batch_size]]
            enc = tok.pad({"input_ids": part}, return_tensors="pt")
            gen = model.generate(**enc, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            toks += (gen.shape[1] - enc["input_ids"].shape[1]) * gen.shape[0]
    dt = time.perf_counter() - t0
    return {"tokens": toks, "seconds": dt, "tokens_per_s": toks / dt}


def worker(args) -> dict:
    """One measurement in this (fresh) process; the parent starts one process per measurement."""
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ck = out / "ckpt-tiny"
    if args.worker == "direct":
        return run_direct(ck, out / "prompts.jsonl", args)
    if args.worker == "hf":
        return run_hf(out / "hf", out / "prompts.jsonl", args)
    import ray

    ray.init(num_cpus=max(2, args.actors), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        if args.worker == "ray":  # one actor: the same compute as "direct"
            return run_ray(ck, out / "prompts.jsonl", out / "gen", args, concurrency=1, threads=args.threads)
        if args.worker == "ray2":  # several actors (one per core)
            return run_ray(ck, out / "prompts.jsonl", out / "gen", args, concurrency=args.actors,
                           threads=args.threads)
        raise SystemExit(f"unknown system {args.worker}")
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--field-chars", type=int, default=300)
    ap.add_argument("--chunk-rows", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per model process")
    ap.add_argument("--actors", type=int, default=2, help="actors of the ray2 system")
    ap.add_argument("--systems", default="direct,ray,ray2,hf")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "batch_generate"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    import subprocess

    from gptcore.checkpoint import export_hf

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_articles(args.prompts)
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ck = build_checkpoint(out, rows)
    if not (out / "hf" / "config.json").exists():
        export_hf(ck, out / "hf")
    systems = args.systems.split(",")
    results: dict[str, list[dict]] = {s: [] for s in systems}
    base = [a for a in sys.argv[1:] if not a.startswith("--worker")]
    for rep in range(args.repeats):
        for s in systems:  # interleaved, so that machine noise spreads over every system
            # OMP_NUM_THREADS as Ray sets it for a 1-CPU actor: the same OpenMP set-up in every process
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
            p = subprocess.run([sys.executable, __file__, *base, "--worker", s], capture_output=True, text=True,
                               env=env)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                raise SystemExit(f"{s} failed ({p.returncode}):\n{p.stderr[-3000:]}")
            r = json.loads(line[-1][len("RESULT "):])
            results[s].append(r)
            print(f"[rep {rep}] {s:7s} {r['tokens']:6d} tokens in {r['seconds']:6.2f}s = "
                  f"{r['tokens_per_s']:8.1f} tok/s", flush=True)
    med = {s: statistics.median(x["tokens_per_s"] for x in v) for s, v in results.items()}
    summary = {"args": vars(args), "median_tokens_per_s": med, "runs": results,
               "ratios_vs_direct": {s: med[s] / med["direct"] for s in med} if "direct" in med else {}}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"median_tokens_per_s": med, "ratios_vs_direct": summary["ratios_vs_direct"]}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import run_main  # bench/ is not a package: its folder goes on sys.path

    sys.exit(run_main("batch_generate", main))
