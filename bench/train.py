"""Training throughput and time-to-loss: `raygpt train` (Ray Train + DeepSpeed) vs a plain PyTorch loop.

    .venv/bin/python bench/train.py --prepare-data          # runs/data/shakespeare-char (raygpt prep, nanoGPT's split)
    .venv/bin/python bench/train.py a [--repeats 3]         # (a) 1 worker vs the plain loop, tokens/s (300 iters)
    .venv/bin/python bench/train.py a --nanogpt DIR         # ... and nanoGPT's own train.py (a checkout in DIR)
    .venv/bin/python bench/train.py a-sliced --nanogpt DIR [--rounds 16 --window 2]
                                                            # (a) raygpt, nanoGPT, plain loop take turns (SIGSTOP)
    .venv/bin/python bench/train.py b-sliced [--rounds 10]  # (b) 1 worker and 2 workers ZeRO-2 take turns
    .venv/bin/python bench/train.py full [--repeats 1]      # (a) the whole 2000-iter recipe: val loss, wall time
    .venv/bin/python bench/train.py b [--repeats 3]         # (b) 2 workers ZeRO-2 vs 1 process, same 2 cores
    .venv/bin/python bench/train.py c [--repeats 3]         # (c) wall time to val loss <= 1.88 through Ray
                                                            #     (train-shakespeare-char-fast.yaml [key=value ...])
    .venv/bin/python bench/train.py sweep                   # plain-loop variants: what helps on this CPU
    .venv/bin/python bench/train.py overhead [--repeats 5] [--compile]
                                                            # fixed overhead of `raygpt train` per phase, medians
    .venv/bin/python bench/train.py cold --nanogpt DIR [--repeats 3] [--fast] [key=value ...]
    .venv/bin/python bench/train.py fast [--repeats 3] [key=value ...]
                                                            # the fast recipe (Muon) vs its AdamW form, cold
                                                            # whole cold processes vs nanoGPT's README command
                                                            # (bench/train_startup.py)
    .venv/bin/python bench/train.py stream [--rounds 12 --iters 25] [--synthetic ROWS]
                                                            # tokens/s of one training loop fed by streamed vs
                                                            # in-RAM input, turn by turn (goal: >= 0.97x)

Data: char-level Tiny Shakespeare, nanoGPT's split (first 90% of the text train, last 10% val), 65-char
vocabulary, rows of 65 tokens cut with stride 64 (the `raygpt prep` row format). The plain loop is nanoGPT's
train.py CPU recipe re-implemented on gptcore's GPT: fp32, torch AdamW (not fused: nanoGPT fuses only on
CUDA), random 64-token windows of the token stream per iteration (nanoGPT's get_batch), loss.item() every
iteration (log_interval=1), clipping 1.0, warmup 100 + cosine to 1e-4 at 2000. Peers run alternately in
the same script, so machine load hits both; tokens/s is the median per-step rate (evals excluded).
With --nanogpt DIR (a clone of github.com/karpathy/nanoGPT, outside this repository) (a) also runs nanoGPT's
train.py itself with its README CPU command (max_iters cut to the same count) in a subprocess of the same
Python, interleaved with the others; its per-iteration times are parsed from its log. Its data is prepared
into DIR/data/shakespeare_char from ../shared/data (its prepare.py with the input.txt already in place).
Ray workers are started with niceness 0 (RAY_worker_niceness=0) like this process: Ray's default (15)
would hand the CPU to everything else on a shared machine. Prints a JSON summary; does not assert.
`stream`: the train rows (or ROWS synthetic rows) rewritten by prep's ShardWriter (row groups of 1,024 rows,
shards of 4,096) and trained with the plain loop's model and AdamW in one process, the input taking turns:
`read_split` (the whole split in RAM) and `split_rows` (ShardRows: chunk LRU, reader thread, read-ahead),
both TrainStreams over the same order, so only the input differs. It reports the median step time (input
included) as tokens/s, their ratio, and the input's own median / max ms a step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RAYGPT_SHARED_DATA", REPO.parent / "shared" / "data"))
DATA = REPO / "runs" / "data" / "shakespeare-char"
PREP = REPO / "jobs" / "configs" / "prep-shakespeare-char.yaml"
RUNS = REPO / "runs" / "bench" / "train"
RECIPE = REPO / "jobs" / "configs" / "train-shakespeare-char.yaml"
FAST = REPO / "jobs" / "configs" / "train-shakespeare-char-fast.yaml"
# the steady-state modes (a, a-sliced, b, b-sliced) run the recipe compiled, as BENCHMARKS.md (a)/(b) measured it:
# the recipe file itself runs eager (a cold compile costs more than it saves in one 2000-step run)
STEADY = ["compile=true"]
sys.path.insert(0, str(REPO))


# ---- data -------------------------------------------------------------------------------------


def prepare_data(out: Path = DATA, block_size: int = 64) -> Path:
    """nanoGPT's split of Tiny Shakespeare in the raygpt token-dataset format: `raygpt prep` with
    jobs/configs/prep-shakespeare-char.yaml (first 90% of the text train, last 10% val, 65 characters),
    plus the two token streams the plain loop samples its random windows from."""
    import numpy as np

    from gptcore.tokenizer import Tokenizer
    from pipelines.config import load_config
    from pipelines.data import PrepConfig, run

    overrides = [f"output={out}", f"pack.block_size={block_size}", "progress=false"]
    if os.environ.get("RAYGPT_SHARED_DATA"):  # else the config's ../shared/data path, as `raygpt prep` reads it
        overrides.append(f"inputs=[{{path: {SHARED / 'tinyshakespeare' / 'input.txt'}}}]")
    cwd = os.getcwd()
    os.chdir(REPO)  # the config's relative paths are written for the repository root
    try:
        cfg = load_config(PrepConfig, PREP, overrides)
        m = run(cfg)  # reuses a complete output made with the same config
    finally:
        os.chdir(cwd)
    if not (out / "stream_val.npy").exists():
        text = (SHARED / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
        cut = int(len(text) * (1 - cfg.pack.val_fraction))
        tok = Tokenizer.load(Path(m["root"]) / "tokenizer.json")
        np.save(out / "stream_train.npy", np.array(tok.encode(text[:cut]), dtype=np.int32))  # plain loop's windows
        np.save(out / "stream_val.npy", np.array(tok.encode(text[cut:]), dtype=np.int32))
    return out


# ---- the plain PyTorch loop (nanoGPT's train.py, CPU recipe) -----------------------------------


def plain_loop(iters: int = 2000, *, bf16: bool = False, fused: bool = False, compile: bool = False,
               threads: int = 2, eval_interval: int = 250, eval_iters: int = 20, batch: int = 12,
               seed: int = 1337, on_step=None) -> dict:
    import numpy as np
    import torch

    from gptcore.config import preset
    from gptcore.model import GPT

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    train = np.load(DATA / "stream_train.npy").astype(np.int64)
    val = np.load(DATA / "stream_val.npy").astype(np.int64)
    T = 64
    # nanoGPT's model: no biases, exact GELU (as jobs/configs/train-shakespeare-char.yaml)
    model = GPT(preset("shakespeare-char", vocab_size=65, block_size=T, dropout=0.0, bias=False, activation="gelu"))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99), fused=fused)
    fwd = torch.compile(model) if compile else model
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    rng = np.random.default_rng(seed)

    def get_batch(data):
        ix = rng.integers(0, len(data) - T, batch)
        x = torch.from_numpy(np.stack([data[i:i + T] for i in ix]))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + T] for i in ix]))
        return x, y

    def lr_at(it):  # nanoGPT: warmup 100, cosine to min_lr at lr_decay_iters=2000
        if it < 100:
            return 1e-3 * (it + 1) / 101
        if it > 2000:
            return 1e-4
        return 1e-4 + 0.5 * (1 + math.cos(math.pi * (it - 100) / 1900)) * (1e-3 - 1e-4)

    @torch.no_grad()
    def val_loss():
        model.eval()
        out = []
        for _ in range(eval_iters):
            x, y = get_batch(val)
            with ctx:
                out.append(fwd(x, y)[1].item())
        model.train()
        return sum(out) / len(out)

    times, evals = [], []
    t_start = time.time()
    for it in range(iters):
        if eval_interval and it % eval_interval == 0 and it:
            evals.append((it, val_loss(), time.time() - t_start))
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        t0 = time.perf_counter()
        x, y = get_batch(train)
        with ctx:
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
        if on_step is not None:
            on_step(it, times[-1])
    evals.append((iters, val_loss(), time.time() - t_start))
    steady = sorted(times[20:]) or sorted(times)
    med = steady[len(steady) // 2]
    return {"tokens_per_s": batch * T / med, "ms_per_iter": med * 1e3, "wall_s": time.time() - t_start,
            "val_loss": evals[-1][1], "evals": evals, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ---- nanoGPT's own train.py (optional peer) ------------------------------------------------------


def nanogpt_data(root: Path) -> None:
    """nanoGPT's char-level Shakespeare data in its checkout (its prepare.py, input.txt from ../shared/data)."""
    import shutil
    import subprocess

    d = root / "data" / "shakespeare_char"
    if not (d / "train.bin").is_file():
        shutil.copyfile(SHARED / "tinyshakespeare" / "input.txt", d / "input.txt")  # so prepare.py needs no download
        subprocess.run([sys.executable, "prepare.py"], cwd=d, check=True, capture_output=True)


def nanogpt_run(root: Path, iters: int) -> dict:
    """nanoGPT's README CPU command, `iters` iterations, no eval: median ms/iter from its `iter N: ... time Xms` lines."""
    import re
    import subprocess

    nanogpt_data(root)
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
           "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
           "--n_embd=128", f"--max_iters={iters}", "--lr_decay_iters=2000", "--dropout=0.0",
           f"--eval_interval={iters + 1000}", f"--out_dir={RUNS / 'nanogpt-out'}"]
    t0 = time.time()
    out = subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True).stdout
    ms = sorted(float(m) for m in re.findall(r"^iter \d+: .* time ([0-9.]+)ms", out, re.M)[20:])
    med = ms[len(ms) // 2]
    return {"tokens_per_s": 12 * 64 / med * 1e3, "ms_per_iter": med, "wall_s": time.time() - t0}


# ---- raygpt train through Ray ------------------------------------------------------------------


def ray_init() -> None:
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_worker_niceness", "0")
        # with the dashboard: Ray Train's placement-group cleaner needs this cluster's State API (see
        # pipelines.train.trainer._warn_without_dashboard)
        ray.init(log_to_driver=False)


def raygpt_run(name: str, overrides: list[str], recipe: Path = RECIPE) -> dict:
    import shutil

    from pipelines.config import load_config
    from pipelines.train.config import TrainConfig
    from pipelines.train.metrics import read_metrics
    from pipelines.train.trainer import run

    rd = RUNS / name
    shutil.rmtree(rd, ignore_errors=True)
    cfg = load_config(TrainConfig, recipe, [f"data={DATA}", f"run_dir={rd}", "log.progress=false",
                                               f"testing.pid_dir={rd / 'workers'}", *overrides])
    t0 = time.time()
    res = run(cfg)
    wall = time.time() - t0
    tr = read_metrics(rd, "train")
    ev = read_metrics(rd, "eval")
    ready = [r for r in read_metrics(rd, "event") if r.get("event") == "worker_ready"]
    tps = sorted(r["tokens_per_s"] for r in tr[20:] or tr)
    mfu = sorted(r["mfu"] for r in tr[20:] or tr)
    return {"tokens_per_s": tps[len(tps) // 2], "ms_per_iter": cfg.global_batch_size * 64 / tps[len(tps) // 2] * 1e3,
            "mfu": mfu[len(mfu) // 2], "wall_s": wall, "val_loss": res.final_val_loss,
            "evals": [(r["step"], r["val_loss"], r["time"] - t0) for r in ev],
            "startup_s": (ready[0]["ready"] - t0) if ready else None,
            "peak_rss_mb": res.extra.get("peak_rss_mb"), "run_dir": str(rd)}


def _median(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def bench_a(repeats: int, iters: int, nanogpt: Path | None = None) -> dict:
    """(a) raygpt train, 1 worker, nanoGPT recipe vs the plain loop (nanoGPT-equivalent) in this process.

    Peers, interleaved in every repeat: the plain loop in fp32 eager (nanoGPT's own settings) with torch's
    default threads (2 here, what nanoGPT uses) and with 1 thread; the plain loop with the recipe's settings
    (bf16 autocast, torch.compile, fused AdamW: what the Ray + DeepSpeed path costs on top); raygpt (the
    recipe file) on 2 threads and on 1 thread."""
    ray_init()
    runs: dict[str, list[dict]] = {"plain-2t": [], "plain-1t": [], "plain-same": [], "raygpt-2t": [],
                                   "raygpt-1t": []}
    if nanogpt:
        runs["nanogpt"] = []
    common = [f"max_steps={iters}", f"optim.decay_steps={max(iters, 200)}", f"eval_interval={iters}", "ckpt_interval=0",
              *STEADY]
    for i in range(repeats):
        if nanogpt:
            runs["nanogpt"].append(nanogpt_run(nanogpt, iters))
        runs["plain-2t"].append(plain_loop(iters, threads=2, eval_interval=0))
        runs["plain-same"].append(plain_loop(iters, threads=2, eval_interval=0, bf16=True, fused=True, compile=True))
        runs["raygpt-2t"].append(raygpt_run(f"a2-{i}", common + ["torch_threads=2"]))
        runs["plain-1t"].append(plain_loop(iters, threads=1, eval_interval=0))
        runs["raygpt-1t"].append(raygpt_run(f"a1-{i}", common + ["torch_threads=1"]))
        print(json.dumps({"repeat": i, **{k: round(v[-1]["tokens_per_s"]) for k, v in runs.items()},
                          "load": os.getloadavg()}), flush=True)
    med = {k: _median(v, "tokens_per_s") for k, v in runs.items()}
    ratio = {f"{r}/{p}": statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[r], runs[p]))
             for r, p in (("raygpt-2t", "plain-2t"), ("raygpt-1t", "plain-1t"), ("raygpt-1t", "plain-2t"),
                          ("raygpt-2t", "plain-same"), ("plain-same", "plain-2t"),
                          ("raygpt-2t", "nanogpt"), ("plain-2t", "nanogpt")) if runs.get(p)}
    best = max(("raygpt-2t", "raygpt-1t"), key=lambda k: med[k])
    return {"tokens_per_s_median": med, "ms_per_iter_median": {k: _median(v, "ms_per_iter") for k, v in runs.items()},
            "ratios_same_repeat_median": ratio, "best_raygpt": best,
            "best_raygpt_vs_nanogpt_reference_19k": med[best] / 19000.0,
            "raygpt_mfu": {k: _median(runs[k], "mfu") for k in ("raygpt-2t", "raygpt-1t")},
            "raygpt_peak_rss_mb": runs[best][-1]["peak_rss_mb"], "plain_peak_rss_mb": runs["plain-2t"][-1]["peak_rss_mb"],
            "runs": runs}


def full_recipe(repeats: int) -> dict:
    """The whole recipe (2000 iters, evals every 250) once per repeat: raygpt and the plain loop, val loss + wall."""
    ray_init()
    out = {"plain": [], "raygpt": []}
    for i in range(repeats):
        out["plain"].append(plain_loop(2000))
        out["raygpt"].append(raygpt_run(f"full-{i}", []))
        print(json.dumps({"repeat": i, "plain_val": out["plain"][-1]["val_loss"], "plain_wall": out["plain"][-1]["wall_s"],
                          "raygpt_val": out["raygpt"][-1]["val_loss"], "raygpt_wall": out["raygpt"][-1]["wall_s"],
                          "load": os.getloadavg()}), flush=True)
    return {k: {"val_loss": _median(v, "val_loss"), "wall_s": _median(v, "wall_s"),
                "tokens_per_s": _median(v, "tokens_per_s")} for k, v in out.items()} | {"runs": out}


def bench_b(repeats: int, iters: int) -> dict:
    """(b) 2 workers ZeRO-2 (1 CPU + 1 thread each, micro batch 6) vs 1 worker on both cores (micro batch 12,
    2 threads; and 1 thread as a second peer), same global batch of 12, same 2 cores."""
    ray_init()
    runs: dict[str, list[dict]] = {"one-2t": [], "one-1t": [], "two-zero2": []}
    common = [f"max_steps={iters}", f"optim.decay_steps={max(iters, 200)}", "eval_interval=0", "ckpt_interval=0", *STEADY]
    for i in range(repeats):
        runs["one-2t"].append(raygpt_run(f"b1-{i}", common + ["torch_threads=2"]))
        runs["two-zero2"].append(raygpt_run(f"b2-{i}", common + [
            "num_workers=2", "zero_stage=2", "batch.micro_batch_size=6", "resources_per_worker={CPU: 1}"]))
        runs["one-1t"].append(raygpt_run(f"b1t-{i}", common + ["torch_threads=1"]))
        print(json.dumps({"repeat": i, **{k: round(v[-1]["tokens_per_s"]) for k, v in runs.items()},
                          "load": os.getloadavg()}), flush=True)
    med = {k: _median(v, "tokens_per_s") for k, v in runs.items()}
    return {"tokens_per_s_median": med,
            "ratio_two_vs_one_2t": statistics.median(t["tokens_per_s"] / o["tokens_per_s"]
                                                     for t, o in zip(runs["two-zero2"], runs["one-2t"])),
            "ratio_two_vs_one_1t": statistics.median(t["tokens_per_s"] / o["tokens_per_s"]
                                                     for t, o in zip(runs["two-zero2"], runs["one-1t"])),
            "peak_rss_mb": {k: v[-1]["peak_rss_mb"] for k, v in runs.items()},
            "mfu": {k: _median(v, "mfu") for k, v in runs.items()}, "runs": runs}


def bench_c(repeats: int, overrides: list[str]) -> dict:
    """(c) wall clock from `run(cfg)` (Ray already up) to the first eval with val loss <= 1.88, with
    jobs/configs/train-shakespeare-char-fast.yaml (+ overrides)."""
    ray_init()
    out = []
    for i in range(repeats):
        r = raygpt_run(f"c{i}", overrides, FAST)
        hit = [t for step, v, t in r["evals"] if v <= 1.88]
        r["time_to_1.88_s"] = hit[0] if hit else None
        out.append(r)
        print(json.dumps({"repeat": i, "time_to_1.88_s": r["time_to_1.88_s"], "startup_s": r["startup_s"],
                          "evals": r["evals"]}), flush=True)
    times = [r["time_to_1.88_s"] for r in out if r["time_to_1.88_s"] is not None]
    return {"time_to_1.88_s_median": statistics.median(times) if times else None, "reached": f"{len(times)}/{repeats}",
            "startup_s_median": statistics.median(r["startup_s"] for r in out), "overrides": overrides, "runs": out}


def sweep(iters: int, repeats: int) -> dict:
    variants = {"fp32": {}, "fp32+fused": {"fused": True}, "bf16": {"bf16": True},
                "bf16+fused": {"bf16": True, "fused": True}, "bf16+fused+compile": {"bf16": True, "fused": True, "compile": True},
                "fp32+compile": {"compile": True}, "fp32 1 thread": {"threads": 1}}
    res: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for k, kw in variants.items():
            res[k].append(plain_loop(iters, eval_interval=0, eval_iters=1, **kw)["tokens_per_s"])
            print(k, round(res[k][-1]), flush=True)
    base = statistics.median(res["fp32"])
    return {k: {"tokens_per_s": statistics.median(v), "x_fp32": statistics.median(v) / base} for k, v in res.items()}


# ---- time-sliced side by side: the peers take turns on the same machine, seconds apart --------------

STEP_LINE = r"^iter (\d+): .*time ([0-9.]+)ms"  # nanoGPT's log line (the plain-loop subprocess prints the same)


class _Peer:
    """A training run the slicer pauses (SIGSTOP) and resumes (SIGCONT): a subprocess that prints step lines,
    or a raygpt run (its Ray Train worker processes). steps: (end time, seconds) per training step."""

    def __init__(self, name: str, run_dir: Path | None = None, workers: int = 0):
        self.name = name
        self.run_dir = run_dir
        self.workers = workers
        self.pids: list[int] = []
        self.steps: list[tuple[float, float]] = []
        self.proc = None

    def start_subprocess(self, cmd: list[str], cwd: Path) -> None:
        import re
        import subprocess
        import threading

        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.pids = [self.proc.pid]
        pat = re.compile(STEP_LINE)

        def read() -> None:
            for line in self.proc.stdout:
                m = pat.match(line)
                if m:
                    self.steps.append((time.time(), float(m.group(2)) / 1e3))
        threading.Thread(target=read, daemon=True).start()

    def poll(self) -> int:
        """Steps seen so far; finds a raygpt run's worker pids once they exist."""
        if self.run_dir is not None:
            if len(self.pids) < self.workers:
                pids = []
                for r in range(self.workers):
                    f = self.run_dir / "workers" / f"rank_{r}.pid"
                    if f.is_file():
                        pid = int(f.read_text())
                        if "RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                            pids.append(pid)
                if len(pids) == self.workers:
                    self.pids = pids
            self.steps = _raygpt_steps(self.run_dir, 10)
        elif self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before the rotation ended")
        return len(self.steps) if self.pids else 0

    def signal(self, sig) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _raygpt_steps(run_dir: Path, interval: int) -> list[tuple[float, float]]:
    """Per-step (end time, seconds) of a raygpt run from metrics.jsonl. Records are written in groups of
    `interval` steps (log.interval) right after the group's last step; earlier steps of a group ended
    the later steps' durations before that."""
    from pipelines.train.metrics import read_metrics

    tr = read_metrics(run_dir, "train")
    out = []
    for g in range(0, len(tr), interval):
        grp = tr[g:g + interval]
        end = grp[-1]["time"]
        ends = []
        for r in reversed(grp):
            ends.append((end, r["step_time_s"]))
            end -= r["step_time_s"]
        out += ends[::-1]
    return out


def _sliced(peers: list[_Peer], raygpt_runs: list[tuple[str, list[str]]], rounds: int, window_s: float,
            start_subprocesses=None) -> dict:
    """Run `raygpt_runs` (name, overrides; the last one in this thread, the others in threads) and the
    subprocess peers at the same time, but let only one peer compute at a time: each gets `window_s`
    seconds in turn, `rounds` times, the order rotating every round; the others wait stopped (SIGSTOP).
    Before the rotation each peer warms up (the raygpt runs compile) while the subprocesses wait stopped.
    A shared machine whose speed drifts within a minute then drifts under all peers alike. Per window: the
    median step time of the peer that ran (the first step ending in a window, the one the pause cut
    through, is left out). Returns tokens/s per peer and round."""
    import shutil
    import signal
    import threading

    windows: list[tuple[str, float, float]] = []
    state: dict = {"error": None, "done": 0}
    for name, _ in raygpt_runs:
        shutil.rmtree(RUNS / name, ignore_errors=True)  # no stale pid file or metrics for the slicer
    subs = [p for p in peers if p.run_dir is None]

    def slicer() -> None:
        try:
            if start_subprocesses:
                start_subprocesses()
            parked: set[str] = set()
            while True:  # subprocesses: a few steps, then wait stopped; raygpt runs: past compilation
                counts = {p.name: p.poll() for p in peers}
                for p in subs:
                    if p.name not in parked and counts[p.name] >= 8:
                        p.signal(signal.SIGSTOP)
                        parked.add(p.name)
                if len(parked) == len(subs) and all(counts[p.name] >= 30 for p in peers if p.run_dir):
                    break
                if state["done"]:
                    raise RuntimeError("a raygpt run finished before the rotation started")
                time.sleep(0.2)
            for p in peers:
                p.signal(signal.SIGSTOP)
            for r in range(rounds):
                if state["done"]:
                    break
                for p in peers[r % len(peers):] + peers[:r % len(peers)]:
                    p.signal(signal.SIGCONT)
                    t0 = time.time()
                    time.sleep(window_s)
                    p.signal(signal.SIGSTOP)
                    windows.append((p.name, t0, time.time()))
                    time.sleep(0.05)  # the stop lands before the next peer starts
        except Exception as e:
            state["error"] = e
        finally:
            for p in peers:  # raygpt runs finish their steps alone; subprocesses are stopped for good
                p.signal(signal.SIGCONT)
                if p.proc is not None:
                    p.proc.terminate()

    results: dict[str, dict] = {}

    def run_one(name: str, over: list[str]) -> None:
        try:
            results[name] = raygpt_run(name, over)
        except Exception as e:
            state["error"] = state["error"] or e
        finally:
            state["done"] += 1

    th = threading.Thread(target=slicer, daemon=True)
    th.start()
    others = [threading.Thread(target=run_one, args=r, daemon=True) for r in raygpt_runs[:-1]]
    for t in others:
        t.start()
    run_one(*raygpt_runs[-1])
    for t in others:
        t.join()
    th.join()
    if state["error"] is not None:
        raise state["error"]
    for p in peers:
        if p.run_dir is not None:
            p.steps = _raygpt_steps(p.run_dir, 10)
    for name, t0, t1 in windows:  # a paused peer finishes no step (beyond the one in flight at the pause)
        for p in peers:
            ended = [end for end, _ in p.steps if t0 + 0.5 < end <= t1]
            if p.name != name and ended:
                raise RuntimeError(f"{p.name} (pids {p.pids}) finished {len(ended)} steps in {name}'s window: "
                                   f"the pause did not hold")

    def window_rate(p: _Peer, t0: float, t1: float) -> float | None:
        dts = [dt for end, dt in p.steps if t0 < end <= t1][1:]  # the first one spans the pause
        return 12 * 64 / statistics.median(dts) if len(dts) >= 5 else None

    by_peer = {p.name: p for p in peers}
    n = len(peers)
    per_round = [{name: window_rate(by_peer[name], t0, t1) for name, t0, t1 in windows[n * r:n * r + n]}
                 for r in range(len(windows) // n)]
    return {"per_round": [r for r in per_round if all(v for v in r.values())], "rounds": len(per_round),
            "windows": windows, "raygpt": results}


def _ratio_summary(rounds: list[dict], pairs: list[tuple[str, str]]) -> dict:
    ratios = {f"{a}/{b}": [r[a] / r[b] for r in rounds] for a, b in pairs}
    return {"tokens_per_s_median": {k: statistics.median(r[k] for r in rounds) for k in rounds[0]},
            "ratios_median": {k: statistics.median(v) for k, v in ratios.items()},
            "ratios_range": {k: [min(v), max(v)] for k, v in ratios.items()},
            "ratios_per_round": {k: [round(x, 3) for x in v] for k, v in ratios.items()}}


def _steps_needed(rounds: int, peers: int, window_s: float, fastest_s: float) -> int:
    # outlasts the warm-up + rotation even at `fastest_s` per step (afterwards it finishes alone)
    return 40 + int(rounds * window_s / fastest_s)


def bench_a_sliced(nanogpt: Path, rounds: int, window_s: float) -> dict:
    """(a) time-sliced: raygpt train (1 worker, the recipe), nanoGPT's train.py (README CPU command) and the
    plain fp32 loop (a subprocess of this script) take turns, `window_s` seconds each (see _sliced)."""
    ray_init()
    if not (nanogpt / "data" / "shakespeare_char" / "train.bin").is_file():
        nanogpt_run(nanogpt, 25)  # prepares its data
    nano, plain = _Peer("nanogpt"), _Peer("plain-fp32")
    ray_peer = _Peer("raygpt", RUNS / "a-sliced", workers=1)

    def start() -> None:
        nano.start_subprocess([sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
                               "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                               "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
                               "--max_iters=1000000", "--lr_decay_iters=2000", "--dropout=0.0",
                               "--eval_interval=1000000", f"--out_dir={RUNS / 'nanogpt-out'}"], nanogpt)
        plain.start_subprocess([sys.executable, str(Path(__file__).resolve()), "_plain-steps"], REPO)

    n = _steps_needed(rounds, 3, window_s, 0.016)
    out = _sliced([ray_peer, nano, plain], [("a-sliced", [f"max_steps={n}", f"optim.decay_steps={n}",
                                                          f"eval_interval={n}", "ckpt_interval=0", "log.interval=10",
                                                          *STEADY])],
                  rounds, window_s, start)
    res = out["raygpt"]["a-sliced"]
    return {"window_s": window_s, "rounds": out["rounds"], "rounds_used": len(out["per_round"]),
            **_ratio_summary(out["per_round"], [("raygpt", "nanogpt"), ("raygpt", "plain-fp32")]),
            "raygpt_mfu": res["mfu"], "raygpt_peak_rss_mb": res["peak_rss_mb"],
            "runs": {"per_round": out["per_round"], "windows": out["windows"]}}


def bench_b_sliced(rounds: int, window_s: float) -> dict:
    """(b) time-sliced: 2 workers ZeRO-2 (1 CPU + 1 thread each, micro batch 6) and 1 worker (2 threads,
    micro batch 12), same global batch of 12, take turns on the 2 cores, `window_s` seconds each. Ray is
    started with 4 logical CPUs so that both runs are placed at once; only one of them runs at a time."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(log_to_driver=False, num_cpus=4)
    n = _steps_needed(rounds, 2, window_s, 0.018)
    common = [f"max_steps={n}", f"optim.decay_steps={n}", f"eval_interval={n}", "ckpt_interval=0", "log.interval=10",
              *STEADY]
    one = _Peer("one-2t", RUNS / "b-sliced-one", workers=1)
    two = _Peer("two-zero2", RUNS / "b-sliced-two", workers=2)
    out = _sliced([one, two], [("b-sliced-one", common + ["torch_threads=2"]),
                               ("b-sliced-two", common + ["num_workers=2", "zero_stage=2", "batch.micro_batch_size=6",
                                                          "resources_per_worker={CPU: 1}"])], rounds, window_s)
    return {"window_s": window_s, "rounds": out["rounds"], "rounds_used": len(out["per_round"]),
            **_ratio_summary(out["per_round"], [("two-zero2", "one-2t")]),
            "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in out["raygpt"].items()},
            "runs": {"per_round": out["per_round"], "windows": out["windows"]}}


# ---- streamed vs in-RAM training input --------------------------------------------------------------


def stream_data(synthetic: int | None) -> Path:
    """DATA's train rows (or `synthetic` random rows of 65 tokens) as prep writes shards (row groups of 1,024)."""
    import numpy as np

    from gptcore.tokenizer import Tokenizer, train_char
    from pipelines.data.manifest import load_manifest, write_manifest
    from pipelines.data.write import ShardWriter
    from pipelines.train.data import read_split

    out = RUNS / (f"stream-synthetic-{synthetic}" if synthetic else "stream-shakespeare")
    try:
        return Path(load_manifest(out)["root"])
    except Exception:
        pass
    if synthetic:
        tok = train_char(["".join(chr(48 + i) for i in range(65))])
        ids = np.random.default_rng(0).integers(0, tok.vocab_size, (synthetic, 65), dtype=np.int32)
    else:
        tok = Tokenizer.load(DATA / "tokenizer.json")
        ids = read_split(load_manifest(DATA), "train").input_ids.astype(np.int32)
    w = ShardWriter(str(out), "train", 64, rows_per_shard=4096, row_group_rows=1024)
    w.add(ids, np.zeros_like(ids))
    shards = w.close()
    tok.save(out / "tokenizer.json")
    write_manifest(out, {"kind": "pretrain", "tokenizer_id": tok.id, "vocab_size": tok.vocab_size, "eos_id": None,
                         "block_size": 64, "ledger": [], "code_version": "bench", "config": {"writer": "bench/train.py"},
                         "splits": {"train": {"rows": len(ids), "tokens": int(ids.size), "shards": shards}},
                         "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return out


def bench_stream(rounds: int, turn: int, synthetic: int | None, batch: int = 12, threads: int = 2) -> dict:
    """One model and optimizer; the input alternates every `turn` steps between in-RAM and streamed rows."""
    import torch
    import torch.nn.functional as F

    from gptcore.config import preset
    from gptcore.model import GPT
    from pipelines.train.data import TrainStream, open_dataset, read_split
    from pipelines.train.shards import CHUNK_ROWS

    data = stream_data(synthetic)
    ds = open_dataset(str(data))
    ram, streamed = read_split(ds.manifest, "train"), ds.split_rows("train")
    feeds = {name: TrainStream(rows, seed=1337, micro_batch=batch, grad_accum=1, world=1, rank=0)
             for name, rows in (("in_ram", ram), ("streamed", streamed))}
    torch.set_num_threads(threads)
    torch.manual_seed(1337)
    model = GPT(preset("shakespeare-char", vocab_size=int(ds.manifest["vocab_size"]), block_size=64, dropout=0.0,
                       bias=False, activation="gelu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    step_s = {k: [] for k in feeds}
    input_s = {k: [] for k in feeds}
    step = 0
    for r in range(rounds):
        for name in (("in_ram", "streamed") if r % 2 == 0 else ("streamed", "in_ram")):
            for _ in range(turn):
                t0 = time.perf_counter()
                x, y, _ = feeds[name].micro_batch(step, 0)
                t1 = time.perf_counter()
                logits, _ = model(torch.from_numpy(x))
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), torch.from_numpy(y).view(-1), ignore_index=-1)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss.item()
                step_s[name].append(time.perf_counter() - t0)
                input_s[name].append(t1 - t0)
                step += 1
    out = {"data": str(data), "rows": len(ram), "rounds": rounds, "steps_a_turn": turn,
           "in_ram_bytes": int(ram.input_ids.nbytes + (ram.doc_ids.nbytes if ram.doc_ids is not None else 0)),
           "streamed_cache_bound_bytes": streamed.capacity * CHUNK_ROWS * 65 * 4}
    for name in feeds:
        med = statistics.median(step_s[name])
        out[name] = {"tokens_per_s": batch * 64 / med, "ms_per_step": med * 1e3,
                     "input_ms_median": statistics.median(input_s[name]) * 1e3,
                     "input_ms_max": max(input_s[name]) * 1e3, "steps": len(step_s[name])}
    out["streamed_vs_in_ram"] = out["streamed"]["tokens_per_s"] / out["in_ram"]["tokens_per_s"]
    out["goal"] = ">= 0.97"
    return out


def startup_bench(a, ap) -> None:
    """`overhead`, `cold` and `fast` (bench/train_startup.py): whole processes, load average at start and end recorded."""
    import train_startup
    from common import print_conditions, record

    if a.what == "cold" and not a.nanogpt:
        ap.error("cold needs --nanogpt DIR (a nanoGPT checkout)")
    threads = {"raygpt worker": 2} if a.what == "fast" else {"raygpt worker": 2, "nanogpt": 2}
    start = print_conditions(f"train-{a.what}", threads=threads)
    if a.what == "overhead":
        out = train_startup.overhead(DATA, a.repeats, a.compile, overrides=a.overrides)
    elif a.what == "fast":
        out = train_startup.fast(DATA, a.repeats, a.overrides)
    else:
        nanogpt_data(a.nanogpt)
        out = train_startup.cold(DATA, a.nanogpt.resolve(), a.repeats, a.overrides, a.fast, a.ray_too)
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2, default=str))
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / f"result-{a.what}.json").write_text(json.dumps(out, indent=2, default=str))
    record(f"train-{a.what}", {k: v for k, v in out.items() if k != "runs"}, start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", choices=("a", "a-sliced", "full", "b", "b-sliced", "c", "sweep", "stream",
                                                 "overhead", "cold", "fast", "_plain-steps"),
                    default=None)
    ap.add_argument("--rounds", type=int, default=12, help="(a-sliced) turns each peer gets")
    ap.add_argument("--window", type=float, default=2.0, help="(a-sliced) seconds per turn")
    ap.add_argument("--prepare-data", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--nanogpt", type=Path, default=None, help="(a) a nanoGPT checkout to run side by side")
    ap.add_argument("--synthetic", type=int, default=None, help="(stream) ROWS random rows instead of Shakespeare")
    ap.add_argument("--compile", action="store_true", help="(overhead) compile on, empty inductor cache")
    ap.add_argument("--fast", action="store_true", help="(cold) also the fast recipe, cold")
    ap.add_argument("--ray-too", action="store_true", help="(cold) also the recipe with launcher=ray (worker actors)")
    ap.add_argument("overrides", nargs="*", help="(c) TrainConfig overrides, e.g. optim.lr=2e-3 max_steps=1200")
    a = ap.parse_intermixed_args()
    if not (a.what == "stream" and a.synthetic):
        prepare_data()
    if a.prepare_data and not a.what:
        print(f"dataset ready: {DATA}")
        return
    if a.what == "_plain-steps":  # the plain fp32 loop as a peer process of a-sliced: one line per step
        plain_loop(10 ** 6, eval_interval=0,
                   on_step=lambda it, dt: print(f"iter {it}: time {dt * 1e3:.3f}ms", flush=True))
        return
    if a.what in ("overhead", "cold", "fast"):
        startup_bench(a, ap)
        return
    t0 = time.time()
    if a.what == "a-sliced":
        if not a.nanogpt:
            ap.error("a-sliced needs --nanogpt DIR (a nanoGPT checkout)")
        out = bench_a_sliced(a.nanogpt, a.rounds, a.window)
    elif a.what == "b-sliced":
        out = bench_b_sliced(a.rounds, a.window)
    elif a.what == "a":
        out = bench_a(a.repeats, a.iters or 300, a.nanogpt)
    elif a.what == "full":
        out = full_recipe(a.repeats)
    elif a.what == "b":
        out = bench_b(a.repeats, a.iters or 400)
    elif a.what == "c":
        out = bench_c(a.repeats, a.overrides)
    elif a.what == "stream":
        out = bench_stream(a.rounds, a.iters or 25, a.synthetic)
    else:
        out = sweep(a.iters or 300, a.repeats)
    out["bench_wall_s"] = time.time() - t0
    out["load_avg_at_end"] = os.getloadavg()
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2, default=str))
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / f"result-{a.what}.json").write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
