"""One training worker's pieces, free of ray.train: its state, restore, evaluation, optimizer step, checkpoint files.

    w = setup_worker(payload, rank=0, world=2, local_rank=0)  # seeds, data, model, DeepSpeed engine
    restore(w, Path(checkpoint_dir))                           # engine shard, RNG states, step, best val loss
    open_metrics(w, resumed=True)                              # rank 0: JSONL / TensorBoard / progress bar
    train_step(w, step); evaluate(w); write_checkpoint(w, tmp, step, metrics); publish_checkpoint(...)

pipelines/train/loop.py strings these together and is the only module that calls ray.train (get_context,
get_checkpoint, report): here a checkpoint is written into a local directory and, once Ray has
persisted and committed it, published (verified, logged, copied to RUN_DIR/last and best). The step
order, the seeding order and every file written are those of the single function this module was cut
out of. Does not: call ray.train, validate the config (config.py / trainer.py) or start Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import config_hash, from_dict
from pipelines.train import deepspeed as dsmod
from pipelines.train import state as st
from pipelines.train.config import TrainConfig
from pipelines.train.data import EvalSet, TrainStream, has_val, open_dataset
from pipelines.train.malloc import keep_freed_buffers
from pipelines.train.metrics import MetricsLogger, peak_flops

PID_FILE = "rank_{rank}.pid"  # in cfg.testing.pid_dir (test hook: failure drills kill a rank by pid)
ATTEMPTS = "attempts.jsonl"  # in cfg.testing.pid_dir: one line per worker start (rank, pid, time)
WORKERS_DIR = "workers"  # RUN_DIR/workers/peak_rss_mb.json: every rank's peak RSS, for the run summary
CHECKPOINT_LOG = "checkpoints.jsonl"  # RUN_DIR/checkpoints.jsonl: every committed checkpoint


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries a forking parent's peak across exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # elsewhere: ru_maxrss (KiB on Linux)


def atomic_copytree(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def lm_loss(logits, targets):
    """Mean next-token cross-entropy over counted targets (targets == -1 count for nothing).

    (B, T, V) logits, (B, T) targets -> scalar. Sum / count instead of the mean reduction: a batch
    without any counted target (an SFT micro batch of prompts only) gives exactly 0 loss and 0
    gradient rather than NaN.
    """
    import torch.nn.functional as F

    n = (targets != -1).sum().clamp(min=1)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1,
                           reduction="sum") / n


def build_model(cfg, model_cfg, init_ckpt: str | None):
    """Scratch (seeded, so every rank builds the same weights) or the weights of a gptcore checkpoint."""
    import torch

    from gptcore.model import GPT

    if init_ckpt:
        from gptcore.checkpoint import load_checkpoint

        ck = load_checkpoint(init_ckpt, dtype=torch.float32)
        model = GPT(model_cfg)
        sd = ck.model.state_dict()
        model.load_state_dict(sd)
        return model
    torch.manual_seed(cfg.seed)
    return GPT(model_cfg)


class Dist:
    """Tiny wrapper over torch.distributed that also works for a single process without a group."""

    def __init__(self, world: int):
        import torch.distributed as dist

        self.world = world
        self.dist = dist if world > 1 and dist.is_available() and dist.is_initialized() else None

    def all_reduce_mean(self, t):
        if self.dist is not None:
            self.dist.all_reduce(t)
            t /= self.world
        return t

    def all_reduce_sum(self, t):
        if self.dist is not None:
            self.dist.all_reduce(t)
        return t

    def all_gather_object(self, obj) -> list:
        if self.dist is None:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()


@dataclass
class WorkerState:
    """Everything one rank holds while it trains (built by setup_worker, advanced by train_step)."""

    cfg: TrainConfig
    model_cfg: Any  # GPTConfig
    run_dir: Path
    rank: int
    world: int
    dist: Dist
    device: Any  # torch.device
    ds: Any  # pipelines.train.data.Dataset
    stream: Any  # TrainStream
    evalset: Any  # EvalSet, or None: a dataset without val rows is never evaluated
    manifest_id: str | None
    engine: Any  # DeepSpeed engine
    optimizer: Any
    autocast: Any  # a context manager around forward passes
    own_clip: bool  # the loop clips (ZeRO-0 in fp32/bf16) rather than DeepSpeed
    params: list
    block_size: int
    timeline: dict[str, Any]
    start_step: int = 0
    best_val: float = math.inf
    last_val: float | None = None
    log: Any = None  # MetricsLogger on rank 0
    peak: float = 0.0  # peak FLOP/s per worker (rank 0), for MFU
    flops_per_token: float = 0.0
    t_last: float = 0.0  # perf_counter at the end of the previous step
    pending: list = field(default_factory=list)  # (step, loss tensor, gnorm, lr, seconds) not logged yet
    eval_s: float = 0.0  # wall seconds spent in evaluations (this attempt)
    ckpt_s: float = 0.0  # wall seconds the step loop spent on checkpoints (this attempt)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.global_batch_size * self.block_size

    def to_dev(self, a):
        import torch

        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=True)


def record_pid(pid_dir: str, rank: int) -> None:
    """Test hook (cfg.testing.pid_dir): which process is rank R right now (failure drills kill it by pid)."""
    d = Path(pid_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / PID_FILE.format(rank=rank)).write_text(f"{os.getpid()}\n")
    with open(d / ATTEMPTS, "a") as f:
        f.write(json.dumps({"rank": rank, "pid": os.getpid(), "time": time.time()}) + "\n")


def _process_setup(cfg: TrainConfig, local_rank: int):
    """Threads, accelerator, device and global seeds of this worker process -> torch.device."""
    import torch

    torch.set_num_threads(cfg.threads())
    if not cfg.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported
        if cfg.malloc_reuse:
            keep_freed_buffers()
    device = torch.device(f"cuda:{local_rank}" if cfg.use_gpu else "cpu")
    if cfg.use_gpu:
        torch.cuda.set_device(device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    return device


def setup_worker(payload: dict[str, Any], rank: int, world: int, local_rank: int) -> WorkerState:
    """Config, process, data, model and DeepSpeed engine of one rank (identical weights on every rank)."""
    import torch

    from gptcore.config import GPTConfig

    cfg: TrainConfig = from_dict(TrainConfig, payload["config"])
    model_cfg = GPTConfig.from_dict(payload["model_config"])
    run_dir = Path(payload["run_dir"])
    dist = Dist(world)
    (run_dir / WORKERS_DIR).mkdir(parents=True, exist_ok=True)
    if cfg.testing.pid_dir:
        record_pid(cfg.testing.pid_dir, rank)
    timeline = {"driver_start": payload.get("driver_start"), "worker_start": time.time()}
    device = _process_setup(cfg, local_rank)
    if cfg.precision == "auto":  # resolved here, at the worker's thread count: its own device decides
        cfg = dataclasses.replace(cfg, precision=dsmod.auto_precision(cfg.use_gpu))
    dsmod.import_deepspeed(cfg)  # here rather than in build_engine: its import time is a phase of its own
    timeline["imports_done"] = time.time()

    ds = open_dataset(cfg.data)
    stream = TrainStream(ds.split_rows("train"), seed=cfg.seed, micro_batch=cfg.batch.micro_batch_size,
                         grad_accum=cfg.grad_accum, world=world, rank=rank, doc_mask=cfg.doc_mask)
    evalset = None
    if has_val(ds.manifest):
        evalset = EvalSet(ds.split_rows("val"), seed=cfg.seed, micro_batch=cfg.batch.micro_batch_size,
                          iters=cfg.eval_iters, world=world, rank=rank, doc_mask=cfg.doc_mask)
    timeline["data_ready"] = time.time()
    model = build_model(cfg, model_cfg, payload.get("init_checkpoint"))
    timeline["model_ready"] = time.time()
    torch.manual_seed(cfg.seed + 1 + rank)  # dropout differs per rank, deterministically
    engine, optimizer = dsmod.build_engine(cfg, model, world)
    if cfg.compile:
        engine.compile()
    timeline["engine_ready"] = time.time()
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if cfg.precision == "bf16" and not cfg.use_gpu
                else contextlib.nullcontext())
    return WorkerState(
        cfg=cfg, model_cfg=model_cfg, run_dir=run_dir, rank=rank, world=world, dist=dist, device=device, ds=ds,
        stream=stream, evalset=evalset, manifest_id=ds.manifest.get("id"), engine=engine, optimizer=optimizer,
        autocast=autocast, own_clip=not dsmod.clips_in_deepspeed(cfg) and cfg.optim.grad_clip > 0,
        params=[p for p in engine.module.parameters() if p.requires_grad], block_size=ds.block_size,
        timeline=timeline)


def restore(w: WorkerState, d: Path) -> None:
    """Continue from checkpoint directory d: this rank's engine state and RNG states, the step, best val loss."""
    import torch

    cfg, rank = w.cfg, w.rank
    man = st.verify_checkpoint_dir(d, checksums=False)
    own = {k: v for k, v in man["files"].items() if v.get("rank") == rank}
    if cfg.ckpt_checksums:
        for rel, want in own.items():
            if "sha256" in want and st.sha256_file(d / rel) != want["sha256"]:
                raise st.CheckpointStateError(f"checkpoint file {d / rel} is corrupt (sha256 mismatch)")
    ts = json.loads((d / st.TRAINER_STATE).read_text())
    for key, now in (("world_size", w.world), ("zero_stage", cfg.zero_stage),
                     ("global_batch_size", cfg.global_batch_size), ("data_manifest_id", w.manifest_id)):
        if ts.get(key) != now:
            raise st.CheckpointStateError(f"checkpoint {d} was saved with {key}={ts.get(key)!r} but this run "
                                          f"has {key}={now!r}; resume with the original setting")
    load_path, _ = w.engine.load_checkpoint(str(d / st.DS_DIR), tag=st.DS_TAG, load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
    if load_path is None:
        raise st.CheckpointStateError(f"DeepSpeed could not load {d / st.DS_DIR}/{st.DS_TAG}")
    st.restore_rng(torch.load(d / f"rank_{rank}.pt", weights_only=True))
    w.start_step = int(ts["step"])
    w.best_val = float(ts.get("best_val_loss", math.inf))
    w.last_val = ts.get("val_loss")


def open_metrics(w: WorkerState, resumed: bool) -> None:
    """Rank 0's metrics logger (and its first events) and the MFU peak; the FLOPs per token on every rank."""
    import torch

    cfg = w.cfg
    if w.rank == 0:
        w.log = MetricsLogger(w.run_dir, max_steps=cfg.max_steps, start_step=w.start_step, resumed=resumed,
                              tensorboard=cfg.log.tensorboard, progress=cfg.log.progress, console=cfg.log.console)
        if resumed:
            w.log.event(w.start_step, "resumed", from_step=w.start_step)
        w.log.event(w.start_step, "worker_ready", **w.timeline, ready=time.time(), precision=cfg.precision,
                    compile=cfg.compile, collectives=getattr(w.engine, "raygpt_collectives", None))
        dt = "fp32" if cfg.precision == "fp32" or (not cfg.use_gpu and cfg.precision != "bf16") else cfg.precision
        w.peak = cfg.log.peak_flops or peak_flops(torch.get_num_threads(), dt, "cuda" if cfg.use_gpu else "cpu",
                                                  cfg.log.peak_flops_cache)
    w.flops_per_token = w.engine.module.flops_per_token(w.block_size)
    w.timeline["loop_ready"] = time.time()


def evaluate(w: WorkerState) -> float:
    """Mean validation loss over every rank's fixed eval batches (all ranks call it)."""
    import torch
    import torch.nn.functional as F

    engine = w.engine
    engine.eval()
    tot = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), w.autocast:
        for x, y, dd in w.evalset.batches:
            logits, _ = engine(w.to_dev(x), doc_ids=w.to_dev(dd))
            yy = w.to_dev(y)
            tot[0] += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), yy.reshape(-1),
                                      ignore_index=-1, reduction="sum").double().cpu()
            tot[1] += float((y != -1).sum())
    engine.train()
    w.dist.all_reduce_sum(tot)
    return float(tot[0] / tot[1].clamp(min=1))


def maybe_evaluate(w: WorkerState, done: int, is_last: bool) -> dict[str, Any]:
    """Evaluate when due (every eval_interval steps and at the end) -> the step's metrics for ray.train.report."""
    cfg = w.cfg
    metrics: dict[str, Any] = {"step": done}
    if w.evalset is not None and (is_last or (cfg.eval_interval and done % cfg.eval_interval == 0)):
        flush(w)
        t0 = time.perf_counter()
        w.last_val = evaluate(w)
        w.eval_s += time.perf_counter() - t0
        metrics.update(val_loss=w.last_val, val_ppl=math.exp(min(w.last_val, 50)))
        if w.rank == 0:
            w.log.eval(done, {"val_loss": w.last_val, "val_ppl": metrics["val_ppl"]})
        w.best_val = min(w.best_val, w.last_val)
    return metrics


def train_step(w: WorkerState, step: int) -> int:
    """One optimizer step (grad accumulation, clipping, LR); its loss joins the pending records. -> steps done."""
    import torch

    cfg, engine = w.cfg, w.engine
    lr = dsmod.lr_at(cfg, step)
    dsmod.set_lr(w.optimizer, lr, cfg)
    accum = cfg.grad_accum
    loss_sum = None
    gnorm = float("nan")
    for m in range(accum):
        x, y, dd = w.stream.micro_batch(step, m)
        with w.autocast:
            logits, _ = engine(w.to_dev(x), doc_ids=w.to_dev(dd))  # (B, T, V)
        loss = lm_loss(logits, w.to_dev(y))
        engine.backward(loss)
        if m == accum - 1 and w.own_clip:
            gnorm = float(torch.nn.utils.clip_grad_norm_(w.params, cfg.optim.grad_clip))
        engine.step()
        ld = loss.detach()
        loss_sum = ld if loss_sum is None else loss_sum + ld
    if not w.own_clip:
        g = engine.get_global_grad_norm()
        gnorm = float(g) if g is not None else float("nan")
    now = time.perf_counter()
    w.pending.append((step, loss_sum / accum, gnorm, lr, now - w.t_last))
    # a step's time runs from the end of the previous one: logging (flush) counts, like every other
    # per-step cost; evaluations, checkpoints and throttling are set aside by the caller
    w.t_last = now
    done = step + 1
    if done % cfg.log.interval == 0 or done == cfg.max_steps:
        flush(w)
    return done


def flush(w: WorkerState) -> None:
    """Average the pending steps' losses over the ranks; rank 0 logs them."""
    import torch

    if not w.pending:
        return
    losses = torch.stack([p[1] for p in w.pending]).float()
    w.dist.all_reduce_mean(losses)
    if w.rank == 0:
        tps_of, world, peak = w.tokens_per_step, w.world, w.peak
        for (s, _, gn, lr, sec), lo in zip(w.pending, losses.tolist()):
            tps = tps_of / sec if sec > 0 else float("nan")
            w.log.train(s + 1, {"loss": lo, "lr": lr, "grad_norm": gn, "tokens_per_s": tps,
                                "mfu": w.flops_per_token * tps / (peak * world) if peak else float("nan"),
                                "step_time_s": sec, "tokens_seen": (s + 1) * tps_of,
                                "epoch": w.stream.epoch_of(s + 1), "peak_rss_mb": peak_rss_mb()})
    w.pending.clear()


def checkpoint_due(cfg: TrainConfig, done: int) -> bool:
    return done == cfg.max_steps or bool(cfg.ckpt_interval and done % cfg.ckpt_interval == 0)


def _consolidated_state_dict(w: WorkerState) -> dict | None:
    """Full fp32 weights on rank 0 (ZeRO-3: gathered from the partitions; every rank must call it)."""
    engine = w.engine
    sd = None
    if w.cfg.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if w.rank == 0:
                sd = {k: v.detach().clone().cpu() for k, v in engine.module.state_dict().items()}
    elif w.rank == 0:
        sd = {k: v.detach().clone().cpu() for k, v in engine.module.state_dict().items()}
    return sd if sd is None else {k: v.float() for k, v in sd.items()}


def _write_rank0_files(w: WorkerState, tmp: Path, step: int, metrics: dict[str, Any], sd: dict) -> None:
    """The consolidated inference checkpoint and trainer_state.json (rank 0 only)."""
    from gptcore.checkpoint import save_checkpoint

    cfg = w.cfg
    save_checkpoint(tmp / st.MODEL_DIR, sd, w.ds.tokenizer_path(), {
        "step": step, "tokens_seen": step * w.tokens_per_step,
        "val_loss": metrics.get("val_loss"), "run_dir": str(w.run_dir),
        "parents": {"data_manifest_id": w.manifest_id, "train_config_hash": config_hash(cfg)},
    }, config=w.model_cfg)
    st.write_json(tmp / st.TRAINER_STATE, {
        "format": st.FORMAT, "step": step, "samples_seen": step * cfg.global_batch_size,
        "tokens_seen": step * w.tokens_per_step, "epoch": w.stream.epoch_of(step),
        "best_val_loss": w.best_val, "val_loss": metrics.get("val_loss"), "world_size": w.world,
        "zero_stage": cfg.zero_stage, "global_batch_size": cfg.global_batch_size,
        "data_manifest_id": w.manifest_id, "seed": cfg.seed, "time": time.time()})


def write_checkpoint(w: WorkerState, tmp: Path, step: int, metrics: dict[str, Any]) -> None:
    """This rank's part of checkpoint `step` in local directory tmp, complete across ranks before it is reported:
    the DeepSpeed shard, RNG states, file list; rank 0 adds the model, trainer state and the merged manifest."""
    import torch

    cfg, rank = w.cfg, w.rank
    w.engine.save_checkpoint(str(tmp / st.DS_DIR), tag=st.DS_TAG)
    torch.save(st.capture_rng(), tmp / f"rank_{rank}.pt")
    sd = _consolidated_state_dict(w)
    if rank == 0:
        _write_rank0_files(w, tmp, step, metrics, sd)
    mine = st.list_files(tmp, cfg.ckpt_checksums)
    for v in mine.values():
        v["rank"] = rank
    st.write_json(tmp / f"files_rank_{rank}.json", mine)
    every = w.dist.all_gather_object(mine)
    merged: dict[str, Any] = {}
    for files in every:
        clash = set(files) & set(merged)
        if clash:
            raise st.CheckpointStateError(f"ranks wrote the same checkpoint file(s) {sorted(clash)}")
        merged.update(files)
    # every rank's shard must be there before the checkpoint is reported
    st.check_complete(merged, cfg.zero_stage, w.world, f"at step {step} (before reporting)")
    if rank == 0:
        st.write_json(tmp / st.MANIFEST, {"format": st.FORMAT, "step": step, "world_size": w.world,
                                          "zero_stage": cfg.zero_stage, "files": merged})


def publish_checkpoint(w: WorkerState, persisted: Path, step: int, metrics: dict[str, Any]) -> None:
    """Rank 0, once Ray committed checkpoint `step` at `persisted`: verify it, log it, refresh last/ and best/."""
    st.verify_checkpoint_dir(persisted, checksums=False)
    with open(w.run_dir / CHECKPOINT_LOG, "a") as f:
        f.write(json.dumps({"step": step, "path": str(persisted), "val_loss": metrics.get("val_loss"),
                            "time": time.time()}) + "\n")
    atomic_copytree(persisted / st.MODEL_DIR, w.run_dir / "last")
    if w.cfg.keep_best and metrics.get("val_loss") is not None and metrics["val_loss"] <= w.best_val:
        atomic_copytree(persisted / st.MODEL_DIR, w.run_dir / "best")
    w.log.event(step, "checkpoint", path=str(persisted))


def finish(w: WorkerState) -> None:
    """Every rank's peak memory into RUN_DIR/workers/peak_rss_mb.json (for the run summary); close the log."""
    rss = w.dist.all_gather_object(peak_rss_mb())
    if w.rank == 0:
        st.write_json(w.run_dir / WORKERS_DIR / "peak_rss_mb.json", {f"rank_{r}": v for r, v in enumerate(rss)})
        w.timeline["worker_done"] = time.time()
        # every mark of this attempt (pipelines/train/phases.py) and the time evaluations and checkpoints took
        w.log.event(w.cfg.max_steps, "timeline", **w.timeline, eval_s=round(w.eval_s, 3), ckpt_s=round(w.ckpt_s, 3),
                    compile=w.cfg.compile)
        w.log.event(w.cfg.max_steps, "finished")
        w.log.close()
