"""`raygpt prep` against datatrove (HuggingFace's data-processing library) on the same input and the same 2 cores.

    PYTHONPATH=. .venv/bin/python bench/prep_datatrove.py [--mb 64] [--repeats 3] [--ours clean|match]
        [--tasks 2] [--workers 2] [--workdir DIR]
    PYTHONPATH=. .venv/bin/python bench/prep_datatrove.py --mb 4 --repeats 1      # smoke run

Input: bench/prep.py's corpus (>= --mb MB of English JSONL cycled from ../shared/data, each cycle's copies
prefixed "Copy k.", so they are near-duplicates) and its tokenizer (BPE 8192 trained on the first 4,000
documents, not timed). Both sides tokenize with that same tokenizer.json, offline.

Alternating, --repeats times, each in a fresh process timed from start to exit with peak RSS summed over its
process tree (bench/prep.py's sampler):
  ours       `raygpt prep` (pipelines.data, local Ray with 2 CPUs) on corpus.jsonl, with bench/prep.py's
             `clean` steps (normalize_whitespace, gopher_quality, exact_dedup, fuzzy_dedup) or, --ours match,
             only gopher_quality + fuzzy_dedup; then tokenize, pack, write shards + manifest.
  datatrove  its own LocalPipelineExecutor, `--tasks` tasks on `--workers` processes, 4 executors run in order:
             1. JsonlReader -> GopherQualityFilter -> JsonlWriter (kept docs) -> MinhashDedupSignature
             2. MinhashDedupBuckets (one task per bucket)      3. MinhashDedupCluster (1 task)
             4. JsonlReader (kept docs) -> MinhashDedupFilter -> DocumentTokenizer (same tokenizer.json, EOS
                appended, no shuffle, no merge: less work than a user's full datatrove tokenization)
             datatrove shards its input by file, so it reads the same bytes split into --tasks contiguous files.
MinHash is set alike: word 5-grams, 20 bands x 6 rows (ours also verifies candidates at Jaccard 0.8;
datatrove drops every bucket match). Gopher quality uses both libraries' defaults (same Gopher thresholds;
datatrove splits words with spaCy's blank English tokenizer, ours with str.split()).
Prints per run and as medians (with min-max): wall, MB/s (input MB / wall), peak RSS, and the drop counts
by filter of both; the ratio ours / datatrove; load averages at start and end (bench/common.py), and records
the result as `prep_datatrove` in runs/bench/summary.json.
Needs the `bench` extra (datatrove, spacy, xxhash, orjson). Does not: edit BENCHMARKS.md, run datatrove's
DocumentTokenizerMerger, or download anything (no hub tokenizer, no spaCy model: spacy.blank only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import print_conditions, record  # noqa: E402
from prep import MB, REPO, VARIANT_STEPS, _tree_rss, build_corpus, run_pipeline, write_config  # noqa: E402

EOS = "<|endoftext|>"
NGRAMS, BANDS, ROWS = 5, 20, 6  # our fuzzy_dedup defaults (pipelines/data/dedup.py FuzzyDedupConfig)
VARIANT_STEPS.setdefault("match", "[{name: gopher_quality}, {name: fuzzy_dedup}]")


# ----------------------------------------------------------------------------------------------- input

def split_corpus(corpus: Path, parts: int, out: Path) -> Path:
    """corpus.jsonl cut into `parts` contiguous files of about equal bytes (datatrove shards by file)."""
    out.mkdir(parents=True, exist_ok=True)
    total = corpus.stat().st_size
    files = [(out / f"part-{i:03d}.jsonl").open("wb") for i in range(parts)]
    done = 0
    with corpus.open("rb") as f:
        for line in f:
            files[min(parts - 1, done * parts // max(total, 1))].write(line)
            done += len(line)
    for fh in files:
        fh.close()
    return out


def tokenizer_for(d: Path, corpus: Path) -> Path:
    """bench/prep.py's tokenizer: BPE 8192 trained on the first 4,000 documents (cached in the workdir)."""
    tok_path = d / "tokenizer.json"
    if not tok_path.exists():
        from gptcore.tokenizer import train_bpe

        docs = [json.loads(line)["text"] for _, line in zip(range(4000), corpus.open(encoding="utf-8"))]
        train_bpe(docs, 8192).save(tok_path)
    return tok_path


# ----------------------------------------------------------------------------------------------- datatrove

def datatrove_child(parts: Path, tok: Path, work: Path, tasks: int, workers: int) -> dict:
    """Run datatrove's 4 executors in this process (the parent times the whole process)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.filters import GopherQualityFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter

    cfg = MinhashConfig(n_grams=NGRAMS, num_buckets=BANDS, hashes_per_bucket=ROWS)
    kept, logs = work / "kept", work / "logs"
    stages = {
        "1_quality_signatures": LocalPipelineExecutor(pipeline=[
            JsonlReader(str(parts), glob_pattern="*.jsonl", text_key="text"),
            GopherQualityFilter(),
            JsonlWriter(str(kept), output_filename="${rank}.jsonl", compression=None),
            MinhashDedupSignature(output_folder=str(work / "sigs"), config=cfg),
        ], tasks=tasks, workers=workers, logging_dir=str(logs / "1")),
        "2_buckets": LocalPipelineExecutor(pipeline=[
            MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=cfg),
        ], tasks=BANDS, workers=workers, logging_dir=str(logs / "2")),
        "3_cluster": LocalPipelineExecutor(pipeline=[
            MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"), config=cfg),
        ], tasks=1, workers=1, logging_dir=str(logs / "3")),
        "4_filter_tokenize": LocalPipelineExecutor(pipeline=[
            JsonlReader(str(kept), glob_pattern="*.jsonl", text_key="text"),
            MinhashDedupFilter(input_folder=str(work / "remove")),
            DocumentTokenizer(output_folder=str(work / "tokens"), tokenizer_name_or_path=str(tok), eos_token=EOS,
                              shuffle_documents=False),
        ], tasks=tasks, workers=workers, logging_dir=str(logs / "4")),
    }
    seconds = {}
    for name, ex in stages.items():
        t = time.perf_counter()
        ex.run()
        seconds[name] = time.perf_counter() - t
    return {"stage_seconds": seconds, **datatrove_counts(logs)}


def datatrove_counts(logs: Path) -> dict:
    """Documents in, drops by filter (Gopher reason, MinHash) and tokens out, from the executors' stats.json."""
    def steps(stage: str) -> list[dict]:
        return json.loads((logs / stage / "stats.json").read_text())

    def stat(step: dict, key: str) -> int:
        v = step.get("stats", {}).get(key, 0)
        return int(v["total"] if isinstance(v, dict) else v)

    s1, s4 = steps("1"), steps("4")
    gopher = next(s for s in s1 if "Gopher" in s["name"])
    drops = {f"gopher_quality:{k.removeprefix('dropped_')}": stat(gopher, k)
             for k in gopher.get("stats", {}) if k.startswith("dropped_")}
    mh = next(s for s in s4 if "stage 4" in s["name"])
    drops["fuzzy_dedup:minhash"] = stat(mh, "dropped")
    tok = next(s for s in s4 if "TOKENIZER" in s["name"])
    return {"docs_in": stat(s1[0], "documents"), "drops": drops, "docs_out": stat(mh, "forwarded"),
            "tokens": stat(tok, "tokens")}


class PeakRSS:
    """Samples the summed RSS of a process tree every 50 ms in a thread, while the `with` block runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._th = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _tree_rss(self.pid))

    def __enter__(self) -> PeakRSS:
        self._th.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._th.join()


def run_datatrove(parts: Path, tok: Path, d: Path, tasks: int, workers: int) -> dict:
    """One datatrove run in a fresh process: wall from start to exit and peak RSS of its process tree."""
    work = d / "dt-work"
    shutil.rmtree(work, ignore_errors=True)  # datatrove skips tasks it finds completed in its logging dir
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(parts), str(tok), str(work),
           str(tasks), str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with PeakRSS(proc.pid) as rss:
        out, err = proc.communicate()
    wall = time.perf_counter() - t0
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # forkserver processes left by the run (its session only)
    if proc.returncode != 0:
        raise RuntimeError(f"datatrove failed ({proc.returncode}):\n{err.decode(errors='replace')[-4000:]}")
    shutil.rmtree(work, ignore_errors=True)
    return {"wall": wall, "peak_rss": rss.peak, **json.loads(out.decode().strip().splitlines()[-1])}


# ----------------------------------------------------------------------------------------------- ours

def our_counts(out: Path) -> dict:
    """Documents in, drops by step:reason and tokens out, from the manifest's ledger."""
    m = json.loads((out / "manifest.json").read_text())
    drops: dict[str, int] = {}
    for e in m["ledger"]:
        for r, n in e["drops"].items():
            key = r if ":" in r else f"{e['step']}:{r}"
            drops[key] = drops.get(key, 0) + n
    docs_in = m["ledger"][0]["rows_in"] if m["ledger"] else 0
    tokens = sum(s["tokens"] for s in m["splits"].values())
    return {"docs_in": docs_in, "drops": drops, "docs_out": docs_in - sum(drops.values()), "tokens": tokens}


def run_ours(cfg: Path, out: Path) -> dict:
    res = run_pipeline(cfg)
    res.pop("stderr", None)
    return {**res, **our_counts(out)}


# ----------------------------------------------------------------------------------------------- report

def med_range(xs: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def summarize(runs: dict[str, list[dict]], mbs: float) -> dict:
    out = {}
    for side, rs in runs.items():
        out[side] = {"wall_s": statistics.median(r["wall"] for r in rs),
                     "wall_range": [min(r["wall"] for r in rs), max(r["wall"] for r in rs)],
                     "mb_s": statistics.median(mbs / r["wall"] for r in rs),
                     "peak_rss_mib": statistics.median(r["peak_rss"] for r in rs) / MB,
                     "docs_in": rs[-1]["docs_in"], "docs_out": rs[-1]["docs_out"], "drops": rs[-1]["drops"],
                     "tokens": rs[-1]["tokens"]}
    ratios = [mbs / o["wall"] / (mbs / t["wall"]) for o, t in zip(runs["ours"], runs["datatrove"])]
    out["ratio_ours_over_datatrove"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out


def print_summary(runs: dict[str, list[dict]], s: dict, mbs: float) -> None:
    for side in ("ours", "datatrove"):
        rs = runs[side]
        print(f"{side:9s}: wall {med_range([r['wall'] for r in rs], '{:.1f}')} s, "
              f"{med_range([mbs / r['wall'] for r in rs])} MB/s, peak RSS {s[side]['peak_rss_mib']:.0f} MiB, "
              f"docs {s[side]['docs_in']} in -> {s[side]['docs_out']} out, {s[side]['tokens']} tokens")
        for k, n in sorted(s[side]["drops"].items()):
            if n:
                print(f"           drop {k}: {n}")
    r = s["ratio_ours_over_datatrove"]
    print(f"ratio ours / datatrove MB/s: median {r['median']:.2f}x (range {r['min']:.2f}-{r['max']:.2f}x, "
          f"per round); goal >= 3x")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        parts, tok, work, tasks, workers = sys.argv[2:7]
        print(json.dumps(datatrove_child(Path(parts), Path(tok), Path(work), int(tasks), int(workers))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=64.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ours", choices=("clean", "match"), default="clean",
                    help="clean: bench/prep.py's clean steps; match: only gopher_quality + fuzzy_dedup")
    ap.add_argument("--tasks", type=int, default=2, help="datatrove tasks (input files) per stage")
    ap.add_argument("--workers", type=int, default=2, help="datatrove worker processes (our Ray gets 2 CPUs)")
    ap.add_argument("--workdir", default="")
    args = ap.parse_args()
    start = print_conditions("prep_datatrove", threads={"ours_ray_cpus": 2, "datatrove_workers": args.workers})
    d = Path(args.workdir or tempfile.mkdtemp(prefix="raygpt-bench-prep-dt-"))
    d.mkdir(parents=True, exist_ok=True)
    corpus, size = build_corpus(d, args.mb)
    mbs = size / MB
    tok = tokenizer_for(d, corpus)
    parts = split_corpus(corpus, args.tasks, d / "dt-input")
    cfg = write_config(d, args.ours, corpus, tok)
    print(f"corpus: {mbs:.1f} MB ({corpus}; datatrove reads it as {args.tasks} files), tokenizer {tok}; "
          f"ours: {args.ours} chain", flush=True)
    runs: dict[str, list[dict]] = {"ours": [], "datatrove": []}
    for r in range(args.repeats):
        order = ("ours", "datatrove") if r % 2 == 0 else ("datatrove", "ours")
        for side in order:
            res = (run_ours(cfg, d / f"out-{args.ours}") if side == "ours"
                   else run_datatrove(parts, tok, d, args.tasks, args.workers))
            runs[side].append(res)
            extra = f", stages {', '.join(f'{k} {v:.1f}s' for k, v in res['stage_seconds'].items())}" \
                if side == "datatrove" else ""
            print(f"[{r}] {side}: {res['wall']:.1f}s wall = {mbs / res['wall']:.2f} MB/s, "
                  f"peak RSS {res['peak_rss'] / MB:.0f} MiB, {res['docs_out']}/{res['docs_in']} docs kept{extra}",
                  flush=True)
    s = summarize(runs, mbs)
    print_summary(runs, s, mbs)
    record("prep_datatrove", {"mb": mbs, "repeats": args.repeats, "ours_chain": args.ours,
                              "datatrove_tasks": args.tasks, "datatrove_workers": args.workers, **s}, start)


if __name__ == "__main__":
    main()
