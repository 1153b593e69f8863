"""TrainConfig: every knob of `raygpt train`, validated in one place before any worker starts.

    from pipelines.config import load_config
    cfg = load_config(TrainConfig, "jobs/configs/train-shakespeare-char.yaml", ["max_steps=100"])

Sections: model (preset + per-field overrides; vocab_size/block_size default to the dataset's), optim
(AdamW, warmup + cosine to min_lr, clipping), batch (per-worker micro batch, accumulation, optional
global batch check), deepspeed (ZeRO stage, offload, raw JSON override), log (JSONL, TensorBoard,
progress bar, plot, MFU peak). Constraints that need only the config are checked in __post_init__;
those that need the filesystem (dataset manifest, init checkpoint, run dir) in
`pipelines.train.trainer.validate`. Every message names the key, the constraint, the value and a fix.
Does not: read datasets or start Ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from pipelines.config import ConfigError

# keys that may change between a run and its `--resume` (everything else must match the saved config,
# or the continued run would not be the same run)
RESUMABLE_CHANGES = ("max_steps", "eval_interval", "eval_iters", "ckpt_interval", "keep_last_k", "keep_best",
                     "max_failures", "launcher", "resources_per_worker", "torch_threads", "testing", "log", "name",
                     "shm_collectives", "shm_collectives_timeout_s")


def _raise(errors: list[str]) -> None:
    if errors:
        raise ConfigError("invalid train config:\n  - " + "\n  - ".join(errors))


@dataclass
class ModelSection:
    preset: str = "debug"  # gptcore.config.PRESETS name
    # overrides of the preset's fields; null = the preset's value (vocab_size, block_size: the dataset's)
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    vocab_size: int | None = None
    dropout: float | None = None
    bias: bool | None = None
    activation: str | None = None  # "gelu_tanh" (GPT-2) or "gelu" (exact, nanoGPT's)

    def overrides(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "preset" and getattr(self, f.name) is not None}


@dataclass
class OptimSection:
    lr: float = 6e-4  # peak learning rate, reached after warmup_steps
    min_lr: float = 6e-5  # floor of the cosine decay
    warmup_steps: int = 100  # linear warmup from 0 (optimizer steps)
    decay_steps: int | None = None  # cosine reaches min_lr here (default: max_steps); constant after
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.1  # applied to matrices (dim >= 2) only, not to biases / LayerNorm / nothing 1-d
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    fused: bool = True  # torch AdamW's fused kernel (CPU and GPU); ignored with offload_optimizer
    # "muon": Muon for the blocks' weight matrices, AdamW (the settings above) for embeddings, biases, norms
    # (pipelines/train/muon.py); needs zero_stage=0 and fp32 master weights in the optimizer
    name: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = 0.02  # Muon's peak LR (follows the same warmup + cosine, scaled by muon_lr / lr)
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5  # Newton-Schulz iterations per matrix per step


@dataclass
class BatchSection:
    micro_batch_size: int = 12  # sequences per worker per forward/backward
    grad_accum: int | None = None  # micro batches per optimizer step (default: from global_batch_size, else 1)
    global_batch_size: int | None = None  # optional check: must equal micro_batch_size * grad_accum * num_workers


@dataclass
class LogSection:
    interval: int = 1  # steps between metric records (JSONL / TensorBoard / progress bar)
    tensorboard: bool = True
    progress: bool = True  # progress bar on the driver (Ray's tqdm)
    plot: bool = True  # loss-curve PNG at the end
    peak_flops: float = 0.0  # per-worker peak FLOP/s for MFU; 0 = measure once with a matmul benchmark (cached)
    peak_flops_cache: str = "~/.cache/raygpt/peak_flops.json"
    console: bool = False  # also print one line per record to the worker's stdout (shows in the driver log)


@dataclass
class TrainTesting:
    """Test hooks: NOT for users. Real runs leave every field at its default; the failure drills, the
    multi-node drill and the time-sliced benchmarks set them (YAML `testing.throttle_s: 0.3`)."""

    throttle_s: float = 0.0  # sleep after each step, so a drill can act between steps
    pid_dir: str | None = None  # every worker writes rank_R.pid and appends to attempts.jsonl here


@dataclass
class TrainConfig:
    data: str = ""  # a `raygpt prep` output directory (with manifest.json)
    run_dir: str = ""  # where checkpoints, metrics, TensorBoard events and plots go (default runs/train/<name>)
    name: str = "train"
    model: ModelSection = field(default_factory=ModelSection)
    # scratch | raygpt (a gptcore checkpoint directory) | hf (a Hugging Face GPT-2 directory, safetensors)
    init: Literal["scratch", "raygpt", "hf"] = "scratch"
    init_path: str | None = None
    optim: OptimSection = field(default_factory=OptimSection)
    batch: BatchSection = field(default_factory=BatchSection)
    max_steps: int = 1000  # optimizer steps
    eval_interval: int = 250  # steps between val-loss evaluations (and at the end); 0 = only at the end
    eval_iters: int = 20  # micro batches per worker per evaluation
    ckpt_interval: int = 500  # steps between checkpoints (and at the end); 0 = only at the end
    keep_last_k: int = 2  # full (resumable) checkpoints kept; the best-by-val-loss weights go to run_dir/best
    keep_best: bool = True
    ckpt_checksums: bool = True  # sha256 every checkpoint file (resume verifies them)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer state + step on CPU (DeepSpeedCPUAdam, JIT-built)
    offload_params: bool = False  # ZeRO 3: parameters on CPU
    # fp32 | bf16 (GPU: DeepSpeed bf16; CPU: torch.autocast bf16, needs AVX512-BF16/AMX) | fp16 (GPU only)
    # | auto: bf16 where the worker's device supports it (CUDA bf16) or, on a CPU, where bf16 matmuls measure
    # >= 1.25x fp32's speed (AMX; some AVX512-BF16 CPUs run oneDNN's bf16 slower than fp32), else fp32
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    # CPU workers keep freed large buffers for the next step instead of unmapping them (glibc; one page fault
    # per 4 KiB otherwise, every step: 1.16x the demo's step; pipelines/train/malloc.py); false: glibc defaults
    malloc_reuse: bool = True
    compile: bool = False  # torch.compile the model (first steps pay the compile time; CPU: needs a C++ compiler)
    seed: int = 1337
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # default {"CPU": 1} (+ "GPU": 1)
    torch_threads: int = 0  # intra-op threads per worker; 0 = the worker's CPU resources
    max_failures: int = 0  # automatic restarts from the last checkpoint after a worker failure (-1 = forever)
    # where the training function runs. "ray": Ray Train's controller and worker actors on the Ray cluster (needed
    # for several workers, for restarts after a failure, for a cluster to join). "local": Ray Train's local mode,
    # the one worker runs in this process and no Ray process is started (a local Ray's start and the worker group
    # are 10-30 s on 2 cores, more than a short run's steps). "auto": local for num_workers=1 with max_failures=0
    # when there is no cluster to join (RAY_ADDRESS unset and no Ray connected but one this process started);
    # a resumed run keeps the launcher that wrote its checkpoints
    launcher: Literal["auto", "ray", "local"] = "auto"
    doc_mask: bool = False  # attention (and next-token loss) stay inside a document, from the doc_ids column
    sft: bool | None = None  # loss on completion tokens only; null = from the dataset kind
    ds_config_override: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed JSON, deep-merged last
    # CPU workers that share one machine exchange DeepSpeed's all-reduces and all-gathers through /dev/shm
    # instead of gloo over TCP (1.2x a 2-worker ZeRO-2 step); off, or across machines: gloo
    shm_collectives: bool = True
    # longest wait for a peer inside one shared-memory collective before the run fails with an error
    # naming the stuck rank (a dead peer is noticed within a second regardless)
    shm_collectives_timeout_s: float = 300.0
    log: LogSection = field(default_factory=LogSection)
    testing: TrainTesting = field(default_factory=TrainTesting)  # test hooks, not for users

    def __post_init__(self) -> None:
        e: list[str] = []
        if not self.data:
            e.append("data is required: the dataset directory written by `raygpt prep` (data=runs/data/NAME)")
        if not self.name or "/" in self.name:
            e.append(f"name must be a non-empty string without '/', got {self.name!r}")
        if not self.run_dir:
            self.run_dir = os.path.join("runs", "train", self.name or "train")
        # model: build the GPTConfig now so shape errors (n_embd % n_head, ...) surface before anything runs
        try:
            self.model_config(vocab_size=self.model.vocab_size or 1, block_size=self.model.block_size or 1)
        except ValueError as ex:
            e.append(f"model (preset {self.model.preset!r}): {ex}".replace("invalid GPTConfig:\n  - ", ""))
        if self.init == "scratch" and self.init_path:
            e.append(f"init_path is set ({self.init_path!r}) but init is 'scratch'; set init=raygpt or init=hf")
        if self.init != "scratch" and not self.init_path:
            e.append(f"init={self.init!r} needs init_path (a checkpoint / Hugging Face directory)")
        e += _optim_problems(self.optim)
        e += _batch_problems(self)
        if self.max_steps < 1:
            e.append(f"max_steps must be >= 1, got {self.max_steps}")
        for k in ("eval_interval", "ckpt_interval"):
            if getattr(self, k) < 0:
                e.append(f"{k} must be >= 0 (0 = only at the end), got {getattr(self, k)}")
        if self.eval_iters < 1:
            e.append(f"eval_iters must be >= 1, got {self.eval_iters}")
        if self.keep_last_k < 1:
            e.append(f"keep_last_k must be >= 1 (the latest checkpoint is what a restart resumes from), "
                     f"got {self.keep_last_k}")
        if self.zero_stage not in (0, 1, 2, 3):
            e.append(f"zero_stage must be one of 0, 1, 2, 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage < 1:
            e.append(f"offload_optimizer needs zero_stage >= 1 (DeepSpeed offloads ZeRO partitions), got "
                     f"zero_stage={self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            e.append(f"offload_params needs zero_stage=3, got zero_stage={self.zero_stage}")
        if self.optim.name == "muon" and self.zero_stage != 0:
            e.append(f"optim.name=muon needs zero_stage=0, got zero_stage={self.zero_stage}: ZeRO hands the "
                     f"optimizer flat partitions and Muon orthogonalizes whole weight matrices; set zero_stage=0 "
                     f"or optim.name=adamw")
        if self.optim.name == "muon" and self.use_gpu and self.precision in ("bf16", "fp16", "auto"):
            e.append(f"optim.name=muon with use_gpu=true needs precision=fp32, got precision={self.precision}: "
                     f"DeepSpeed's bf16 / fp16 optimizers flatten the weights Muon orthogonalizes; set "
                     f"precision=fp32 or optim.name=adamw")
        if self.precision == "fp16" and not self.use_gpu:
            e.append("precision=fp16 needs use_gpu=true (fp16 with loss scaling is a GPU path); on CPU use "
                     "precision=bf16 (autocast) or fp32")
        if self.use_gpu and self.compile and self.zero_stage == 3:
            e.append("compile=true with zero_stage=3 is not supported (ZeRO-3 parameter hooks); drop one")
        if self.max_failures < -1:
            e.append(f"max_failures must be >= -1 (-1 = retry forever), got {self.max_failures}")
        if self.launcher == "local" and self.num_workers != 1:
            e.append(f"launcher=local runs one worker in this process, got num_workers={self.num_workers}; use "
                     f"launcher=ray (or auto) for several workers")
        if self.launcher == "local" and self.max_failures != 0:
            e.append(f"launcher=local cannot restart a failed worker (it is this process), got max_failures="
                     f"{self.max_failures}; use launcher=ray for automatic restarts, or re-run with --resume")
        for k, v in self.resources_per_worker.items():
            if not isinstance(v, (int, float)) or v < 0:
                e.append(f"resources_per_worker.{k} must be a number >= 0, got {v!r}")
        if self.torch_threads < 0:
            e.append(f"torch_threads must be >= 0 (0 = the worker's CPUs), got {self.torch_threads}")
        if not self.shm_collectives_timeout_s > 0:
            e.append(f"shm_collectives_timeout_s must be > 0 seconds, got {self.shm_collectives_timeout_s}")
        if self.testing.throttle_s < 0:
            e.append(f"testing.throttle_s must be >= 0, got {self.testing.throttle_s}")
        if self.log.interval < 1:
            e.append(f"log.interval must be >= 1, got {self.log.interval}")
        if self.log.peak_flops < 0:
            e.append(f"log.peak_flops must be >= 0 (0 = measure), got {self.log.peak_flops}")
        if not isinstance(self.ds_config_override, dict):
            e.append(f"ds_config_override must be a mapping (DeepSpeed JSON), got {self.ds_config_override!r}")
        _raise(e)

    # ---- derived values ---------------------------------------------------------------------

    @property
    def grad_accum(self) -> int:
        b = self.batch
        if b.grad_accum is not None:
            return b.grad_accum
        if b.global_batch_size is not None:
            return b.global_batch_size // (b.micro_batch_size * self.num_workers)
        return 1

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step, all workers together."""
        return self.batch.micro_batch_size * self.grad_accum * self.num_workers

    @property
    def cpus_per_worker(self) -> float:
        return float(self.worker_resources().get("CPU", 1))

    def worker_resources(self) -> dict[str, float]:
        r = {"CPU": 1.0, **({"GPU": 1.0} if self.use_gpu else {})}
        r.update({k: float(v) for k, v in self.resources_per_worker.items()})
        return r

    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.cpus_per_worker))

    def model_config(self, vocab_size: int | None = None, block_size: int | None = None):
        """The GPTConfig of a scratch model (vocab/block default to the given dataset values)."""
        from gptcore.config import preset

        ov = self.model.overrides()
        if vocab_size is not None:
            ov.setdefault("vocab_size", vocab_size)
        if block_size is not None:
            ov.setdefault("block_size", block_size)
        return preset(self.model.preset, **ov)


def _optim_problems(o: OptimSection) -> list[str]:
    """What is wrong with the optim section (messages name the optim.* key)."""
    e: list[str] = []
    if not o.lr > 0:
        e.append(f"optim.lr must be > 0, got {o.lr}")
    if not 0 <= o.min_lr <= o.lr:
        e.append(f"optim.min_lr must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    if o.warmup_steps < 0:
        e.append(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    if o.decay_steps is not None and o.decay_steps <= o.warmup_steps:
        e.append(f"optim.decay_steps must be > optim.warmup_steps ({o.warmup_steps}), got {o.decay_steps}")
    if o.weight_decay < 0:
        e.append(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    for k in ("beta1", "beta2"):
        if not 0 <= getattr(o, k) < 1:
            e.append(f"optim.{k} must be in [0, 1), got {getattr(o, k)}")
    if not o.eps > 0:
        e.append(f"optim.eps must be > 0, got {o.eps}")
    if o.grad_clip < 0:
        e.append(f"optim.grad_clip must be >= 0 (0 disables clipping), got {o.grad_clip}")
    if o.name not in ("adamw", "muon"):
        e.append(f"optim.name must be 'adamw' or 'muon', got {o.name!r}")
    if not o.muon_lr > 0:
        e.append(f"optim.muon_lr must be > 0, got {o.muon_lr}")
    if not 0 <= o.muon_momentum < 1:
        e.append(f"optim.muon_momentum must be in [0, 1), got {o.muon_momentum}")
    if not 1 <= o.muon_ns_steps <= 20:
        e.append(f"optim.muon_ns_steps must be in [1, 20] (5 is Muon's default), got {o.muon_ns_steps}")
    return e


def _batch_problems(cfg: TrainConfig) -> list[str]:
    """What is wrong with num_workers and the batch section (and how the global batch adds up)."""
    e: list[str] = []
    if cfg.num_workers < 1:
        e.append(f"num_workers must be >= 1, got {cfg.num_workers}")
    b = cfg.batch
    if b.micro_batch_size < 1:
        e.append(f"batch.micro_batch_size must be >= 1, got {b.micro_batch_size}")
    if b.grad_accum is not None and b.grad_accum < 1:
        e.append(f"batch.grad_accum must be >= 1, got {b.grad_accum}")
    if b.global_batch_size is not None and b.micro_batch_size >= 1 and cfg.num_workers >= 1:
        per_accum = b.micro_batch_size * cfg.num_workers
        if b.global_batch_size < 1 or b.global_batch_size % per_accum:
            e.append(f"batch.global_batch_size must be a positive multiple of batch.micro_batch_size * "
                     f"num_workers = {b.micro_batch_size} * {cfg.num_workers} = {per_accum}, got "
                     f"{b.global_batch_size}; change global_batch_size, micro_batch_size or num_workers")
        elif b.grad_accum is not None and b.grad_accum * per_accum != b.global_batch_size:
            e.append(f"batch.global_batch_size ({b.global_batch_size}) != micro_batch_size * grad_accum * "
                     f"num_workers = {b.micro_batch_size} * {b.grad_accum} * {cfg.num_workers} = "
                     f"{b.grad_accum * per_accum}; drop grad_accum (it is derived) or fix one of them")
    return e
