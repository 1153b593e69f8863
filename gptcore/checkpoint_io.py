"""File and model primitives shared by the raygpt checkpoint format (gptcore.checkpoint) and Hugging
Face interop (gptcore.hf): atomic directories, fsynced writes, sha256, safetensors reads without
unpickling, strict state-dict loading, and the one error class both raise.

    from gptcore.checkpoint_io import AtomicDir, write_text, load_safetensors
    with AtomicDir("out/ckpt", overwrite=False) as tmp:   # renamed onto out/ckpt only on success
        write_text(tmp / "config.json", "{}")

Internal to gptcore: callers use gptcore.checkpoint / gptcore.hf (CheckpointError is re-exported by
gptcore.checkpoint). Tested through tests/gptcore/test_checkpoint.py and test_hf_interop.py.

Does not: know the checkpoint layout or HF names (those live in checkpoint.py and hf.py), or write
to object stores (local paths only).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open

from gptcore.config import GPTConfig
from gptcore.errors import GPTError
from gptcore.model import GPT
from gptcore.tokenizer import Tokenizer

__all__ = ["CheckpointError", "TIED", "AtomicDir", "empty_model", "load_into", "sha256_file", "write_text",
           "fsync_file", "read_json", "load_safetensors", "parse_tokenizer"]

TIED = {"lm_head.weight": "transformer.wte.weight"}  # alias -> stored name


class CheckpointError(GPTError):
    """A checkpoint (or HF directory) is missing, corrupt, inconsistent or of an unknown format."""


# ---- model construction / loading helpers ---------------------------------------------------


def empty_model(config: GPTConfig) -> GPT:
    """A GPT whose weights are about to be overwritten: skip the (slow, for big models) random init."""
    with torch.device("meta"):
        model = GPT(config)
    if any(True for _ in model.buffers()):  # buffers would be left uninitialised; take the slow path
        return GPT(config)
    model = model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight  # to_empty materialises shared params separately
    return model


def load_into(model: GPT, sd: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Strictly load `sd` (tied alias may be absent) into `model`, with a readable error."""
    expected = {k: v for k, v in model.state_dict().items() if k not in TIED}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected) - set(TIED))
    bad_shape = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if bad_shape:
            parts.append(f"shape mismatches {bad_shape[:8]}")
        raise CheckpointError(f"{source} does not match the model config ({'; '.join(parts)})")
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name in TIED:
                continue
            p.copy_(sd[name])  # casts to the model's dtype


# ---- files, hashing, atomic directories -----------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicDir:
    """Write into `<parent>/.<name>.tmp-<uuid>`, then rename onto `<parent>/<name>` on success.

    An existing target is refused unless overwrite=True; then it is moved aside, the new directory
    renamed in, and the old one deleted (the only window without a target is between two renames)."""

    def __init__(self, target: str | os.PathLike[str], overwrite: bool):
        self.target = Path(target).absolute()
        self.overwrite = overwrite
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        if self.target.exists() and not self.overwrite:
            raise CheckpointError(f"output {self.target} already exists; choose a new path or pass "
                                  f"overwrite=True (--overwrite) to replace it")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{uuid.uuid4().hex[:12]}"
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            old = None
            if self.target.exists():
                if not self.overwrite:
                    raise CheckpointError(f"output {self.target} appeared while writing; not replacing it")
                old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:12]}"
                os.rename(self.target, old)
            os.rename(self.tmp, self.target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            try:  # make the rename itself durable
                fd = os.open(self.target.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from e


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights + header metadata; safetensors only (a pickle or garbage gives a CheckpointError)."""
    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        return tensors, meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({type(e).__name__}: {e}); raygpt "
                              f"never unpickles weights, re-save them with safetensors") from e


def parse_tokenizer(text: str, where: str) -> Any:
    try:
        return Tokenizer.from_json_str(text)
    except Exception as e:
        raise CheckpointError(f"{where}: not a valid raygpt tokenizer ({type(e).__name__}: {e})") from e

