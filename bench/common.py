"""What every benchmark records about its conditions, and the machine-readable summary `make bench` writes.

    from common import conditions, print_conditions, record
    start = print_conditions("generate", threads={"ours": 2, "hf": 2})    # load average, CPU model, threads
    ...
    record("generate", rows, start)        # runs/bench/summary.json: {"generate": {...}, ...}

A ratio is only valid on a quiet machine: peers slow down differently under load. Each benchmark prints
`uptime`'s load averages at its start and end; a run whose 1-minute load average exceeded LOAD_LIMIT at
either end is marked `valid_for_goal: false` in the summary and must not be used for a goal in
BENCHMARKS.md. Does not: run any benchmark, or edit BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SUMMARY = Path(os.environ.get("RAYGPT_BENCH_SUMMARY", REPO / "runs" / "bench" / "summary.json"))
LOAD_LIMIT = 3.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def uptime_line() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        one, five, fifteen = os.getloadavg()
        return f"load average: {one:.2f}, {five:.2f}, {fifteen:.2f}"


def conditions(threads: dict[str, int] | None = None) -> dict[str, Any]:
    """The machine's state now: load averages, CPU model, cores, and each peer's thread count."""
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg": list(os.getloadavg()),
            "uptime": uptime_line(), "cpu_model": cpu_model(), "cores": os.cpu_count(),
            "threads": dict(threads or {})}


def print_conditions(name: str, threads: dict[str, int] | None = None) -> dict[str, Any]:
    c = conditions(threads)
    th = ", ".join(f"{k} {v}" for k, v in c["threads"].items()) or "-"
    print(f"[{name}] start: {c['uptime']} | CPU {c['cpu_model']} x{c['cores']} | threads: {th}", flush=True)
    if c["load_avg"][0] > LOAD_LIMIT:
        print(f"[{name}] WARNING: load average {c['load_avg'][0]:.2f} > {LOAD_LIMIT}: ratios from this run do not "
              f"count for a goal", flush=True)
    return c


def record(name: str, result: Any, start: dict[str, Any], command: str | None = None) -> dict[str, Any]:
    """Print the end conditions and merge this benchmark's result into runs/bench/summary.json."""
    end = conditions(start.get("threads"))
    print(f"[{name}] end: {end['uptime']}", flush=True)
    valid = max(start["load_avg"][0], end["load_avg"][0]) <= LOAD_LIMIT
    entry = {"result": result, "start": start, "end": end, "valid_for_goal": valid,
             "load_limit": LOAD_LIMIT, "command": command or " ".join(os.sys.argv)}
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    try:
        summary = json.loads(SUMMARY.read_text())
    except (OSError, ValueError):
        summary = {}
    summary[name] = entry
    tmp = SUMMARY.with_name(f".{SUMMARY.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    os.replace(tmp, SUMMARY)
    return entry


def memory_bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> float:
    """This machine's memory bandwidth in GB/s (1e9 B/s), as torch sees it: the best of `repeats` copies of a
    `size_mb` fp32 tensor into another (each copy reads and writes size_mb, so 2 x size bytes move)."""
    import torch

    n = size_mb * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch both (page faults out of the timing)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best / 1e9


def run_main(name: str, main: Any, threads: dict[str, int] | None = None) -> int:
    """A benchmark script's entry point: the load and CPU before, main(), the load after (summary.json)."""
    start = print_conditions(name, threads)
    rc = main()
    record(name, {"exit": rc or 0}, start)
    return int(rc or 0)

