"""The DeepSpeed side of training: the DS config generated from a TrainConfig, and the engine.

    ds_cfg = ds_config(cfg, world_size=2)          # plain dict; cfg.ds_config_override is merged last
    engine, optimizer = build_engine(cfg, model, world_size=2)

CPU (this machine): DS_ACCELERATOR=cpu, the process group is Ray Train's gloo group (DeepSpeed wraps
the existing group instead of creating one). The client optimizer is torch's AdamW, so no DeepSpeed C++
op has to be compiled; `offload_optimizer` switches to DeepSpeed's CPUAdam, which DeepSpeed JIT-builds
with ninja + g++ on first use (about 90 s, cached in ~/.cache/torch_extensions). Precision: bf16 / fp16
on GPU are DeepSpeed's own modes (bf16 / fp16 sections); bf16 on CPU is torch.autocast around the
forward with fp32 weights, so the DS config stays fp32. Gradient clipping: ZeRO >= 1 and fp16 clip
inside DeepSpeed (and report the global norm); ZeRO 0 in fp32/bf16 clips in the loop with torch, which
also yields the norm DeepSpeed does not compute there. `optim.name: muon` swaps the client optimizer for
pipelines/train/muon.py's MuonAdamW (ZeRO 0 only). The LR schedule is set by the loop on the
optimizer's param groups each step (no DS scheduler: the step alone determines the LR, so resuming
needs no scheduler state). Does not: call ray.train (loop.py does), or save checkpoints (state.py).
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

from pipelines.train import shm_collectives
from pipelines.train.bf16 import BF16_MIN_SPEEDUP, cpu_bf16_speedup
from pipelines.train.config import TrainConfig

NEVER = 10**9  # steps_per_print: DeepSpeed's own step logging is replaced by ours


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def clips_in_deepspeed(cfg: TrainConfig) -> bool:
    return cfg.zero_stage >= 1 or (cfg.use_gpu and cfg.precision == "fp16")


def ds_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed JSON config for this run (what `deepspeed.initialize(config=...)` receives)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        # contiguous_gradients copies every gradient into one flat buffer as backward produces it, against
        # memory fragmentation on a GPU; on a CPU it is a copy for nothing (measured: ZeRO-2, 2 CPU workers,
        # nanoGPT recipe, 1.11x tokens/s without it, time-sliced A/B)
        zero.update(overlap_comm=False, contiguous_gradients=bool(cfg.use_gpu), reduce_scatter=True)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(cfg.use_gpu)}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": bool(cfg.use_gpu)}
    if cfg.zero_stage == 3:
        # gather the full weights on rank 0 at save time is done by the loop (GatheredParameters)
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    c: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip if clips_in_deepspeed(cfg) else 0.0,
        "zero_optimization": zero,
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if cfg.use_gpu and cfg.precision == "bf16":
        c["bf16"] = {"enabled": True}
    elif cfg.use_gpu and cfg.precision == "fp16":
        c["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                     "hysteresis": 2, "min_loss_scale": 1}
    if cfg.offload_optimizer:
        # DeepSpeed builds its CPU Adam from this section (torch's AdamW cannot step offloaded partitions)
        o = cfg.optim
        c["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                                                      "weight_decay": o.weight_decay}}
    return deep_merge(c, cfg.ds_config_override or {})


def auto_precision(use_gpu: bool) -> str:
    """What precision=auto means on this worker: bf16 where the device runs it natively and faster, else fp32."""
    import torch

    if use_gpu:
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_bf16_speedup(torch.get_num_threads()) >= BF16_MIN_SPEEDUP else "fp32"


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, cosine to min_lr, then flat."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / (o.warmup_steps + 1)
    if o.schedule == "constant":
        return o.lr
    decay = o.decay_steps or cfg.max_steps
    if step >= decay:
        return o.min_lr
    ratio = (step - o.warmup_steps) / max(1, decay - o.warmup_steps)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (o.lr - o.min_lr)


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices (dim >= 2: Linear weights, embeddings), none on biases and norms."""
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # the tied wte/lm_head weight appears once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _skip_shm_build() -> None:
    """DeepSpeed JIT-builds a shared-memory all-reduce op at backend init (~50 s on a cold cache). It is
    used only by `inference_all_reduce` and only activates when LOCAL_SIZE equals the world size, which
    Ray does not set; so when LOCAL_SIZE is unset the build buys nothing and we skip it."""
    if os.environ.get("LOCAL_SIZE"):
        return
    import importlib

    # (not `import deepspeed.comm.torch as m`: that resolves to the `torch` attribute of deepspeed.comm)
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def import_deepspeed(cfg: TrainConfig):
    """`import deepspeed` with the accelerator this run uses (DS_ACCELERATOR=cpu before the import on CPU)."""
    if not cfg.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def build_engine(cfg: TrainConfig, model, world_size: int):
    """deepspeed.initialize on the already-initialised process group -> (engine, optimizer)."""
    deepspeed = import_deepspeed(cfg)
    import torch

    _skip_shm_build()
    dsc = ds_config(cfg, world_size)
    groups = param_groups(model, cfg.optim.weight_decay)
    if "optimizer" in dsc:
        optimizer = None  # DeepSpeed builds it from the config (offload: CPUAdam)
    elif cfg.optim.name == "muon":  # zero_stage 0 (TrainConfig checks): DeepSpeed steps it as it is
        from pipelines.train.muon import MuonAdamW, muon_adamw_groups

        o = cfg.optim
        groups = muon_adamw_groups(model, weight_decay=o.weight_decay, lr=o.lr, muon_lr=o.muon_lr,
                                   momentum=o.muon_momentum, ns_steps=o.muon_ns_steps)
        optimizer = MuonAdamW(groups, betas=(o.beta1, o.beta2), eps=o.eps, fused=o.fused)
    else:
        o = cfg.optim
        kw: dict[str, Any] = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        if o.fused:
            kw["fused"] = True
        optimizer = torch.optim.AdamW(groups, **kw)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
        config=dsc, dist_init_required=False)
    if world_size == 1 and cfg.zero_stage == 0:
        # one process, no ZeRO: nothing to average across ranks, yet DeepSpeed would still flatten every
        # gradient, all-reduce it over a group of one and copy it back after each backward (~4% of a
        # step of the nanoGPT CPU recipe, measured)
        engine.enable_backward_allreduce = False
    engine.raygpt_collectives = install_collectives(cfg, world_size)
    return engine, engine.optimizer


def install_collectives(cfg: TrainConfig, world_size: int) -> str | None:
    """The one place that may swap DeepSpeed's collectives (every rank calls it, after deepspeed.initialize):
    CPU workers that all share one machine exchange gradients and parameters through /dev/shm instead of
    gloo's TCP (pipelines/train/shm_collectives.py, guarded by the DeepSpeed version). -> "shm" | "gloo" |
    None (one worker or GPUs: nothing to choose)."""
    if world_size < 2 or cfg.use_gpu:
        return None
    if not cfg.shm_collectives:
        return "gloo"

    return "shm" if shm_collectives.install(timeout_s=cfg.shm_collectives_timeout_s) else "gloo"


def set_lr(optimizer, lr: float, cfg: TrainConfig | None = None) -> None:
    """Every group's LR for this step: `lr` (lr_at), and for Muon's groups lr * optim.muon_lr / optim.lr."""
    muon_lr = lr * cfg.optim.muon_lr / cfg.optim.lr if cfg is not None else lr
    for g in optimizer.param_groups:
        g["lr"] = muon_lr if g.get("muon") else lr


def release_process_group() -> None:
    """Tear down this process's torch.distributed group and DeepSpeed's references to it (launcher=local runs
    the worker in the driver, which may train again: DeepSpeed caches its data-parallel group in module
    globals, and a cached group of a destroyed world fails the next engine's first broadcast)."""
    import sys

    import torch.distributed as dist

    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None and comm.cdb is not None and dist.is_initialized():
        comm.destroy_process_group()  # destroys the world group and releases DeepSpeed's references
    elif dist.is_initialized():
        dist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None and hasattr(groups, "_release_process_group_references"):
        groups._release_process_group_references(group=None)  # the world is gone (also when Ray destroyed it)
