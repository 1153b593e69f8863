"""Run every benchmark, one after another, each as its own process (`make bench`).

    make bench                              # all of them, with each script's own defaults
    NANOGPT_DIR=~/nanoGPT make bench        # ... and nanoGPT's own train.py next to `raygpt train`
    .venv/bin/python bench/run_all.py tokenizer prep     # a subset, by name

Each script prints its table and the command that reproduces it; the figures in BENCHMARKS.md come
from these scripts (medians of several runs, ratios against a peer in the same script). They run
sequentially because two benchmarks sharing 2 cores would measure each other. Needs ../shared/data.
Every benchmark runs between two load-average readings; runs/bench/summary.json gets one entry per
benchmark (exit code, wall, load at start and end, CPU model, `valid_for_goal`: false when the 1-minute
load average was above 3 at either end) plus whatever the script itself records there through
bench/common.py. Does not: edit BENCHMARKS.md (scripts that can, do so only with their own --write-md flag).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SUMMARY, print_conditions, record  # noqa: E402 - bench/ is not a package

# name -> (script, arguments): the configurations BENCHMARKS.md reports
BENCHES = {
    "tokenizer": ("tokenizer", []),
    "steps": ("steps", []),
    "prep": ("prep", ["--mb", "64", "--repeats", "3", "--variants", "core,clean"]),
    "generate": ("generate", ["--repeats", "5"]),
    "train-a": ("train", ["a", "--repeats", "3"]),
    "train-b": ("train", ["b-sliced", "--rounds", "10"]),
    "train-c": ("train", ["c", "--repeats", "3"]),
    "train-fast": ("train", ["fast", "--repeats", "3"]),  # the fast recipe cold, against its AdamW form (issue 17)
    "batch_generate": ("batch_generate", ["--prompts", "2000", "--repeats", "3"]),
    "serve": ("serve", ["--rounds", "3"]),
}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        script, args = BENCHES[name]
        if name == "train-a" and os.environ.get("NANOGPT_DIR"):  # nanoGPT's own train.py as a peer, taking turns
            args = ["a-sliced", "--rounds", "16", "--nanogpt", os.environ["NANOGPT_DIR"]]
        cmd = [sys.executable, str(HERE / f"{script}.py"), *args]
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        start = print_conditions(f"run_all {name}")
        t0 = time.time()
        rc = subprocess.call(cmd)
        print(f"=== {name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
        record(f"run_all/{name}", {"exit": rc, "wall_s": round(time.time() - t0, 1)}, start, " ".join(cmd))
        if rc != 0:
            failed.append(name)
    print(f"summary: {SUMMARY}")
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
