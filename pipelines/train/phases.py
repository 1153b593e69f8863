"""Where a training run's fixed time goes: wall-clock marks (driver and rank 0) -> seconds per phase.

    marks = {"process_start": process_start(), "run_start": time.time(), ...}   # trainer.run, worker.py
    phase_seconds(marks)    # {"import": 1.9, "validate": 0.2, "ray_init": 3.1, ..., "to_first_step": 9.8}

Every mark is a `time.time()` on one machine's clock; `process_start` is the driver process's creation
time (psutil), so "import" covers the interpreter's start, the CLI's imports and the config load. A phase
runs from the previous mark present to its own, so the phases of a run add up to its wall time. Rank 0
records its marks in WorkerState.timeline and logs them in the "timeline" event of metrics.jsonl; the
driver merges them with its own into RUN_DIR/summary.json ("phase_seconds", "phase_marks").
Does not: time steady-state steps (metrics.jsonl's step_time_s does) or print anything.
"""

from __future__ import annotations

import os
import time
from typing import Any

# (mark, the phase that ends at it), in the order a run passes them
MARKS: list[tuple[str, str]] = [
    ("process_start", ""),
    ("run_start", "import"),            # interpreter start, CLI + config, `import pipelines.train.trainer`
    ("validated", "validate"),          # dataset, init checkpoint, run dir, compiler checks
    ("ray_ready", "ray_init"),          # ensure_ray (a local Ray: GCS, raylet, dashboard; or joining one),
                                        # while a thread imports ray.train.torch (torch) on the driver
    ("ray_imported", "driver_ray_import"),  # the rest of those imports (~0)
    ("fit_start", "driver_setup"),      # resources check, config.json, TorchTrainer
    ("worker_start", "worker_group"),   # Ray Train controller, placement group, worker actors, process group
    ("imports_done", "worker_import"),  # torch, gptcore, deepspeed in the worker
    ("data_ready", "data_open"),        # manifest, shard readers, eval batches
    ("model_ready", "model_build"),     # the GPT (seeded) or an init checkpoint
    ("engine_ready", "deepspeed_init"),  # optimizer + deepspeed.initialize (+ engine.compile(), lazy)
    ("loop_ready", "restore_and_metrics"),  # the checkpoint Ray hands over, metrics logger, MFU peak
    ("first_step_done", "first_step"),  # forward + backward + AdamW; torch.compile's compilation when on
    ("last_step_done", "steps"),        # every other step, evaluations and checkpoints included
    ("worker_done", "final_eval_checkpoint"),  # the last evaluation and checkpoint (commit, last/, best/)
    ("fit_end", "ray_train_teardown"),  # worker group and controller shut down, fit() returns
    ("summary_done", "summary"),        # metrics read back, loss-curve PNG, summary.json
]
PHASES = [p for _, p in MARKS if p]


def process_start() -> float:
    """When this process was created (wall clock), or now where psutil cannot tell."""
    try:
        import psutil

        return float(psutil.Process(os.getpid()).create_time())
    except Exception:  # psutil missing or /proc unreadable: the phases then start at the first mark
        return time.time()


def phase_seconds(marks: dict[str, Any]) -> dict[str, float]:
    """Seconds per phase (rounded to ms), each from the previous mark present; plus the totals
    "to_first_step" (process start -> first optimizer step done) and "wall" (-> the last mark)."""
    out: dict[str, float] = {}
    prev = None
    for mark, phase in MARKS:
        t = marks.get(mark)
        if not isinstance(t, (int, float)):
            continue
        if prev is not None and phase:
            out[phase] = round(t - prev, 3)
        prev = t
    start = marks.get("process_start")
    if isinstance(start, (int, float)):
        if isinstance(marks.get("first_step_done"), (int, float)):
            out["to_first_step"] = round(marks["first_step_done"] - start, 3)
        if prev is not None:
            out["wall"] = round(prev - start, 3)
    return out
