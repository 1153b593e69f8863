"""Per-step counts of the prep: merging task stats, the checked drop ledger, length histograms.

    stats = {"steps": {}}; merge_stats(stats, part)           # on the driver, per task stats row
    ledger = check_ledger(stats, order, tombstones, alive)    # rows_in == rows_out + drops, chained

Every task reports per-step counts as JSON riding along its output; the driver merges them here and
checks them (against each other and against the tombstones that reached it) before the manifest is
written. Does not: run steps (pipelines.data.runner) or write anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MB = 1 << 20
HIST_EDGES = [0] + [int(round(10 ** (k / 4))) for k in range(0, 37)]  # doc length bins (chars): 1 .. 1e9


def new_entry() -> dict[str, Any]:
    return {"rows_in": 0, "rows_out": 0, "drops": {}, "seconds": 0.0, "chars_in": 0, "splits": False}


def merge_stats(total: dict[str, Any], part: dict[str, Any]) -> None:
    for name, e in part.get("steps", {}).items():
        t = total.setdefault("steps", {}).setdefault(name, new_entry())
        t["rows_in"] += e["rows_in"]
        t["rows_out"] += e["rows_out"]
        t["seconds"] += e["seconds"]
        t["chars_in"] += e["chars_in"]
        t["splits"] = t["splits"] or e.get("splits", False)
        for r, n in e["drops"].items():
            t["drops"][r] = t["drops"].get(r, 0) + n
    if "hist_read" in part:
        h = total.setdefault("hist_read", [0] * (len(HIST_EDGES) - 1))
        for k, n in enumerate(part["hist_read"]):
            h[k] += n
    for k in ("read_seconds",):
        total[k] = total.get(k, 0.0) + part.get(k, 0.0)


def hist(lengths: list[int] | np.ndarray) -> list[int]:
    if len(lengths) == 0:
        return [0] * (len(HIST_EDGES) - 1)
    return np.histogram(np.asarray(lengths), bins=HIST_EDGES)[0].astype(int).tolist()


def count_drop(e: dict[str, Any], reason: str) -> None:
    e["drops"][reason] = e["drops"].get(reason, 0) + 1


def check_ledger(stats: dict[str, Any], order: list[str], final_drops: dict[str, int],
                 alive_final: int) -> list[dict]:
    """Per-step counts in pipeline order, checked: rows_in == rows_out + drops, chained, and equal to
    the tombstones that reached the driver."""
    steps = stats.get("steps", {})
    ledger = []
    prev_out = None
    for name in order:
        e = steps.get(name, new_entry())
        drops = dict(sorted(e["drops"].items()))
        entry = {"step": name, "rows_in": e["rows_in"], "rows_out": e["rows_out"], "drops": drops}
        if e.get("splits"):
            entry["splits_rows"] = True
        elif e["rows_in"] != e["rows_out"] + sum(drops.values()):
            raise RuntimeError(f"ledger check failed for step {name!r}: rows_in {e['rows_in']} != rows_out "
                               f"{e['rows_out']} + drops {sum(drops.values())}")
        if prev_out is not None and e["rows_in"] != prev_out and not e.get("splits"):
            raise RuntimeError(f"ledger check failed: step {name!r} got {e['rows_in']} rows, the step before "
                               f"it passed {prev_out}")
        prev_out = e["rows_out"]
        ledger.append(entry)
    if prev_out is not None and prev_out != alive_final:
        raise RuntimeError(f"ledger check failed: last step passed {prev_out} rows, {alive_final} reached the writer")
    counted: dict[str, int] = {}
    for entry in ledger:
        for r, n in entry["drops"].items():
            key = r if ":" in r else f"{entry['step']}:{r}"
            counted[key] = counted.get(key, 0) + n
    if counted != final_drops and not any(e.get("splits_rows") for e in ledger):
        raise RuntimeError(f"ledger check failed: step drop counts {counted} != tombstones {final_drops}")
    return ledger


def no_usable_input_message(ledger: list[dict], problems: list[dict[str, str]]) -> str:
    parts = []
    for e in ledger:
        if e["drops"]:
            parts.append(f"{e['step']}: " + ", ".join(f"{r}={n}" for r, n in e["drops"].items()))
    ex = "; ".join(f"{p['source']} ({p['reason']})" for p in problems[:3])
    return ("no usable input: every document was dropped (" + ("; ".join(parts) or "no documents read") + ")"
            + (f"; e.g. {ex}" if ex else ""))


def step_times(stats: dict[str, Any]) -> dict[str, Any]:
    """Seconds, chars and MB/s per core of every step (timings.json)."""
    return {n: {"seconds": round(e["seconds"], 3), "chars_in": e["chars_in"],
                "mb_per_s": round(e["chars_in"] / MB / e["seconds"], 2) if e["seconds"] > 0 else None}
            for n, e in stats.get("steps", {}).items()}
