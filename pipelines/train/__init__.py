"""Training on Ray Train + DeepSpeed ZeRO: `raygpt train --config FILE [--resume RUN_DIR] [key=value ...]`.

    from pipelines.train import TrainConfig, run
    result = run(load_config(TrainConfig, "jobs/configs/train-debug.yaml", ["data=runs/data/x"]))

Modules: config (TrainConfig), data (reading prep output), deepspeed (DS config + engine), state
(checkpoint layout/verification), worker (one rank's state, restore, evaluate, step and checkpoint
files), loop (joins them to Ray Train; the only ray.train caller), shm_collectives (CPU fast path), trainer
(validation + TorchTrainer), metrics (JSONL/TensorBoard/plot/MFU), cli. Light to import: torch, ray
and deepspeed load only when a run starts.
"""

from pipelines.train.config import TrainConfig


def run(cfg, resume=None):
    """See pipelines.train.trainer.run."""
    from pipelines.train.trainer import run as _run

    return _run(cfg, resume)


__all__ = ["TrainConfig", "run"]
