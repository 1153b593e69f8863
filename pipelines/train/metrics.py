"""Training metrics: JSONL records, TensorBoard events, a progress bar, the loss-curve PNG, MFU peak.

    log = MetricsLogger(run_dir, max_steps=2000, start_step=0, resumed=False, tensorboard=True, progress=True)
    log.train(step, {"loss": 2.1, "lr": 1e-3, ...}); log.eval(step, {"val_loss": 2.0}); log.close()
    plot_loss_curve(run_dir)                     # RUN_DIR/loss_curve.png (matplotlib Agg)
    peak = peak_flops(threads=2, dtype="fp32")   # measured once with a matmul benchmark, then cached

Files in the run dir: metrics.jsonl (one JSON object per line: {"kind": "train"|"eval"|"event", "step", ...}),
tb/ (TensorBoard), loss_curve.png. On a restart or resume the records after the resumed step are
dropped (JSONL rewritten, TensorBoard purge_step), so every step appears once, from the run that
counts. Written by rank 0 only. Does not: compute the metrics (loop.py does).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from pipelines.console import progress as console_progress

METRICS = "metrics.jsonl"
PLOT = "loss_curve.png"


def read_metrics(run_dir: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    p = Path(run_dir) / METRICS
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if kind is None or r.get("kind") == kind:
                out.append(r)
    return out


class MetricsLogger:
    def __init__(self, run_dir: str | os.PathLike, *, max_steps: int, start_step: int, resumed: bool,
                 tensorboard: bool = True, progress: bool = True, console: bool = False):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / METRICS
        if resumed and self.path.is_file():
            # drop what the interrupted attempt logged after the checkpoint we resume from
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, self.path)
        elif not resumed:
            # a fresh start (or a restart before the first checkpoint): nothing logged so far counts
            if self.path.exists():
                self.path.unlink()
            import shutil

            shutil.rmtree(self.dir / "tb", ignore_errors=True)
        self.f = open(self.path, "a", buffering=1)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is a dependency
            self.tb = SummaryWriter(log_dir=str(self.dir / "tb"), purge_step=start_step + 1 if resumed else None)
        self.bar = None
        if progress:  # a bar on the driver's terminal, else a status line every few seconds (pipelines/console.py)

            self.bar = console_progress(max_steps, "train", unit="step", initial=start_step)
        self.console = console
        self._last_bar_step = start_step

    def _write(self, rec: dict[str, Any]) -> None:
        self.f.write(json.dumps(rec, sort_keys=True) + "\n")

    def train(self, step: int, m: dict[str, Any]) -> None:
        now = time.time()
        self._write({"kind": "train", "step": step, "time": now, **m})
        if self.tb is not None:
            self._scalars("train", step, now, m)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {m.get('loss', float('nan')):.4f}")
            self.bar.update(step - self._last_bar_step)
            self._last_bar_step = step
        if self.console:
            print(f"step {step} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in m.items()), flush=True)

    def _scalars(self, prefix: str, step: int, walltime: float, m: dict[str, Any]) -> None:
        # one TensorBoard event per step holding every scalar: SummaryWriter.add_scalar writes one event
        # per value (measured 640 us for the 9 train scalars of a step vs 76 us as one event, 2% of a
        # 28 ms step of the nanoGPT recipe); TensorBoard reads both the same way
        from tensorboard.compat.proto.summary_pb2 import Summary

        vals = [Summary.Value(tag=f"{prefix}/{k}", simple_value=float(v)) for k, v in m.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
        if vals:
            self.tb._get_file_writer().add_summary(Summary(value=vals), step, walltime=walltime)

    def eval(self, step: int, m: dict[str, Any]) -> None:
        now = time.time()
        self._write({"kind": "eval", "step": step, "time": now, **m})
        if self.tb is not None:
            self._scalars("val", step, now, m)
        if self.console:
            print(f"eval step {step} " + " ".join(f"{k}={v:.4g}" for k, v in m.items()), flush=True)

    def event(self, step: int, what: str, **kw: Any) -> None:
        self._write({"kind": "event", "step": step, "time": time.time(), "event": what, **kw})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        self.f.close()


def plot_loss_curve(run_dir: str | os.PathLike, title: str | None = None) -> Path | None:
    """Train loss (raw + moving average) and val loss against the step -> RUN_DIR/loss_curve.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = read_metrics(run_dir, "train")
    ev = read_metrics(run_dir, "eval")
    if not tr and not ev:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if tr:
        s = [r["step"] for r in tr]
        v = [r["loss"] for r in tr]
        ax.plot(s, v, color="tab:blue", alpha=0.3, lw=0.8, label="train loss")
        w = max(1, len(v) // 50)
        if w > 1:
            avg = [sum(v[max(0, i - w + 1):i + 1]) / len(v[max(0, i - w + 1):i + 1]) for i in range(len(v))]
            ax.plot(s, avg, color="tab:blue", lw=1.5, label=f"train loss ({w}-step mean)")
    if ev:
        ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", color="tab:orange", ms=3,
                label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / PLOT
    fig.savefig(out)
    plt.close(fig)
    return out


# ---- peak FLOP/s for MFU ----------------------------------------------------------------------


def _device_key(device: str, threads: int, dtype: str) -> str:
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return f"{name}|{device.split(':')[0]}|threads={threads}|{dtype}"


def measure_matmul_flops(dtype: str = "fp32", device: str = "cpu", n: int = 1024, seconds: float = 0.1,
                         trials: int = 3) -> float:
    """Best dense square-matmul FLOP/s over a few timed trials (2 n^3 FLOPs per product). ~0.3 s: it runs once
    per machine (cached by peak_flops) but that once is on a cold run's path to the first step."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        sync()
        t0 = time.perf_counter()
        k = 0
        while time.perf_counter() - t0 < seconds:
            a @ b
            k += 1
        sync()
        best = max(best, 2 * n ** 3 * k / (time.perf_counter() - t0))
    return best


def peak_flops(threads: int, dtype: str, device: str = "cpu", cache: str | None = None) -> float:
    """The machine's measured matmul peak for this thread count and dtype, cached in a JSON file."""
    key = _device_key(device, threads, dtype)
    path = Path(os.path.expanduser(cache)) if cache else None
    data: dict[str, float] = {}
    if path is not None and path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            data = {}
        if key in data:
            return float(data[key])
    value = measure_matmul_flops(dtype, device)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data[key] = value
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
            os.replace(tmp, path)
        except OSError:
            pass
    return value
