"""`raygpt train`: train a GPT on Ray Train + DeepSpeed from a YAML config.

    raygpt train --config jobs/configs/train-shakespeare-char.yaml [key=value ...]
    raygpt train --resume runs/train/shakespeare-char [max_steps=4000]      # continue a stopped run

Registered by pipelines/cli.py. Heavy imports (torch, ray, deepspeed) happen inside the handler.
Does not: prepare data (`raygpt prep`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a GPT (Ray Train + DeepSpeed ZeRO), or resume a stopped run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a GPT on a `raygpt prep` dataset with Ray Train + DeepSpeed ZeRO (CPU or GPU).\n\n"
                    "  raygpt train --config jobs/configs/train-shakespeare-char.yaml\n"
                    "  raygpt train --config jobs/configs/train-debug.yaml num_workers=2 zero_stage=2\n"
                    "  raygpt train --resume runs/train/shakespeare-char max_steps=4000\n\n"
                    "Reads a `raygpt prep` dataset (`data`), writes a run dir (`run_dir`) with resumable\n"
                    "checkpoints of every rank, last/ and best/ inference checkpoints (for `raygpt sample`,\n"
                    "`generate`, `serve`), metrics.jsonl, TensorBoard events and loss_curve.png; prints a JSON\n"
                    "summary on stdout. A run_dir that already holds a run is refused; --resume continues it.\n\n"
                    "Key options (YAML or key=value; nested keys use dots): data, run_dir, model.preset,\n"
                    "max_steps, num_workers, zero_stage, precision, optim.lr, batch.micro_batch_size,\n"
                    "eval_interval, ckpt_interval, init=raygpt init_path=CKPT (fine-tune from a checkpoint).\n"
                    "Examples: jobs/configs/train-*.yaml.")
    p.add_argument("--config", default=None, help="YAML config (TrainConfig); optional with --resume")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its latest checkpoint (loud error if it has none)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")
    p.set_defaults(func=_train)


def _train(args) -> int:
    from pipelines.config import load_config
    from pipelines.errors import UserError
    from pipelines.train.config import TrainConfig

    base = None
    if args.resume:
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise UserError(f"--resume {args.resume}: {saved} is missing; not a raygpt training run dir")
        if not args.config:
            base = json.loads(saved.read_text())["config"]
            if "throttle_s" in base:  # a run dir from before the `testing:` section
                base.setdefault("testing", {})["throttle_s"] = base.pop("throttle_s")
    elif not args.config:
        raise UserError("--config FILE is required (or --resume RUN_DIR)")
    cfg = load_config(TrainConfig, args.config, args.overrides, base=base)

    from pipelines.train.trainer import run

    res = run(cfg, resume=args.resume)
    print(json.dumps({"run_dir": str(res.run_dir), "launcher": res.extra.get("launcher"), "steps": res.steps, "final_loss": res.final_loss,
                      "final_val_loss": res.final_val_loss, "best_val_loss": res.best_val_loss,
                      "last_checkpoint": str(res.last_checkpoint), "wall_s": round(res.wall_s, 1),
                      **{k: res.extra.get(k) for k in ("median_tokens_per_s", "median_mfu", "loss_curve",
                                                        "phase_seconds")}},
                     indent=2), flush=True)
    # the process ends next: leave the objects of the run (torch modules, Ray's state) out of the interpreter's
    # final garbage collection, which otherwise walks all of them (measured ~2 s at exit on a busy 2-core
    # machine with torch, ray and deepspeed loaded; ~0.4 s frozen)
    import gc

    gc.freeze()
    return 0
