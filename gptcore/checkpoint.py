"""The raygpt checkpoint: a versioned, checksummed, pickle-free directory, plus Hugging Face GPT-2 export/import.

    from gptcore.checkpoint import save_checkpoint, load_checkpoint, export_hf, import_hf
    path = save_checkpoint("runs/x/ckpt", model, tokenizer, {"step": 100, "tokens_seen": 1e6})
    ckpt = load_checkpoint(path)                 # -> Checkpoint(model, tokenizer, config, meta, id, path)
    export_hf(path, "out/hf")                    # GPT2LMHeadModel.from_pretrained("out/hf") works offline
    import_hf("some/hf-gpt2-dir", "runs/imported")

CLI: `raygpt export --format hf CKPT OUT`, `raygpt import --format hf IN CKPT` (pipelines/core_cli.py).
The HF name/layout/config mapping and HF directory I/O live in gptcore.hf (its names are re-exported
here); file primitives shared by both in gptcore.checkpoint_io.

Directory layout (format "raygpt-checkpoint/1"):
    model.safetensors   weights, our parameter names (nn.Linear layout). The tied output projection
                        `lm_head.weight` is the same tensor as `transformer.wte.weight`, so it is stored
                        ONCE, under `transformer.wte.weight`; the safetensors header metadata records
                        {"tied": "lm_head.weight=transformer.wte.weight"} and loading re-ties it.
    config.json         {"format": "raygpt-checkpoint/1", "model": GPTConfig.to_dict()}
    tokenizer.json      gptcore.tokenizer.Tokenizer.to_json_str(); its vocab_size must equal the model's
    meta.json           step, tokens_seen, parents {data_manifest_id, train_config_hash}, code_version,
                        created_at, tokenizer_id, plus whatever the caller adds
    checksums.json      {"algorithm": "sha256", "files": {name: {"sha256", "bytes"}}} for the four files
                        above; verified on every load. The checkpoint id is the sha256 of this file.

Writes are atomic: everything goes to a temporary directory next to the target, which is renamed into
place only when complete; a crash leaves no target. Loading never unpickles: weights are read with
safetensors only, and no other file in the directory (e.g. a stray `pytorch_model.bin`) is ever opened.
Checksums detect corruption and accidental edits; they are not a signature against a deliberate forger,
which is why the loader's safety rests on never unpickling, not on the checksums.

Does not: save optimizer state (pipelines.train owns resumable training state), or talk to a network
unless `import_hf` is given an `hf://org/model` id that is not a local path.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from gptcore import __version__
from gptcore.checkpoint_io import (
    TIED,
    AtomicDir,
    CheckpointError,
    empty_model,
    fsync_file,
    load_into,
    load_safetensors,
    parse_tokenizer,
    read_json,
    sha256_file,
    write_text,
)
from gptcore.config import ConfigError, GPTConfig
from gptcore.hf import (  # re-exported: HF interop used to live here, callers import it from here
    config_from_hf_dict,
    from_hf_state_dict,
    hf_config_dict,
    read_hf_dir,
    to_hf_state_dict,
    write_hf_dir,
)
from gptcore.model import GPT

__all__ = ["FORMAT", "SUPPORTED_FORMATS", "MODEL_FILE", "CONFIG_FILE", "TOKENIZER_FILE", "META_FILE",
           "CHECKSUMS_FILE", "CHECKED_FILES", "TIED", "CheckpointError", "Checkpoint", "code_version",
           "save_checkpoint", "load_checkpoint", "verify_checkpoint", "checkpoint_id", "read_config",
           "read_tokenizer", "export_hf", "import_hf", "hf_config_dict", "config_from_hf_dict",
           "to_hf_state_dict", "from_hf_state_dict"]

FORMAT = "raygpt-checkpoint/1"
SUPPORTED_FORMATS = (FORMAT,)
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
CHECKSUMS_FILE = "checksums.json"
CHECKED_FILES = (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, META_FILE)


@dataclass
class Checkpoint:
    model: GPT
    tokenizer: Any  # gptcore.tokenizer.Tokenizer
    config: GPTConfig
    meta: dict[str, Any]
    id: str  # content hash: sha256 of checksums.json
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def code_version() -> str:
    """`git describe --always --dirty` of the source tree when it is a git checkout, else the package version."""
    repo = Path(__file__).resolve().parents[1]
    if (repo / ".git").exists():
        try:
            r = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=repo,
                               capture_output=True, text=True, timeout=10)
            if r.returncode == 0 and r.stdout.strip():
                return f"{__version__}+git.{r.stdout.strip()}"
        except (OSError, subprocess.SubprocessError):
            pass
    return __version__


# ---- save / load ----------------------------------------------------------------------------


def _tokenizer_json(tokenizer: Any) -> str:
    if isinstance(tokenizer, (str, os.PathLike)) and Path(tokenizer).is_file():
        return Path(tokenizer).read_text(encoding="utf-8")
    if hasattr(tokenizer, "to_json_str"):
        text: str = tokenizer.to_json_str()
        return text
    raise CheckpointError(f"tokenizer must be a gptcore.tokenizer.Tokenizer or a tokenizer.json path, "
                          f"got {type(tokenizer).__name__}")


def _state_dict_of(model: object, config: GPTConfig | None) -> tuple[GPTConfig, Mapping[str, torch.Tensor]]:
    """(config, state dict in our names) of a GPT, a wrapped GPT, or a state dict plus its config."""
    # unwrap DDP/DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers
    for attr in ("module", "_orig_mod", "module"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            model = inner
    if isinstance(model, GPT):
        return model.config, model.state_dict()
    if isinstance(model, Mapping):
        if config is None:
            raise CheckpointError("save_checkpoint got a state dict without config=GPTConfig(...)")
        # strip wrapper prefixes a state dict may carry
        return config, {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in model.items()}
    raise CheckpointError(f"save_checkpoint needs a gptcore GPT or a state dict, got {type(model).__name__}")


def save_checkpoint(out_dir: str | os.PathLike[str], model: GPT | Mapping[str, torch.Tensor], tokenizer: Any,
                    meta: Mapping[str, Any] | None = None, *, config: GPTConfig | None = None,
                    overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write a checkpoint directory atomically and return its path.

    `model` is a GPT, or a state dict in our names (then `config` is required; e.g. weights gathered
    from a ZeRO-3 engine). `tokenizer` is a Tokenizer or a tokenizer.json path. `meta` may carry step,
    tokens_seen, parents (data_manifest_id, train_config_hash) and anything JSON-serialisable; code_version
    and created_at are filled in when absent. `dtype` casts floating weights before writing (default: as is).
    """
    config, sd = _state_dict_of(model, config)
    tok_text = _tokenizer_json(tokenizer)
    tok = parse_tokenizer(tok_text, "tokenizer")
    if tok.vocab_size != config.vocab_size:
        raise CheckpointError(f"tokenizer vocab_size {tok.vocab_size} != model config vocab_size "
                              f"{config.vocab_size}; build the model with vocab_size={tok.vocab_size}")
    tensors = {}
    for name, t in sd.items():
        if name in TIED:
            continue  # stored once, under its target name
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    meta_out: dict[str, Any] = {"step": 0, "tokens_seen": 0}
    meta_out.update(dict(meta or {}))
    # lineage: which data and which training config produced these weights (None = not applicable)
    meta_out["parents"] = {"data_manifest_id": None, "train_config_hash": None, **dict(meta_out.get("parents") or {})}
    meta_out.setdefault("code_version", code_version())
    meta_out.setdefault("created_at", datetime.now(UTC).isoformat(timespec="seconds"))
    meta_out["tokenizer_id"] = getattr(tok, "id", None)
    meta_out["num_params"] = sum(t.numel() for t in tensors.values())
    try:
        meta_text = json.dumps(meta_out, indent=2, sort_keys=True)
    except TypeError as e:
        raise CheckpointError(f"meta must be JSON-serialisable: {e}") from e

    with AtomicDir(out_dir, overwrite) as tmp:
        safetensors.torch.save_file(tensors, str(tmp / MODEL_FILE),
                  metadata={"format": "pt", "raygpt_format": FORMAT,
                            "tied": ",".join(f"{a}={b}" for a, b in TIED.items())})
        fsync_file(tmp / MODEL_FILE)
        write_text(tmp / CONFIG_FILE, json.dumps({"format": FORMAT, "model": config.to_dict()},
                                                  indent=2, sort_keys=True))
        write_text(tmp / TOKENIZER_FILE, tok_text)
        write_text(tmp / META_FILE, meta_text)
        files = {n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size} for n in CHECKED_FILES}
        write_text(tmp / CHECKSUMS_FILE, json.dumps({"algorithm": "sha256", "files": files},
                                                     indent=2, sort_keys=True))
    return Path(out_dir)


def verify_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check the directory, its format version and every file's size and sha256. Returns checksums.json."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {p} is not a directory; a raygpt checkpoint is a directory "
                              f"holding {', '.join(CHECKED_FILES + (CHECKSUMS_FILE,))}")
    if not (p / CHECKSUMS_FILE).is_file():
        raise CheckpointError(f"{p / CHECKSUMS_FILE} is missing: {p} is not a complete raygpt checkpoint "
                              f"(an unfinished write, or not a checkpoint)")
    sums = read_json(p / CHECKSUMS_FILE, CHECKSUMS_FILE)
    if not isinstance(sums, dict) or sums.get("algorithm") != "sha256" or not isinstance(sums.get("files"), dict):
        raise CheckpointError(f"{p / CHECKSUMS_FILE}: unexpected structure (need algorithm=sha256 and files)")
    files = sums["files"]
    for name in CHECKED_FILES:
        if name not in files:
            raise CheckpointError(f"{p / CHECKSUMS_FILE} has no entry for {name}")
    for name, want in files.items():
        if name not in CHECKED_FILES:
            raise CheckpointError(f"{p / CHECKSUMS_FILE} lists an unexpected file {name!r}")
        f = p / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing from checkpoint {p}")
        size = f.stat().st_size
        if size != want.get("bytes"):
            kind = "truncated" if size < int(want.get("bytes", 0)) else "has extra bytes"
            raise CheckpointError(f"{f} is {kind}: {size} bytes on disk, {want.get('bytes')} recorded")
        got = sha256_file(f)
        if got != want.get("sha256"):
            raise CheckpointError(f"{f} was altered: sha256 {got[:16]}... does not match the recorded "
                                  f"{str(want.get('sha256'))[:16]}...")
    cfg = read_json(p / CONFIG_FILE, CONFIG_FILE)
    fmt = cfg.get("format") if isinstance(cfg, dict) else None
    if fmt not in SUPPORTED_FORMATS:
        raise CheckpointError(f"{p / CONFIG_FILE}: unknown checkpoint format {fmt!r}; this raygpt reads "
                              f"{list(SUPPORTED_FORMATS)} (upgrade raygpt, or re-export the checkpoint)")
    return sums


def checkpoint_id(path: str | os.PathLike[str]) -> str:
    """Content id of a checkpoint: sha256 of its checksums.json (which pins every file's sha256)."""
    p = Path(path) / CHECKSUMS_FILE
    if not p.is_file():
        raise CheckpointError(f"{p} is missing: {Path(path)} is not a complete raygpt checkpoint")
    return hashlib.sha256(p.read_bytes()).hexdigest()


def read_config(path: str | os.PathLike[str]) -> GPTConfig:
    """The model config of a checkpoint (no weights loaded, no verification)."""
    d = read_json(Path(path) / CONFIG_FILE, CONFIG_FILE)
    try:
        return GPTConfig.from_dict(d["model"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{Path(path) / CONFIG_FILE}: invalid model config ({e})") from e


def read_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer of a checkpoint (no weights loaded, no verification)."""
    p = Path(path) / TOKENIZER_FILE
    return parse_tokenizer(p.read_text(encoding="utf-8"), str(p))


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, *, verify: bool = True) -> Checkpoint:
    """Verify and load a checkpoint directory. `dtype` None keeps the stored dtype; model is in eval()."""
    p = Path(path)
    if verify:
        verify_checkpoint(p)
    elif not p.is_dir():
        raise CheckpointError(f"checkpoint path {p} is not a directory")
    config = read_config(p)
    tokenizer = parse_tokenizer((p / TOKENIZER_FILE).read_text(encoding="utf-8"), str(p / TOKENIZER_FILE))
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{p / TOKENIZER_FILE}: tokenizer vocab_size {tokenizer.vocab_size} does not "
                              f"match config.json vocab_size {config.vocab_size}; the tokenizer belongs to "
                              f"another model")
    meta = read_json(p / META_FILE, META_FILE)
    tensors, header = load_safetensors(p / MODEL_FILE)
    model = empty_model(config)
    load_into(model, tensors, source=str(p / MODEL_FILE))
    stored = {t.dtype for t in tensors.values() if t.is_floating_point()}
    target = dtype or (stored.pop() if len(stored) == 1 else torch.float32)
    model = model.to(device=device, dtype=target).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, config=config, meta=meta,
                      id=checkpoint_id(p), path=p, extra={"safetensors_metadata": header})


# ---- Hugging Face export / import (the mapping itself lives in gptcore.hf) --------------------


def export_hf(ckpt_or_path: Checkpoint | str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
              overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write a Hugging Face GPT-2 directory (config.json, model.safetensors, generation_config.json,
    tokenizer files) that `GPT2LMHeadModel.from_pretrained` and `AutoTokenizer.from_pretrained` load
    offline. The tied lm_head is left out of the file, as transformers' own save_pretrained does."""
    ckpt = ckpt_or_path if isinstance(ckpt_or_path, Checkpoint) else load_checkpoint(ckpt_or_path)
    source = {"checkpoint_id": ckpt.id, "format": FORMAT, "meta": ckpt.meta}
    return write_hf_dir(ckpt.model, ckpt.tokenizer, ckpt.config, out_dir, source=source, overwrite=overwrite,
                        dtype=dtype)


def import_hf(in_dir: str | os.PathLike[str], out_ckpt: str | os.PathLike[str], *, tokenizer: Any = None,
              meta: Mapping[str, Any] | None = None, overwrite: bool = False,
              dtype: torch.dtype | None = None) -> Path:
    """Convert a Hugging Face GPT-2 directory (safetensors only) into a raygpt checkpoint.

    `tokenizer` (a Tokenizer or tokenizer.json path in raygpt format) overrides the directory's own."""
    _, model, tok = read_hf_dir(in_dir, tokenizer=tokenizer)
    m: dict[str, Any] = {"source": {"kind": "huggingface", "path": str(in_dir)}}
    m.update(dict(meta or {}))
    return save_checkpoint(out_ckpt, model, tok, m, overwrite=overwrite, dtype=dtype)
