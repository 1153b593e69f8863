"""Whole-process training benchmarks: the fixed overhead of `raygpt train`, and cold runs against nanoGPT.

    .venv/bin/python bench/train.py overhead [--repeats 5] [--compile] [launcher=ray ...]  # phases to step 1
    .venv/bin/python bench/train.py cold --nanogpt DIR [--repeats 3] [--fast] [--ray-too] [key=value ...]
    .venv/bin/python bench/train.py fast [--repeats 3] [key=value ...]      # the fast recipe vs its AdamW form

`overhead`: `raygpt train` with the nanoGPT recipe (jobs/configs/train-shakespeare-char.yaml, compile off unless
--compile, 20 steps, no evaluation, only the final checkpoint), N whole processes one after another; per run
the phases the trainer records itself (summary.json "phase_seconds", pipelines/train/phases.py), the exit
(summary written -> process gone, measured here) and the CPU seconds of every process of the run (the
driver, Ray's own processes, Ray Train's actors, the worker: polled with psutil every 0.2 s); printed are
the medians per phase and per process kind. `--compile` turns compile on with an empty inductor cache.

`cold`: whole processes, alternating within each repeat: nanoGPT's train.py with its README CPU command
(2000 iterations, evaluations every 250; a checkout in DIR, outside this repository, run with this
Python) and `raygpt train --config jobs/configs/train-shakespeare-char.yaml` (+ key=value overrides); with
--fast also `jobs/configs/train-shakespeare-char-fast.yaml`. Cold for every run: a new local Ray (its own
process, RAY_ADDRESS unset) and an empty torch compile cache (a fresh TORCHINDUCTOR_CACHE_DIR). Reported:
wall from process start to exit (medians and ranges), final val losses, the raygpt/nanoGPT wall ratio
per repeat, raygpt's phases, and the load average at the start and end (bench/common.py; summary.json).
`fast`: the fast recipe (jobs/configs/train-shakespeare-char-fast.yaml, Muon) and the same recipe with
FAST_ADAMW's overrides (what it was before Muon: AdamW, 560 steps), alternating whole cold processes;
reported: the time from process start to the first evaluation with val loss <= 1.88 (the goal: <= 45 s),
the wall to exit and the final val loss of each.
Does not: write BENCHMARKS.md, or assert goals.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "bench" / "train"
RECIPE = REPO / "jobs" / "configs" / "train-shakespeare-char.yaml"
FAST = REPO / "jobs" / "configs" / "train-shakespeare-char-fast.yaml"
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]  # its README
# (substring of a process's name + command line, kind), first match wins: Ray's actors are titled "ray::Class"
PROCESS_KINDS = (("ray::RayTrainWorker", "train worker"), ("ray::TrainController", "train controller"),
                 ("ray::DashboardAgent", "ray: dashboard"), ("ray::RuntimeEnvAgent", "ray: runtime env agent"),
                 ("ray::IDLE", "ray: idle workers"), ("ray::", "ray train: other actors"),
                 ("dashboard", "ray: dashboard"), ("monitor", "ray: monitors"), ("resource_tracker", "other"), ("raygpt", "driver"),
                 ("pipelines.cli", "driver"))


def _env(cache_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a new local Ray for every run
    env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # an empty compile cache
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])  # this checkout
    return env


def _kind(name: str, cmdline: str) -> str:
    if name in ("gcs_server", "raylet"):  # binaries (the raylet's command line names the dashboard agent's)
        return f"ray: {name}"
    for key, kind in PROCESS_KINDS:
        if key in cmdline:
            return kind
    return "other"


def run_process(cmd: list[str], cwd: Path, log: Path, cpu: bool = False) -> dict:
    """One whole process in a fresh compile cache -> wall (spawn to exit), exit code and CPU s per process kind."""
    import psutil

    cache = tempfile.mkdtemp(prefix="raygpt-bench-inductor-")
    cpu_of: dict[int, tuple[str, float]] = {}
    try:
        with open(log, "w") as out:
            t0 = time.time()
            p = subprocess.Popen(cmd, cwd=cwd, env=_env(cache), stdout=out, stderr=subprocess.STDOUT)
            root = psutil.Process(p.pid)
            while p.poll() is None:
                if cpu:
                    for q in [root, *root.children(recursive=True)]:
                        try:
                            with q.oneshot():
                                ct = q.cpu_times()
                                kind = _kind(q.name(), q.name() + " " + " ".join(q.cmdline()))  # a worker's title changes
                                cpu_of[q.pid] = (kind, ct.user + ct.system)
                        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                            pass
                time.sleep(0.2)
            end = time.time()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    by_kind: dict[str, float] = {}
    for kind, s in cpu_of.values():
        by_kind[kind] = round(by_kind.get(kind, 0.0) + s, 2)
    return {"rc": p.returncode, "start": t0, "end": end, "wall_s": end - t0, "cpu_s": by_kind,
            "cpu_total_s": round(sum(by_kind.values()), 2)}


def raygpt_cmd(recipe: Path, data: Path, run_dir: Path, overrides: list[str]) -> list[str]:
    exe = Path(sys.executable).with_name("raygpt")
    head = [str(exe)] if exe.is_file() else [sys.executable, "-m", "pipelines.cli"]
    return [*head, "train", "--config", str(recipe), f"data={data}", f"run_dir={run_dir}", "log.progress=false",
            *overrides]


def raygpt_process(name: str, recipe: Path, data: Path, overrides: list[str], cpu: bool = False) -> dict:
    """`raygpt train` as its own process -> wall, val loss, phases (its summary.json) and the exit time."""
    rd = RUNS / name
    shutil.rmtree(rd, ignore_errors=True)
    rd.parent.mkdir(parents=True, exist_ok=True)
    r = run_process(raygpt_cmd(recipe, data, rd, overrides), REPO, rd.with_suffix(".log"), cpu=cpu)
    if r["rc"] != 0:
        raise RuntimeError(f"raygpt train failed (exit {r['rc']}): see {rd.with_suffix('.log')}")
    s = json.loads((rd / "summary.json").read_text())
    phases = dict(s.get("phase_seconds") or {})
    done = (s.get("phase_marks") or {}).get("summary_done")
    if done:
        phases["exit"] = round(r["end"] - done, 3)  # summary written -> process gone (Ray shutdown, teardown)
    evals = [json.loads(ln) for ln in (rd / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    start = (s.get("phase_marks") or {}).get("process_start", r["start"])
    hit = [e["time"] - start for e in evals if e.get("val_loss", 9) <= 1.88]
    return {**r, "val_loss": s.get("final_val_loss"), "phases": phases, "tokens_per_s": s.get("median_tokens_per_s"),
            "eval_s": s.get("eval_seconds"), "checkpoint_s": s.get("checkpoint_seconds"),
            "eval_share": s.get("eval_share"), "checkpoint_share": s.get("checkpoint_share"),
            "time_to_1.88_s": hit[0] if hit else None}


def nanogpt_process(root: Path, name: str) -> dict:
    """nanoGPT's train.py, README CPU command, as its own process -> wall and its last val loss."""
    out = RUNS / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    r = run_process([sys.executable, "train.py", *NANOGPT_ARGS, f"--out_dir={out}"], root, out / "log.txt")
    text = (out / "log.txt").read_text()
    if r["rc"] != 0:
        raise RuntimeError(f"nanoGPT train.py failed (exit {r['rc']}): see {out / 'log.txt'}")
    vals = re.findall(r"^step (\d+): train loss [0-9.]+, val loss ([0-9.]+)", text, re.M)
    return {**r, "val_loss": float(vals[-1][1]) if vals else None}


# the fast recipe as it was before optim.name=muon (sessions 8-15): 2 x 192, AdamW only, 560 steps, evaluation every 70
FAST_ADAMW = ["optim.name=adamw", "model.n_embd=192", "model.activation=gelu_tanh", "max_steps=560",
              "optim.decay_steps=560", "eval_interval=70"]


def fast(data: Path, repeats: int, overrides: list[str]) -> dict:
    """The fast recipe (+ overrides) and its AdamW form, alternating whole cold processes."""
    runs: dict[str, list[dict]] = {"muon": [], "adamw": []}
    for i in range(repeats):
        for who in (["muon", "adamw"] if i % 2 == 0 else ["adamw", "muon"]):
            over = overrides if who == "muon" else [*overrides, *FAST_ADAMW]
            r = raygpt_process(f"fast-{who}-{i}", FAST, data, over)
            runs[who].append(r)
            print(json.dumps({"repeat": i, "who": who, "wall_s": round(r["wall_s"], 1), "val_loss": r["val_loss"],
                              "to_first_step": r["phases"].get("to_first_step"),
                              "time_to_1.88_s": r.get("time_to_1.88_s"), "load": os.getloadavg()[0]}), flush=True)
    out: dict = {who: {"time_to_1.88_s": _stats([r["time_to_1.88_s"] for r in rs]),
                       "reached_1.88": f"{sum(r['time_to_1.88_s'] is not None for r in rs)}/{len(rs)}",
                       "wall_s": _stats([r["wall_s"] for r in rs]), "val_loss": [r["val_loss"] for r in rs],
                       "tokens_per_s": _stats([r["tokens_per_s"] for r in rs]),
                       "phase_seconds_median": _phase_medians(rs, "phases")} for who, rs in runs.items()}
    out["adamw_vs_muon_time_to_1.88"] = _stats([b["time_to_1.88_s"] / a["time_to_1.88_s"]
                                                for a, b in zip(runs["muon"], runs["adamw"])
                                                if a["time_to_1.88_s"] and b["time_to_1.88_s"]])
    out["goal"] = {"fast recipe": "val <= 1.88 in <= 45 s cold"}
    out["overrides"], out["adamw_overrides"], out["runs"] = overrides, FAST_ADAMW, runs
    return out


def _stats(xs: list[float]) -> dict:
    xs = [x for x in xs if isinstance(x, (int, float))]
    if not xs:
        return {}
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3)}


def _phase_medians(runs: list[dict], key: str) -> dict:
    from pipelines.train.phases import PHASES

    seen = set(k for r in runs for k in r.get(key, {}))
    names = [p for p in [*PHASES, "exit", "to_first_step", "wall"] if p in seen] + sorted(seen - {*PHASES, "exit",
                                                                                                "to_first_step", "wall"})
    return {k: round(statistics.median(r[key][k] for r in runs if k in r.get(key, {})), 3) for k in names}


def overhead(data: Path, repeats: int, compile: bool, steps: int = 20, overrides: list[str] | None = None) -> dict:
    """`raygpt train` (the recipe, `steps` steps) N times as whole processes -> medians per phase and CPU."""
    over = [f"max_steps={steps}", "eval_interval=0", "ckpt_interval=0", f"compile={'true' if compile else 'false'}",
            *(overrides or [])]
    runs = []
    for i in range(repeats):
        r = raygpt_process(f"overhead-{i}", RECIPE, data, over, cpu=True)
        runs.append(r)
        print(json.dumps({"repeat": i, "wall_s": round(r["wall_s"], 2), **r["phases"],
                          "cpu_total_s": r["cpu_total_s"], "load": os.getloadavg()[0]}), flush=True)
    med = _phase_medians(runs, "phases")
    print(f"\nphase (median of {repeats} runs, compile {'on, cold cache' if compile else 'off'})      seconds")
    for k, v in med.items():
        print(f"  {k:28s} {v:8.3f}")
    return {"compile": compile, "steps": steps, "overrides": overrides or [], "phase_seconds_median": med, "wall_s": _stats([r["wall_s"] for r in runs]),
            "cpu_seconds_median": _phase_medians(runs, "cpu_s"), "cpu_total_s": _stats([r["cpu_total_s"] for r in runs]),
            "runs": runs}


def cold(data: Path, nanogpt: Path, repeats: int, overrides: list[str], fast: bool, ray_too: bool = False) -> dict:
    """Alternating whole cold processes: nanoGPT's README command vs `raygpt train` (+ the fast recipe; + the
    recipe with launcher=ray: Ray Train's worker actors on a fresh local Ray, where auto runs one worker locally)."""
    extra = (["raygpt-ray"] if ray_too else []) + (["raygpt-fast"] if fast else [])
    runs: dict[str, list[dict]] = {"nanogpt": [], "raygpt": [], **{k: [] for k in extra}}
    for i in range(repeats):
        order = ["nanogpt", "raygpt"] if i % 2 == 0 else ["raygpt", "nanogpt"]
        for who in order + extra:
            if who == "nanogpt":
                r = nanogpt_process(nanogpt, f"cold-nanogpt-{i}")
            else:
                over = {"raygpt": overrides, "raygpt-ray": [*overrides, "launcher=ray"]}.get(who, [])
                r = raygpt_process(f"cold-{who}-{i}", FAST if who == "raygpt-fast" else RECIPE, data, over)
            runs[who].append(r)
            print(json.dumps({"repeat": i, "who": who, "wall_s": round(r["wall_s"], 1), "val_loss": r["val_loss"],
                              **({"to_first_step": r["phases"].get("to_first_step"),
                                  "time_to_1.88_s": r.get("time_to_1.88_s")} if "phases" in r else {}),
                              "load": os.getloadavg()[0]}), flush=True)
    out: dict = {who: {"wall_s": _stats([r["wall_s"] for r in rs]), "val_loss": [r["val_loss"] for r in rs]}
                 for who, rs in runs.items()}
    out["raygpt_vs_nanogpt_wall"] = _stats([a["wall_s"] / b["wall_s"] for a, b in zip(runs["raygpt"], runs["nanogpt"])])
    if ray_too:
        out["raygpt-ray"]["phase_seconds_median"] = _phase_medians(runs["raygpt-ray"], "phases")
        out["raygpt_ray_vs_nanogpt_wall"] = _stats([a["wall_s"] / b["wall_s"]
                                                   for a, b in zip(runs["raygpt-ray"], runs["nanogpt"])])
    out["raygpt"]["phase_seconds_median"] = _phase_medians(runs["raygpt"], "phases")
    out["raygpt"]["eval_s"] = _stats([r["eval_s"] for r in runs["raygpt"]])
    out["raygpt"]["checkpoint_s"] = _stats([r["checkpoint_s"] for r in runs["raygpt"]])
    out["raygpt"]["eval_plus_checkpoint_share"] = _stats([(r["eval_share"] or 0) + (r["checkpoint_share"] or 0)
                                                          for r in runs["raygpt"]])  # goal < 0.05
    if fast:
        out["raygpt-fast"]["time_to_1.88_s"] = [r["time_to_1.88_s"] for r in runs["raygpt-fast"]]
    out["goal"] = {"raygpt/nanogpt wall": "<= 0.67", "fast recipe": "val <= 1.88 in <= 45 s cold"}
    out["overrides"] = overrides
    out["runs"] = runs
    return out
