"""The per-worker training loop: the ONE place in raygpt that calls ray.train (report/get_checkpoint/get_context).

    TorchTrainer(train_loop_per_worker, train_loop_config=payload, ...)   # built by pipelines.train.trainer

Each worker: seeds, builds the model (identical on every rank), wraps it in a DeepSpeed engine on Ray
Train's process group, restores the latest checkpoint Ray hands it (engine state of its own rank, RNG
states, data position), then runs optimizer steps: grad accumulation over micro batches, clipping,
the warmup+cosine LR, eval every eval_interval steps, and a checkpoint every ckpt_interval steps and at
the end. A checkpoint is every rank's DeepSpeed shard + RNG states + the step (= data position) + a
consolidated gptcore checkpoint for inference; the file lists of all ranks are all-gathered and checked
before `ray.train.report`, and the merged copy in storage is checked again after it. launcher=local (Ray
Train's local mode: one worker in the driver's process, which stores nothing) writes and commits its
checkpoints itself, in the same layout (RUN_DIR/ray/checkpoint_XXXXXXXX), and resumes from the one the driver
verified. Rank 0 writes metrics (JSONL, TensorBoard, progress bar). The pieces (state, restore, evaluate, step,
checkpoint files) live in pipelines/train/worker.py, which never touches ray.train; this module only joins them to
Ray Train. Does not: validate the config or start Ray (trainer.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.console import worker_setup
from pipelines.train import state as st
from pipelines.train import worker as wk
from pipelines.train.worker import CHECKPOINT_LOG, build_model, lm_loss  # noqa: F401 - re-exported


def _restore(w: wk.WorkerState, payload: dict[str, Any]) -> bool:
    """Restore from the checkpoint Ray Train hands this worker (launcher=local: the one the driver verified);
    never silently start a run over. -> resumed?"""
    import ray.train

    if _is_local(payload):
        if payload.get("resume_from"):
            wk.restore(w, Path(payload["resume_from"]))
            return True
        ckpt = None
    else:
        ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        if payload.get("resume") or (w.run_dir / CHECKPOINT_LOG).is_file():
            # a resume, or a restart after this run registered checkpoints: never silently start over
            raise st.CheckpointStateError(f"run {w.run_dir} has checkpoints ({w.run_dir / CHECKPOINT_LOG}) but "
                                          f"{'the driver' if _is_local(payload) else 'Ray Train'} handed the "
                                          f"workers none; refusing to start from scratch")
        return False
    with ckpt.as_directory() as d:
        wk.restore(w, Path(d))
    return True


def _is_local(payload: dict[str, Any]) -> bool:
    return payload.get("launcher") == "local"


def _save_local(w: wk.WorkerState, step: int, metrics: dict[str, Any]) -> None:
    """launcher=local (one worker, this process; Ray Train's local mode stores nothing): write the checkpoint
    beside its final name, rename it into RUN_DIR/ray/checkpoint_XXXXXXXX when complete, commit it in the local
    snapshot (what a resume reads), hand it to ray.train.report, and publish it."""
    import ray.train
    from ray.train import Checkpoint

    rd = st.ray_dir(w.run_dir)
    rd.mkdir(parents=True, exist_ok=True)
    name = st.ckpt_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{st.LOCAL_TMP_PREFIX}{name}-", dir=rd))
    try:
        wk.write_checkpoint(w, tmp, step, metrics)
        dest = rd / name
        if dest.exists():  # an attempt that died before committing this step: never the latest committed one
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    st.commit_local_checkpoint(w.run_dir, name, w.cfg.keep_last_k)
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(dest)), checkpoint_dir_name=name)
    wk.publish_checkpoint(w, dest, step, metrics)


def _save(w: wk.WorkerState, ctx, step: int, metrics: dict[str, Any]) -> None:
    """Write checkpoint `step` (every rank), report it to Ray Train, and once committed publish it (rank 0)."""
    import ray.train
    from ray.train import Checkpoint

    tmp = Path(tempfile.mkdtemp(prefix=f"raygpt-ckpt-{step}-r{w.rank}-"))
    try:
        wk.write_checkpoint(w, tmp, step, metrics)
        name = st.ckpt_dir_name(step)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(tmp)), checkpoint_dir_name=name)
        w.dist.barrier()  # every rank's upload has finished
        if w.rank == 0:
            # wait until the controller has registered it: only then is it what a restart resumes from
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            persisted = Path(ctx.get_storage().experiment_fs_path) / name
            wk.publish_checkpoint(w, persisted, step, metrics)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _train(w: wk.WorkerState, ctx, payload: dict[str, Any]) -> None:
    """Optimizer steps from w.start_step to max_steps, with evaluations and checkpoints when due."""
    cfg = w.cfg
    w.engine.train()
    w.t_last = time.perf_counter()
    for step in range(w.start_step, cfg.max_steps):
        done = wk.train_step(w, step)
        if step == w.start_step:
            w.timeline["first_step_done"] = time.time()
        if done == cfg.max_steps:
            w.timeline["last_step_done"] = time.time()
        t_aside = time.perf_counter()  # evaluations, checkpoints and throttling do not count as step time
        metrics = wk.maybe_evaluate(w, done, is_last=done == cfg.max_steps)
        if wk.checkpoint_due(cfg, done):
            wk.flush(w)
            if "val_loss" not in metrics and w.last_val is not None:
                metrics["val_loss"] = w.last_val  # the latest evaluation, for checkpoint scoring
            t_ckpt = time.perf_counter()
            if _is_local(payload):
                _save_local(w, done, metrics)
            else:
                _save(w, ctx, done, metrics)
            w.ckpt_s += time.perf_counter() - t_ckpt
        if cfg.testing.throttle_s:  # a test hook (failure drills)
            time.sleep(cfg.testing.throttle_s)
        w.t_last += time.perf_counter() - t_aside
    wk.flush(w)


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    import ray.train

    worker_setup()  # library loggers at the driver's level (Ray Train's per-report INFO line included)
    ctx = ray.train.get_context()
    w = wk.setup_worker(payload, ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())
    resumed = _restore(w, payload)
    wk.open_metrics(w, resumed)
    _train(w, ctx, payload)
    wk.finish(w)
