"""`pipelines.train.run(cfg)`: validate everything, then train on Ray Train (TorchTrainer + DeepSpeed).

    from pipelines.train import run
    result = run(load_config(TrainConfig, "jobs/configs/train-debug.yaml"))
    result = run(cfg, resume="runs/train/debug")          # continue a stopped run (`--resume RUN_DIR`)

Before any worker starts, `validate` checks the dataset (manifest, tokenizer id, vocab and block size),
the init checkpoint, the run dir (a fresh run refuses a dir that already holds one; a resume refuses a
dir without a complete, checksum-valid latest checkpoint, or one whose config changed in a key that
would make it another run) and the cluster's resources. Then one TorchTrainer runs
`loop.train_loop_per_worker` with ScalingConfig(num_workers, use_gpu, resources_per_worker),
RunConfig(storage_path=RUN_DIR, name="ray"), FailureConfig(max_failures) - a failed worker group is
restarted from the latest checkpoint - and CheckpointConfig(num_to_keep=keep_last_k). launcher (resolve_launcher):
"ray" starts or joins Ray and runs the workers as Ray Train actors; "local" is Ray Train's local mode
(ScalingConfig(num_workers=0)): the one worker runs in this process on a one-process gloo group, no Ray is
started, and the loop commits its checkpoints itself. At the end: the loss-curve PNG and RUN_DIR/summary.json. Does not: prepare data (raygpt prep) or serve models.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import _ray_compat, console
from pipelines.config import ConfigError, config_hash, to_dict
from pipelines.errors import UserError
from pipelines.runtime import _free_port, ensure_ray, local_ray_started_here
from pipelines.train import state as st
from pipelines.train.bf16 import cpu_bf16_ok
from pipelines.train.config import RESUMABLE_CHANGES, TrainConfig
from pipelines.train.data import check_compatible, open_dataset
from pipelines.train.deepspeed import ds_config, release_process_group
from pipelines.train.loop import train_loop_per_worker
from pipelines.train.metrics import plot_loss_curve, read_metrics
from pipelines.train.phases import MARKS, phase_seconds, process_start

log = logging.getLogger("raygpt")

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
# Ray Train controller settings (propagated from the driver's environment; a value already set there wins):
# poll the workers every 0.5 s instead of 2 s (a checkpoint is committed, a failure noticed and the end of
# the run seen that much sooner), and give a worker group 10 min instead of 60 s to start on a busy machine
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}
# ... and, only when this run starts its own local Ray (one machine: no node is ever drained or preempted),
# no preemption watcher: one actor process less (~1.4 CPU-s of imports) while the worker group starts
LOCAL_RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Ray settings for a local Ray this run starts: no pre-started worker processes for the driver's job.
# Ray Train's controller carries its own runtime env and every actor it creates inherits it, so none of
# them can use a pre-started worker: the pool (one process per CPU) only competed for the CPU at start-up
LOCAL_RAY_ENV = {"RAY_prestart_worker_first_driver": "0"}
# imported on a background thread while the driver validates and starts Ray (torch alone is ~1.5 s)
DRIVER_IMPORTS = ("ray.train", "ray.train.torch")


class TrainError(UserError, RuntimeError):
    """Training ran but failed (after the allowed automatic restarts)."""


@dataclass
class Plan:
    """What validation resolved: the model shape, the init weights, the data, the resume point."""

    cfg: TrainConfig
    model_config: Any  # GPTConfig
    manifest: dict[str, Any]
    sft: bool
    init_checkpoint: str | None
    resume_from: Path | None
    resume_step: int = 0
    launcher: str = "ray"  # "ray" or "local": cfg.launcher with "auto" resolved (resolve_launcher)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    last_checkpoint: Path  # consolidated gptcore checkpoint of the last step (inference-ready)
    best_checkpoint: Path | None
    ray_checkpoint: Path | None  # the latest full (resumable) checkpoint
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def _median(xs: list) -> float | None:
    v = sorted(x for x in xs if isinstance(x, (int, float)) and math.isfinite(x))
    return v[len(v) // 2] if v else None


def _cpu_bf16_ok() -> bool:
    return cpu_bf16_ok()


def _cpp_compiler_problem() -> str | None:
    """Why torch.compile cannot build CPU kernels here (no C++ compiler), or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        return None  # another torch layout: let torch.compile speak for itself
    try:
        get_cpp_compiler()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _init_model_config(cfg: TrainConfig, run_dir: Path):
    """(GPTConfig, checkpoint path or None, tokenizer id or None) for init = scratch | raygpt | hf."""
    if cfg.init == "scratch":
        return None, None, None
    from gptcore.checkpoint import CheckpointError, import_hf, read_config, verify_checkpoint

    path = Path(cfg.init_path)
    try:
        if cfg.init == "hf":
            out = run_dir / "init_from_hf"
            if not (out / "checksums.json").is_file():
                import_hf(path, out, overwrite=True)
            path = out
        verify_checkpoint(path)
        mc = read_config(path)
        meta = json.loads((path / "meta.json").read_text())
    except CheckpointError as e:
        raise ConfigError(f"init_path={cfg.init_path!r} (init={cfg.init}): {e}") from None
    ov = cfg.model.overrides()
    shape = {k: v for k, v in ov.items() if k != "dropout"}
    diff = {k: (getattr(mc, k), v) for k, v in shape.items() if getattr(mc, k) != v}
    if diff:
        raise ConfigError(f"model overrides {diff} (checkpoint value, config value) contradict the init checkpoint "
                          f"{path}; an initialised model keeps its shape: drop these model.* keys")
    if "dropout" in ov:
        mc = mc.replace(dropout=ov["dropout"])
    return mc, str(path), meta.get("tokenizer_id")


def validate(cfg: TrainConfig, resume: str | os.PathLike | None = None) -> Plan:
    """All checks that need the filesystem; raises ConfigError (one clear message) before any worker starts."""
    run_dir = Path(cfg.run_dir)
    ds = open_dataset(cfg.data)
    m = ds.manifest
    mc, init_ckpt, tok_id = _init_model_config(cfg, run_dir)
    if mc is None:
        try:
            mc = cfg.model_config(vocab_size=int(m["vocab_size"]), block_size=int(m["block_size"]))
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
    sft = check_compatible(m, mc, tokenizer_id=tok_id, sft=cfg.sft)
    if not Path(ds.tokenizer_path()).is_file():
        raise ConfigError(f"data={cfg.data!r}: tokenizer.json is missing next to the manifest")
    if cfg.precision == "bf16" and not cfg.use_gpu and not _cpu_bf16_ok():
        raise ConfigError("precision=bf16 on CPU needs AVX512-BF16 or AMX (oneDNN reports no bf16 support on "
                          "this machine); use precision=fp32 (or auto: bf16 only where supported)")
    if cfg.compile and not cfg.use_gpu and (why := _cpp_compiler_problem()):
        raise ConfigError(f"compile=true on CPU needs a C++ compiler for torch.compile's kernels (g++ or clang++ "
                          f"on PATH, or CXX=...), found none ({why}); install one or set compile=false")
    rows = int(m["splits"]["train"].get("rows", 0) or 0)
    if rows and rows < cfg.global_batch_size:
        raise ConfigError(f"the global batch ({cfg.global_batch_size} sequences = micro_batch_size * grad_accum * "
                          f"num_workers) is larger than the whole train split ({rows} rows) of data={cfg.data!r}; "
                          f"lower batch.micro_batch_size or use more data")
    resume_from, resume_step, resume_launcher = None, 0, None
    rd = st.ray_dir(run_dir)
    if resume is None:
        if rd.exists() and any(rd.iterdir()):
            raise ConfigError(f"run_dir={str(run_dir)!r} already holds a training run ({rd}); continue it with "
                              f"`raygpt train --resume {run_dir}` or choose another run_dir / name")
    else:
        saved_path = run_dir / CONFIG_FILE
        if not saved_path.is_file():
            raise st.CheckpointStateError(f"cannot resume {run_dir}: {saved_path} is missing (not a raygpt run dir)")
        saved = json.loads(saved_path.read_text())["config"]
        now = to_dict(cfg)
        changed = {k: (saved.get(k), now.get(k)) for k in now
                   if k not in RESUMABLE_CHANGES and k != "run_dir" and saved.get(k) != now.get(k)}
        if changed:
            k, (old, new) = sorted(changed.items())[0]
            raise ConfigError(f"cannot resume {run_dir} with {k}={new!r}: the run was started with {k}={old!r} "
                              f"(changed keys: {sorted(changed)}); only {list(RESUMABLE_CHANGES)} may change on resume")
        resume_from, resume_launcher = st.latest_checkpoint_and_launcher(run_dir)
        man = st.verify_checkpoint_dir(resume_from, checksums=cfg.ckpt_checksums)
        resume_step = int(man["step"])
        if resume_step >= cfg.max_steps:
            raise ConfigError(f"run {run_dir} already reached step {resume_step} >= max_steps={cfg.max_steps}; "
                              f"resume with a larger max_steps (e.g. max_steps={resume_step * 2})")
    plan = Plan(cfg=cfg, model_config=mc, manifest=m, sft=sft, init_checkpoint=init_ckpt,
                resume_from=resume_from, resume_step=resume_step)
    plan.launcher = resolve_launcher(cfg, resume_launcher if resume is not None else None)
    return plan


def resolve_launcher(cfg: TrainConfig, resumed_by: str | None = None) -> str:
    """cfg.launcher with "auto" resolved -> "ray" or "local". `resumed_by`: the launcher that committed the
    checkpoint a resume continues from (its checkpoints are where that launcher's resume looks for them)."""
    if resumed_by is not None:
        if cfg.launcher not in ("auto", resumed_by):
            raise ConfigError(f"launcher={cfg.launcher}: run {cfg.run_dir} was checkpointed by launcher={resumed_by}; "
                              f"resume it with launcher={resumed_by} (or auto)")
        if resumed_by == "local" and cfg.max_failures != 0:
            raise ConfigError(f"max_failures={cfg.max_failures} needs launcher=ray, but run {cfg.run_dir} was "
                              f"checkpointed by launcher=local; resume it with max_failures=0")
        return resumed_by
    if cfg.launcher != "auto":
        return cfg.launcher
    one_local_worker = cfg.num_workers == 1 and cfg.max_failures == 0
    no_cluster = not os.environ.get("RAY_ADDRESS") and (not _ray_connected() or local_ray_started_here())
    return "local" if one_local_worker and no_cluster else "ray"


def _ray_connected() -> bool:
    import sys

    ray = sys.modules.get("ray")  # not imported: not connected (and importing it here would cost ~1 s)
    return bool(ray is not None and ray.is_initialized())


def _check_resources(cfg: TrainConfig) -> None:
    import ray

    have = ray.cluster_resources()
    need = cfg.worker_resources()
    for k, v in need.items():
        total = v * cfg.num_workers
        if have.get(k, 0) < total:
            raise ConfigError(f"num_workers={cfg.num_workers} x resources_per_worker {need} needs {total:g} {k} but "
                              f"the Ray cluster has {have.get(k, 0):g}; lower num_workers or resources_per_worker")


def _warn_without_dashboard() -> None:
    """Ray Train V2's PlacementGroupCleaner asks the State API (the dashboard) whether the run's controller
    is alive and removes the run's placement group - killing its workers - when the answer is "not found".
    Without a dashboard in this Ray cluster, the State API address in GCS still reads 127.0.0.1:8265, which
    may be ANOTHER Ray instance's dashboard on a shared machine: it answers "not found" and a healthy run
    is torn down (seen here: "Destroying worker since its placement group was removed")."""
    import warnings


    if not _ray_compat.dashboard_url():
        warnings.warn("this Ray cluster runs without the dashboard: Ray Train's placement-group cleaner may then "
                      "query another Ray instance on this machine and remove this run's workers; start Ray with "
                      "the dashboard (ray.init(include_dashboard=True)) when several Ray instances share a machine",
                      RuntimeWarning, stacklevel=3)


def _import_in_background(modules: tuple[str, ...]):
    """Start importing `modules` on a daemon thread -> the thread (join it before using them). An import
    error is left for the main thread's own import of the same module to raise."""
    import importlib
    import threading

    def work() -> None:
        for m in modules:
            try:
                importlib.import_module(m)
            except Exception:
                return

    t = threading.Thread(target=work, name="raygpt-train-imports", daemon=True)
    t.start()
    return t


def _start_ray(cfg: TrainConfig) -> dict[str, str]:
    """Start (a local Ray, with LOCAL_RAY_ENV) or join Ray -> the Ray Train settings for the controller."""
    import ray

    if not _ray_compat.train_v2_enabled():
        raise ConfigError("raygpt train runs on Ray Train V2 (checkpoint commit, restart semantics); unset "
                          "RAY_TRAIN_V2_ENABLED or set it to 1")
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        ensure_ray(None)
        return dict(RAY_TRAIN_ENV)
    added = {k: v for k, v in LOCAL_RAY_ENV.items() if k not in os.environ}
    os.environ.update(added)  # read by the raylet this call starts
    try:
        ensure_ray(None)
    finally:
        for k in added:
            os.environ.pop(k, None)
    return {**RAY_TRAIN_ENV, **LOCAL_RAY_TRAIN_ENV}


def run(cfg: TrainConfig, resume: str | os.PathLike | None = None) -> TrainResult:
    """Train (or continue training) a model as configured; returns where the results are."""
    t0 = time.time()
    marks = {"process_start": process_start(), "run_start": t0}
    if resume is not None:
        cfg.run_dir = str(resume)
    # absolute paths: Ray workers do not share the driver's working directory
    cfg.run_dir = str(Path(cfg.run_dir).resolve())
    if "://" not in cfg.data:
        cfg.data = str(Path(cfg.data).resolve())
    if cfg.init_path and "://" not in cfg.init_path:
        cfg.init_path = str(Path(cfg.init_path).resolve())
    if cfg.testing.pid_dir:
        cfg.testing.pid_dir = str(Path(cfg.testing.pid_dir).resolve())
    plan = validate(cfg, resume)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    marks["validated"] = time.time()
    if plan.resume_from is not None:
        log.info("train: resuming %s from %s (step %d of %d)", run_dir, plan.resume_from.name, plan.resume_step,
                 cfg.max_steps)
    if plan.launcher == "local":
        log.info("train: launcher=local (Ray Train's local mode: the one worker runs in this process; "
                 "launcher=ray runs it as a Ray actor)")
        fit, train_env = _fit_local, {}
    else:
        importing = _import_in_background(DRIVER_IMPORTS)
        try:
            train_env = _start_ray(cfg)
        finally:
            importing.join()  # also on an error: no import left running while the interpreter exits
        marks["ray_ready"] = time.time()
        fit = _fit_ray

    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    marks["ray_imported"] = time.time()
    if plan.launcher == "ray":
        _check_resources(cfg)
        _warn_without_dashboard()

    cfg_dict = to_dict(cfg)
    if resume is None:
        st.write_json(run_dir / CONFIG_FILE, {
            "config": cfg_dict, "config_hash": config_hash(cfg), "model_config": plan.model_config.to_dict(),
            "deepspeed": ds_config(cfg, cfg.num_workers), "data_manifest_id": plan.manifest.get("id"),
            "sft": plan.sft, "global_batch_size": cfg.global_batch_size, "grad_accum": cfg.grad_accum})
    payload = {"config": cfg_dict, "model_config": plan.model_config.to_dict(), "run_dir": str(run_dir),
               "init_checkpoint": plan.init_checkpoint, "resume": resume is not None,
               "driver_start": t0, "launcher": plan.launcher,
               "resume_from": str(plan.resume_from) if plan.resume_from is not None else None}
    # no worker_runtime_env: workers with the job's own runtime env can start from Ray's pool of
    # pre-started processes; the loop sets DS_ACCELERATOR and the thread count itself
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        # Ray Train's local mode is num_workers=0: the training function runs in this process
        scaling_config=ScalingConfig(num_workers=0 if plan.launcher == "local" else cfg.num_workers,
                                     use_gpu=cfg.use_gpu, resources_per_worker=cfg.worker_resources()),
        run_config=RunConfig(
            name=st.RAY_NAME, storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_last_k),
            logging_config=LoggingConfig(log_level=console.library_level_name())),
    )
    marks["fit_start"] = time.time()
    try:
        result = fit(trainer, train_env)
    except Exception as e:
        raise TrainError(f"training run {run_dir} failed: {type(e).__name__}: {e}") from e
    marks["fit_end"] = time.time()
    if getattr(result, "error", None):
        raise TrainError(f"training run {run_dir} failed: {result.error}")

    return _summarize(cfg, plan, result, t0, marks)


def _fit_ray(trainer, train_env: dict[str, str]):
    """TorchTrainer.fit() on the Ray cluster, with the controller settings in this process's environment."""
    added = {k: v for k, v in train_env.items() if k not in os.environ}
    os.environ.update(added)
    try:
        return trainer.fit()
    finally:
        for k in added:
            os.environ.pop(k, None)


def _fit_local(trainer, train_env: dict[str, str]):
    """TorchTrainer.fit() in Ray Train's local mode: the one worker runs here, on a one-process gloo group that
    Ray Train builds from torchrun's variables (set for the call only). This process's torch thread count and
    process group are as before afterwards, also when training fails."""
    import torch
    import torch.distributed as dist

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    clash = sorted(k for k in env if k in os.environ)
    if clash or dist.is_initialized():
        raise ConfigError(f"launcher=local starts its own one-process group, but this process already has "
                          f"{clash or 'a torch.distributed group'} (torchrun?); unset them or use launcher=ray")
    saved = os.environ.copy()
    threads = torch.get_num_threads()
    os.environ.update(env)
    try:
        return trainer.fit()
    finally:
        release_process_group()  # Ray destroys the group after a successful run, not after a failed one
        torch.set_num_threads(threads)
        for k in env:
            os.environ.pop(k, None)
        if "DS_ACCELERATOR" in saved:  # the worker setup sets it for DeepSpeed
            os.environ["DS_ACCELERATOR"] = saved["DS_ACCELERATOR"]
        else:
            os.environ.pop("DS_ACCELERATOR", None)


def _phases(run_dir: Path, marks: dict[str, float], wall_s: float) -> dict[str, Any]:
    """The driver's marks joined with rank 0's (its last "timeline" event) -> summary.json's phase keys."""
    tl = [r for r in read_metrics(run_dir, "event") if r.get("event") == "timeline"]
    last = tl[-1] if tl else {}
    marks = {**{k: last[k] for k, _ in MARKS if isinstance(last.get(k), (int, float))}, **marks}
    out: dict[str, Any] = {"phase_seconds": phase_seconds(marks), "phase_marks": marks,
                           "compile": last.get("compile")}
    for key, name in (("eval_s", "eval"), ("ckpt_s", "checkpoint")):
        if isinstance(last.get(key), (int, float)):
            out[f"{name}_seconds"] = last[key]
            # unrounded: a tiny run's evaluation is a few ms of a minute, which 4 decimals would print as 0
            out[f"{name}_share"] = last[key] / wall_s if wall_s > 0 else None
    return out


def _summarize(cfg: TrainConfig, plan: Plan, result, t0: float, marks: dict[str, float]) -> TrainResult:
    """The loss-curve PNG and RUN_DIR/summary.json of a finished run -> what run() returns."""

    run_dir = Path(cfg.run_dir)
    tr = read_metrics(run_dir, "train")
    ev = read_metrics(run_dir, "eval")
    plot = plot_loss_curve(run_dir, title=f"{cfg.name}: {plan.model_config.name}") if cfg.log.plot else None
    vals = [r["val_loss"] for r in ev]
    ray_ckpt = Path(result.checkpoint.path) if getattr(result, "checkpoint", None) else None
    out = TrainResult(
        run_dir=run_dir, steps=tr[-1]["step"] if tr else plan.resume_step,
        final_loss=tr[-1]["loss"] if tr else None, final_val_loss=vals[-1] if vals else None,
        best_val_loss=min(vals) if vals else None, last_checkpoint=run_dir / "last",
        best_checkpoint=(run_dir / "best") if (run_dir / "best").exists() else None,
        ray_checkpoint=ray_ckpt, wall_s=time.time() - t0)
    tps = _median([r.get("tokens_per_s") for r in tr[1:]])
    mfu = _median([r.get("mfu") for r in tr[1:]])
    rss_file = run_dir / "workers" / "peak_rss_mb.json"
    summary = {
        "launcher": plan.launcher, "steps": out.steps, "final_loss": out.final_loss, "final_val_loss": out.final_val_loss,
        "best_val_loss": out.best_val_loss, "wall_s": out.wall_s,
        "median_tokens_per_s": tps, "median_mfu": mfu,
        "peak_rss_mb": json.loads(rss_file.read_text()) if rss_file.is_file() else None,
        "last_checkpoint": str(out.last_checkpoint), "best_checkpoint": str(out.best_checkpoint or ""),
        "ray_checkpoint": str(ray_ckpt or ""), "loss_curve": str(plot or ""),
    }
    marks["summary_done"] = time.time()
    summary.update(_phases(run_dir, marks, marks["summary_done"] - marks["process_start"]))
    out.extra = summary
    st.write_json(run_dir / SUMMARY_FILE, summary)
    return out
