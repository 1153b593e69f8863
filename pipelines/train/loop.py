"""The per-worker training loop: the ONE place in raygpt that calls ray.train (report/get_checkpoint/get_context).

    TorchTrainer(train_loop_per_worker, train_loop_config=payload, ...)   # built by pipelines.train.trainer

Each worker: seeds, builds the model (identical on every rank), wraps it in a DeepSpeed engine on Ray
Train's process group, restores the latest checkpoint Ray hands it (engine state of its own rank, RNG
states, data position), then runs optimizer steps: grad accumulation over micro batches, clipping,
the warmup+cosine LR, eval every eval_interval steps, and a checkpoint every ckpt_interval steps and at
the end. A checkpoint is every rank's DeepSpeed shard + RNG states + the step (= data position) + a
consolidated gptcore checkpoint for inference; the file lists of all ranks are all-gathered and checked
before `ray.train.report`, and the merged copy in storage is checked again after it. Rank 0 writes
metrics (JSONL, TensorBoard, progress bar). Does not: validate the config or start Ray (trainer.py).
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
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PID_DIR = "workers"
CHECKPOINT_LOG = "checkpoints.jsonl"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _atomic_copytree(src: Path, dst: Path) -> None:
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


class _Dist:
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


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    import ray.train
    import torch
    import torch.nn.functional as F

    from gptcore.config import GPTConfig
    from pipelines.config import from_dict
    from pipelines.train import deepspeed as dsmod
    from pipelines.train import state as st
    from pipelines.train.config import TrainConfig
    from pipelines.train.data import EvalSet, TrainStream, has_val, open_dataset
    from pipelines.train.metrics import MetricsLogger, peak_flops

    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    cfg: TrainConfig = from_dict(TrainConfig, payload["config"])
    if cfg.precision == "auto":  # resolved here: the worker's own device decides (a driver may have none)
        cfg = dataclasses.replace(cfg, precision=dsmod.auto_precision(cfg.use_gpu))
    model_cfg = GPTConfig.from_dict(payload["model_config"])
    run_dir = Path(payload["run_dir"])
    dist = _Dist(world)

    # pid files: which process is rank R right now (failure drills kill it by pid)
    pid_dir = run_dir / PID_DIR
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"rank_{rank}.pid").write_text(f"{os.getpid()}\n")
    with open(pid_dir / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"rank": rank, "pid": os.getpid(), "time": time.time()}) + "\n")

    torch.set_num_threads(cfg.threads())
    if not cfg.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported
    timeline = {"driver_start": payload.get("driver_start"), "worker_start": time.time()}
    device = torch.device(f"cuda:{local_rank}" if cfg.use_gpu else "cpu")
    if cfg.use_gpu:
        torch.cuda.set_device(device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    ds = open_dataset(cfg.data)
    stream = TrainStream(ds.split_rows("train"), seed=cfg.seed, micro_batch=cfg.batch.micro_batch_size,
                         grad_accum=cfg.grad_accum, world=world, rank=rank, doc_mask=cfg.doc_mask)
    evalset = None  # a dataset without val rows: no evaluation (and no best checkpoint)
    if has_val(ds.manifest):
        evalset = EvalSet(ds.split_rows("val"), seed=cfg.seed, micro_batch=cfg.batch.micro_batch_size,
                          iters=cfg.eval_iters, world=world, rank=rank, doc_mask=cfg.doc_mask)
    manifest_id = ds.manifest.get("id")

    model = build_model(cfg, model_cfg, payload.get("init_checkpoint"))
    torch.manual_seed(cfg.seed + 1 + rank)  # dropout differs per rank, deterministically
    engine, optimizer = dsmod.build_engine(cfg, model, world)
    if cfg.compile:
        engine.compile()
    timeline["engine_ready"] = time.time()
    own_clip = not dsmod.clips_in_deepspeed(cfg) and cfg.optim.grad_clip > 0
    params = [p for p in engine.module.parameters() if p.requires_grad]
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if cfg.precision == "bf16" and not cfg.use_gpu
                else contextlib.nullcontext())
    T = ds.block_size
    tokens_per_step = cfg.global_batch_size * T

    # ---- restore ----------------------------------------------------------------------------
    start_step, best_val, last_val = 0, math.inf, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and (payload.get("resume") or (run_dir / CHECKPOINT_LOG).is_file()):
        # a resume, or a restart after this run registered checkpoints: never silently start over
        raise st.CheckpointStateError(f"run {run_dir} has checkpoints ({run_dir / CHECKPOINT_LOG}) but Ray Train "
                                      f"handed the workers none; refusing to start from scratch")
    if ckpt is not None:
        with ckpt.as_directory() as d:
            d = Path(d)
            man = st.verify_checkpoint_dir(d, checksums=False)
            own = {k: v for k, v in man["files"].items() if v.get("rank") == rank}
            if cfg.ckpt_checksums:
                for rel, want in own.items():
                    if "sha256" in want and st.sha256_file(d / rel) != want["sha256"]:
                        raise st.CheckpointStateError(f"checkpoint file {d / rel} is corrupt (sha256 mismatch)")
            ts = json.loads((d / st.TRAINER_STATE).read_text())
            for key, now in (("world_size", world), ("zero_stage", cfg.zero_stage),
                             ("global_batch_size", cfg.global_batch_size), ("data_manifest_id", manifest_id)):
                if ts.get(key) != now:
                    raise st.CheckpointStateError(f"checkpoint {d} was saved with {key}={ts.get(key)!r} but this run "
                                                  f"has {key}={now!r}; resume with the original setting")
            load_path, _ = engine.load_checkpoint(str(d / st.DS_DIR), tag=st.DS_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
            if load_path is None:
                raise st.CheckpointStateError(f"DeepSpeed could not load {d / st.DS_DIR}/{st.DS_TAG}")
            st.restore_rng(torch.load(d / f"rank_{rank}.pt", weights_only=True))
            start_step = int(ts["step"])
            best_val = float(ts.get("best_val_loss", math.inf))
            last_val = ts.get("val_loss")

    log = None
    if rank == 0:
        log = MetricsLogger(run_dir, max_steps=cfg.max_steps, start_step=start_step, resumed=ckpt is not None,
                            tensorboard=cfg.log.tensorboard, progress=cfg.log.progress, console=cfg.log.console)
        if ckpt is not None:
            log.event(start_step, "resumed", from_step=start_step)
        log.event(start_step, "worker_ready", **timeline, ready=time.time(), precision=cfg.precision,
                  compile=cfg.compile, collectives=getattr(engine, "raygpt_collectives", None))
    peak = 0.0
    if rank == 0:
        dt = "fp32" if cfg.precision == "fp32" or (not cfg.use_gpu and cfg.precision != "bf16") else cfg.precision
        peak = cfg.log.peak_flops or peak_flops(torch.get_num_threads(), dt, "cuda" if cfg.use_gpu else "cpu",
                                                cfg.log.peak_flops_cache)
    flops_per_token = engine.module.flops_per_token(T)

    def to_dev(a):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)

    def evaluate() -> float:
        engine.eval()
        tot = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad(), autocast:
            for x, y, dd in evalset.batches:
                logits, _ = engine(to_dev(x), doc_ids=to_dev(dd))
                yy = to_dev(y)
                tot[0] += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), yy.reshape(-1),
                                          ignore_index=-1, reduction="sum").double().cpu()
                tot[1] += float((y != -1).sum())
        engine.train()
        dist.all_reduce_sum(tot)
        return float(tot[0] / tot[1].clamp(min=1))

    def save(step: int, metrics: dict[str, Any]) -> None:
        from ray.train import Checkpoint

        tmp = Path(tempfile.mkdtemp(prefix=f"raygpt-ckpt-{step}-r{rank}-"))
        try:
            engine.save_checkpoint(str(tmp / st.DS_DIR), tag=st.DS_TAG)
            torch.save(st.capture_rng(), tmp / f"rank_{rank}.pt")
            # consolidated inference weights (ZeRO-3: gather the partitioned parameters first)
            sd = None
            if cfg.zero_stage == 3:
                import deepspeed

                with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
                    if rank == 0:
                        sd = {k: v.detach().clone().cpu() for k, v in engine.module.state_dict().items()}
            elif rank == 0:
                sd = {k: v.detach().clone().cpu() for k, v in engine.module.state_dict().items()}
            if rank == 0:
                from gptcore.checkpoint import save_checkpoint
                from pipelines.config import config_hash

                sd = {k: v.float() for k, v in sd.items()}
                save_checkpoint(tmp / st.MODEL_DIR, sd, ds.tokenizer_path(), {
                    "step": step, "tokens_seen": step * tokens_per_step,
                    "val_loss": metrics.get("val_loss"), "run_dir": str(run_dir),
                    "parents": {"data_manifest_id": manifest_id, "train_config_hash": config_hash(cfg)},
                }, config=model_cfg)
                st.write_json(tmp / st.TRAINER_STATE, {
                    "format": st.FORMAT, "step": step, "samples_seen": step * cfg.global_batch_size,
                    "tokens_seen": step * tokens_per_step, "epoch": stream.epoch_of(step),
                    "best_val_loss": best_val, "val_loss": metrics.get("val_loss"), "world_size": world,
                    "zero_stage": cfg.zero_stage, "global_batch_size": cfg.global_batch_size,
                    "data_manifest_id": manifest_id, "seed": cfg.seed, "time": time.time()})
            mine = st.list_files(tmp, cfg.ckpt_checksums)
            for v in mine.values():
                v["rank"] = rank
            st.write_json(tmp / f"files_rank_{rank}.json", mine)
            every = dist.all_gather_object(mine)
            merged: dict[str, Any] = {}
            for r, files in enumerate(every):
                clash = set(files) & set(merged)
                if clash:
                    raise st.CheckpointStateError(f"ranks wrote the same checkpoint file(s) {sorted(clash)}")
                merged.update(files)
            # every rank's shard must be there before the checkpoint is reported
            st.check_complete(merged, cfg.zero_stage, world, f"at step {step} (before reporting)")
            if rank == 0:
                st.write_json(tmp / st.MANIFEST, {"format": st.FORMAT, "step": step, "world_size": world,
                                                  "zero_stage": cfg.zero_stage, "files": merged})
            name = st.ckpt_dir_name(step)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(tmp)), checkpoint_dir_name=name)
            dist.barrier()  # every rank's upload has finished
            if rank == 0:
                # wait until the controller has registered it: only then is it what a restart resumes from
                ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
                storage = ctx.get_storage()
                persisted = Path(storage.experiment_fs_path) / name
                st.verify_checkpoint_dir(persisted, checksums=False)
                with open(run_dir / CHECKPOINT_LOG, "a") as f:
                    f.write(json.dumps({"step": step, "path": str(persisted), "val_loss": metrics.get("val_loss"),
                                        "time": time.time()}) + "\n")
                _atomic_copytree(persisted / st.MODEL_DIR, run_dir / "last")
                if cfg.keep_best and metrics.get("val_loss") is not None and metrics["val_loss"] <= best_val:
                    _atomic_copytree(persisted / st.MODEL_DIR, run_dir / "best")
                log.event(step, "checkpoint", path=str(persisted))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- train ------------------------------------------------------------------------------
    engine.train()
    pending: list[tuple[int, Any, float, float, float]] = []  # (step, loss tensor, gnorm, lr, seconds)

    def flush() -> None:
        if not pending:
            return
        losses = torch.stack([p[1] for p in pending]).float()
        dist.all_reduce_mean(losses)
        if rank == 0:
            for (s, _, gn, lr, sec), lo in zip(pending, losses.tolist()):
                tps = tokens_per_step / sec if sec > 0 else float("nan")
                log.train(s + 1, {"loss": lo, "lr": lr, "grad_norm": gn, "tokens_per_s": tps,
                                  "mfu": flops_per_token * tps / (peak * world) if peak else float("nan"),
                                  "step_time_s": sec, "tokens_seen": (s + 1) * tokens_per_step,
                                  "epoch": stream.epoch_of(s + 1), "peak_rss_mb": _peak_rss_mb()})
        pending.clear()

    accum = cfg.grad_accum
    t_last = time.perf_counter()
    for step in range(start_step, cfg.max_steps):
        lr = dsmod.lr_at(cfg, step)
        dsmod.set_lr(optimizer, lr)
        loss_sum = None
        gnorm = float("nan")
        for m in range(accum):
            x, y, dd = stream.micro_batch(step, m)
            with autocast:
                logits, _ = engine(to_dev(x), doc_ids=to_dev(dd))  # (B, T, V)
            loss = lm_loss(logits, to_dev(y))
            engine.backward(loss)
            if m == accum - 1 and own_clip:
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip))
            engine.step()
            ld = loss.detach()
            loss_sum = ld if loss_sum is None else loss_sum + ld
        if not own_clip:
            g = engine.get_global_grad_norm()
            gnorm = float(g) if g is not None else float("nan")
        now = time.perf_counter()
        pending.append((step, loss_sum / accum, gnorm, lr, now - t_last))
        # a step's time runs from the end of the previous one: logging (flush) counts, like every other
        # per-step cost; evaluations, checkpoints and throttling are set aside below
        t_last = now
        done = step + 1
        if done % cfg.log.interval == 0 or done == cfg.max_steps:
            flush()
        t_aside = time.perf_counter()
        is_last = done == cfg.max_steps
        metrics: dict[str, Any] = {"step": done}
        if evalset is not None and (is_last or (cfg.eval_interval and done % cfg.eval_interval == 0)):
            flush()
            last_val = evaluate()
            metrics.update(val_loss=last_val, val_ppl=math.exp(min(last_val, 50)))
            if rank == 0:
                log.eval(done, {"val_loss": last_val, "val_ppl": metrics["val_ppl"]})
            best_val = min(best_val, last_val)
        if is_last or (cfg.ckpt_interval and done % cfg.ckpt_interval == 0):
            flush()
            if "val_loss" not in metrics and last_val is not None:
                metrics["val_loss"] = last_val  # the latest evaluation, for checkpoint scoring
            save(done, metrics)
        if cfg.throttle_s:
            time.sleep(cfg.throttle_s)
        t_last += time.perf_counter() - t_aside
    flush()

    # per-worker peak memory, for the run summary
    rss = dist.all_gather_object(_peak_rss_mb())
    if rank == 0:
        st.write_json(run_dir / "workers" / "peak_rss_mb.json", {f"rank_{r}": v for r, v in enumerate(rss)})
        log.event(cfg.max_steps, "finished")
        log.close()
