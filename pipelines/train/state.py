"""Resumable training state on disk: run-dir layout, checkpoint manifest, verification, RNG states.

    verify_checkpoint_dir(path)                  # CheckpointStateError naming the missing/corrupt file
    latest_checkpoint(run_dir)                   # Ray Train's snapshot or launcher=local's; loud when absent/broken

One reported checkpoint (Ray Train merges every rank's directory into one) looks like
    ds/state/...                    DeepSpeed's files: each rank writes its own ZeRO shard
                                    (zero_pp_rank_R_mp_rank_00_*_states.pt), rank 0 the module states
    rank_R.pt                       rank R's RNG states (python, numpy, torch[, cuda]); tensors only
    files_rank_R.json               the files rank R wrote, with bytes and sha256
    trainer_state.json              rank 0: step, samples_seen, data position, best val loss, world size...
    model/                          rank 0: consolidated gptcore checkpoint (safetensors), for inference
    checkpoint_manifest.json        rank 0: every rank's file list (all-gathered before the report)
A checkpoint is complete only if every file of checkpoint_manifest.json is present with its size (and
sha256 when checked). Does not: call ray.train or DeepSpeed (loop.py does).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import _ray_compat
from pipelines.config import ConfigError
from pipelines.runtime import (
    atomic_write_json,
    sha256_file,  # re-exported: callers import it from here
)

MANIFEST = "checkpoint_manifest.json"
TRAINER_STATE = "trainer_state.json"
DS_DIR = "ds"
DS_TAG = "state"
MODEL_DIR = "model"
RAY_NAME = "ray"  # Ray Train experiment name inside the run dir: RUN_DIR/ray/checkpoint_XXXXXXXX
FORMAT = "raygpt-train-state/1"
# launcher=local (Ray Train's local mode persists nothing): the committed checkpoints, newest last, and the
# prefix of a checkpoint directory still being written (renamed to checkpoint_XXXXXXXX when complete)
LOCAL_SNAPSHOT = "raygpt_local_checkpoints.json"
LOCAL_SNAPSHOT_FORMAT = "raygpt-local-checkpoints/1"
LOCAL_TMP_PREFIX = ".writing-"


class CheckpointStateError(ConfigError):
    """A training checkpoint is missing, incomplete or corrupt. Never resumed from silently."""


def ckpt_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def ray_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / RAY_NAME



def list_files(root: Path, checksums: bool) -> dict[str, dict[str, Any]]:
    """relative path -> {bytes, sha256?} for every file below root."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            out[rel] = {"bytes": p.stat().st_size}
            if checksums:
                out[rel]["sha256"] = sha256_file(p)
    return out


def expected_ds_files(zero_stage: int, world_size: int) -> list[str]:
    """DeepSpeed files a complete checkpoint must hold (one ZeRO shard per rank for stages >= 1)."""
    base = f"{DS_DIR}/{DS_TAG}"
    if zero_stage == 0:
        return [f"{base}/mp_rank_00_model_states.pt"]
    if zero_stage == 3:
        return [f"{base}/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)]
    return [f"{base}/mp_rank_00_model_states.pt"]


def expected_shard_patterns(zero_stage: int, world_size: int) -> list[str]:
    """Per-rank optimizer shard name fragments (the file prefix differs with bf16: bf16_zero_pp_...)."""
    if zero_stage == 0:
        return []
    return [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)]


def check_complete(files: dict[str, dict[str, Any]], zero_stage: int, world_size: int, where: str) -> None:
    """Every rank's DeepSpeed shard is listed (raises CheckpointStateError naming the missing ones)."""
    missing = [f for f in expected_ds_files(zero_stage, world_size) if f not in files]
    names = [Path(f).name for f in files]
    missing += [f"{DS_DIR}/{DS_TAG}/*{pat}" for pat in expected_shard_patterns(zero_stage, world_size)
                if not any(n.endswith(pat) for n in names)]
    for r in range(world_size):
        if f"rank_{r}.pt" not in files:
            missing.append(f"rank_{r}.pt")
    for f in (TRAINER_STATE, f"{MODEL_DIR}/model.safetensors"):
        if f not in files:
            missing.append(f)
    if missing:
        raise CheckpointStateError(f"checkpoint {where} is incomplete: missing {missing}")


def verify_checkpoint_dir(path: str | os.PathLike, *, checksums: bool = True) -> dict[str, Any]:
    """Check a persisted checkpoint against its manifest; returns the manifest. Loud on any problem."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointStateError(f"checkpoint directory {p} does not exist")
    mf = p / MANIFEST
    if not mf.is_file():
        raise CheckpointStateError(f"{mf} is missing: checkpoint {p} is incomplete (the save was interrupted)")
    try:
        man = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointStateError(f"{mf} is not valid JSON ({e}): checkpoint {p} is corrupt") from None
    if man.get("format") != FORMAT:
        raise CheckpointStateError(f"{mf}: format {man.get('format')!r}, expected {FORMAT!r}")
    files = man["files"]
    check_complete(files, man["zero_stage"], man["world_size"], str(p))
    for rel, want in files.items():
        f = p / rel
        if not f.is_file():
            raise CheckpointStateError(f"checkpoint {p} is missing {rel} (listed in {MANIFEST}, written by rank "
                                       f"{want.get('rank', '?')})")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointStateError(f"checkpoint file {f} is corrupt: {size} bytes on disk, {want['bytes']} "
                                       f"when saved")
        if checksums and "sha256" in want and sha256_file(f) != want["sha256"]:
            raise CheckpointStateError(f"checkpoint file {f} is corrupt: its sha256 differs from the one "
                                       f"recorded at save time")
    return man


def _step_of(name: str) -> int:
    try:
        return int(name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def latest_checkpoint_and_launcher(run_dir: str | os.PathLike) -> tuple[Path, str]:
    """The checkpoint a resume continues from, and which launcher committed it ("ray" or "local").

    launcher=ray: Ray Train's snapshot (what its controller hands the workers); launcher=local: LOCAL_SNAPSHOT,
    which loop.py writes after each checkpoint directory is complete. Where both exist, the later step wins."""
    rd = ray_dir(run_dir)
    found: list[tuple[int, str, Path]] = []
    for launcher, snap, key in (("ray", rd / _ray_compat.train_snapshot_filename(), "latest_checkpoint_result"),
                                ("local", rd / LOCAL_SNAPSHOT, None)):
        if not snap.is_file():
            continue
        try:
            s = json.loads(snap.read_text())
            name = s[key]["checkpoint_dir_name"] if key else s["latest_checkpoint_dir_name"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointStateError(f"cannot resume {run_dir}: {snap} is unreadable ({type(e).__name__}: {e})"
                                       ) from None
        found.append((_step_of(name), launcher, rd / name))
    if not found:
        raise CheckpointStateError(
            f"cannot resume {run_dir}: it holds no checkpoint ({rd / _ray_compat.train_snapshot_filename()} and "
            f"{rd / LOCAL_SNAPSHOT} are missing; the run stopped before its first checkpoint, or this is not a "
            f"raygpt run dir). Start a new run instead.")
    _, launcher, path = max(found)
    return path, launcher


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The checkpoint a resume continues from (Ray Train's snapshot or the local launcher's), not yet verified."""
    return latest_checkpoint_and_launcher(run_dir)[0]


def commit_local_checkpoint(run_dir: str | os.PathLike, name: str, keep_last_k: int) -> list[str]:
    """launcher=local: record the complete checkpoint directory RUN_DIR/ray/<name> as the latest (atomically),
    then delete the oldest beyond keep_last_k and any half-written temp directory -> the names deleted.
    (Ray Train's controller does both for launcher=ray.)"""
    import shutil

    rd = ray_dir(run_dir)
    snap = rd / LOCAL_SNAPSHOT
    kept: list[str] = []
    if snap.is_file():
        kept = [n for n in json.loads(snap.read_text()).get("checkpoints", []) if n != name]
    kept.append(name)
    drop, kept = kept[:-keep_last_k], kept[-keep_last_k:]
    atomic_write_json(str(snap), {"format": LOCAL_SNAPSHOT_FORMAT, "latest_checkpoint_dir_name": name,
                                  "checkpoints": kept})
    for n in drop:  # after the snapshot names the new one: a crash here leaves an extra directory, never a gap
        shutil.rmtree(rd / n, ignore_errors=True)
    for p in rd.glob(f"{LOCAL_TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
    return drop


# ---- RNG states ------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """RNG states as tensors + ints only (so torch.load(weights_only=True) can read them back)."""
    import torch

    version, state, gauss = random.getstate()
    npk = np.random.get_state()
    out = {
        "python_state": torch.tensor(state, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(npk[1].astype(np.int64)),
        "numpy_pos": int(npk[2]),
        "numpy_has_gauss": int(npk[3]),
        "numpy_gauss": float(npk[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(s: dict[str, Any]) -> None:
    import torch

    random.setstate((s["python_version"], tuple(int(v) for v in s["python_state"].tolist()), s["python_gauss"]))
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), s["numpy_pos"],
                         s["numpy_has_gauss"], s["numpy_gauss"]))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj)
