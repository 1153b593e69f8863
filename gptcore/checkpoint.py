"""The raygpt checkpoint: a versioned, checksummed, pickle-free directory, plus Hugging Face GPT-2 interop.

    from gptcore.checkpoint import save_checkpoint, load_checkpoint, export_hf, import_hf
    path = save_checkpoint("runs/x/ckpt", model, tokenizer, {"step": 100, "tokens_seen": 1e6})
    ckpt = load_checkpoint(path)                 # -> Checkpoint(model, tokenizer, config, meta, id, path)
    export_hf(path, "out/hf")                    # GPT2LMHeadModel.from_pretrained("out/hf") works offline
    import_hf("some/hf-gpt2-dir", "runs/imported")

CLI: `raygpt export --format hf CKPT OUT`, `raygpt import --format hf IN CKPT` (pipelines/core_cli.py).

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

from gptcore.errors import GPTError

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch

from gptcore.config import ConfigError, GPTConfig
from gptcore.model import GPT

FORMAT = "raygpt-checkpoint/1"
SUPPORTED_FORMATS = (FORMAT,)
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
CHECKSUMS_FILE = "checksums.json"
CHECKED_FILES = (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, META_FILE)
TIED = {"lm_head.weight": "transformer.wte.weight"}  # alias -> stored name

# HF GPT-2 uses Conv1D (weight shape (in, out)) where we use nn.Linear (weight shape (out, in))
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# non-persistent attention-mask buffers older transformers versions wrote into GPT-2 state dicts
_HF_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu"}  # GPTConfig.activation -> GPT2Config.activation_function


class CheckpointError(GPTError):
    """A checkpoint (or HF directory) is missing, corrupt, inconsistent or of an unknown format."""


@dataclass
class Checkpoint:
    model: GPT
    tokenizer: Any  # gptcore.tokenizer.Tokenizer
    config: GPTConfig
    meta: dict[str, Any]
    id: str  # content hash: sha256 of checksums.json
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ---- Hugging Face GPT-2 name/layout mapping -------------------------------------------------


def hf_config_dict(cfg: GPTConfig, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                   dtype: str = "float32") -> dict[str, Any]:
    """transformers.GPT2Config fields describing exactly our architecture (GELU as configured, 4x MLP, tied)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # = 4 * n_embd, as in our MLP
        "activation_function": _HF_ACTIVATION[cfg.activation],
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "dtype": dtype,
    }


def config_from_hf_dict(d: Mapping[str, Any], *, name: str = "hf-import") -> GPTConfig:
    """GPTConfig from a HF GPT-2 config.json, refusing variants our model cannot reproduce exactly."""
    problems = []
    model_type = d.get("model_type")
    if model_type != "gpt2":
        problems.append(f"model_type must be 'gpt2', got {model_type!r} (only GPT-2 checkpoints map 1:1)")
    act = d.get("activation_function", "gelu_new")
    activation = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                  "gelu": "gelu"}.get(act)
    if activation is None:
        problems.append(f"activation_function must be 'gelu_new' (GPT-2's tanh GELU) or 'gelu' (exact), got {act!r}")
    n_embd = d.get("n_embd", 768)
    if d.get("n_inner") not in (None, 4 * n_embd):
        problems.append(f"n_inner must be null or 4*n_embd={4 * n_embd}, got {d.get('n_inner')!r}")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False), ("tie_word_embeddings", True)):
        if d.get(key, want) != want:
            problems.append(f"{key} must be {want}, got {d.get(key)!r}")
    if problems:
        raise CheckpointError("unsupported Hugging Face config: " + "; ".join(problems))
    drop = max(float(d.get(k, 0.0) or 0.0) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"))
    try:
        return GPTConfig(n_layer=d.get("n_layer", 12), n_head=d.get("n_head", 12), n_embd=n_embd,
                         block_size=d.get("n_positions", d.get("n_ctx", 1024)),
                         vocab_size=d.get("vocab_size", 50257), dropout=drop, bias=True, activation=activation,
                         layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5), name=name)
    except ConfigError as e:
        raise CheckpointError(f"Hugging Face config does not make a valid GPTConfig: {e}") from e


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel state dict (HF names, Conv1D layout). `lm_head.weight` is included and shares
    storage with `transformer.wte.weight` (tied). A bias-free model gets zero biases (same function)."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if name.endswith(_CONV1D_SUFFIXES):
            t = t.t().contiguous()  # (out, in) -> (in, out)
        out[name] = t
    if not cfg.bias:  # HF GPT-2 always has biases; zeros make it compute the same function
        ref = out["transformer.wte.weight"]
        C = cfg.n_embd
        z = lambda n: torch.zeros(n, dtype=ref.dtype, device=ref.device)  # noqa: E731
        for i in range(cfg.n_layer):
            p = f"transformer.h.{i}."
            for ln in ("ln_1", "ln_2"):
                out[p + ln + ".bias"] = z(C)
            out[p + "attn.c_attn.bias"] = z(3 * C)
            out[p + "attn.c_proj.bias"] = z(C)
            out[p + "mlp.c_fc.bias"] = z(4 * C)
            out[p + "mlp.c_proj.bias"] = z(C)
        out["transformer.ln_f.bias"] = z(C)
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def _normalize_hf_names(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in sd.items():
        if name.endswith(_HF_IGNORED_SUFFIXES):
            continue
        if not (name.startswith("transformer.") or name.startswith("lm_head.")):
            name = "transformer." + name  # GPT2Model (no LM head) checkpoints have no prefix
        out[name] = t
    return out


def from_hf_state_dict(sd: Mapping[str, torch.Tensor], config: GPTConfig) -> GPT:
    """Our GPT from a GPT2LMHeadModel/GPT2Model state dict (names with or without `transformer.`)."""
    sd = _normalize_hf_names(sd)
    ours: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.endswith(_CONV1D_SUFFIXES):
            t = t.t()  # (in, out) -> (out, in)
        ours[name] = t
    wte = ours.get("transformer.wte.weight")
    head = ours.pop("lm_head.weight", None)
    if head is not None and wte is not None and head.shape == wte.shape and not torch.equal(head, wte):
        raise CheckpointError("lm_head.weight differs from transformer.wte.weight: our GPT ties them, so an "
                              "untied model cannot be imported exactly")
    if not config.bias:
        for name in [n for n in ours if n.endswith(".bias")]:
            if torch.count_nonzero(ours[name]):
                raise CheckpointError(f"{name} is non-zero but config.bias is False; import with bias=True")
            del ours[name]
    model = _empty_model(config)
    _load_into(model, ours, source="Hugging Face state dict")
    return model


# ---- model construction / loading helpers ---------------------------------------------------


def _empty_model(config: GPTConfig) -> GPT:
    """A GPT whose weights are about to be overwritten: skip the (slow, for big models) random init."""
    with torch.device("meta"):
        model = GPT(config)
    if any(True for _ in model.buffers()):  # buffers would be left uninitialised; take the slow path
        return GPT(config)
    model = model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight  # to_empty materialises shared params separately
    return model


def _load_into(model: GPT, sd: Mapping[str, torch.Tensor], *, source: str) -> None:
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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _AtomicDir:
    """Write into `<parent>/.<name>.tmp-<uuid>`, then rename onto `<parent>/<name>` on success.

    An existing target is refused unless overwrite=True; then it is moved aside, the new directory
    renamed in, and the old one deleted (the only window without a target is between two renames)."""

    def __init__(self, target: str | os.PathLike, overwrite: bool):
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

    def __exit__(self, exc_type, exc, tb) -> bool:
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


def code_version() -> str:
    """`git describe --always --dirty` of the source tree when it is a git checkout, else the package version."""
    from gptcore import __version__

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
        return tokenizer.to_json_str()
    raise CheckpointError(f"tokenizer must be a gptcore.tokenizer.Tokenizer or a tokenizer.json path, "
                          f"got {type(tokenizer).__name__}")


def _parse_tokenizer(text: str, where: str) -> Any:
    from gptcore.tokenizer import Tokenizer

    try:
        return Tokenizer.from_json_str(text)
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt checkpoint file
        raise CheckpointError(f"{where}: not a valid raygpt tokenizer ({type(e).__name__}: {e})") from e


def save_checkpoint(out_dir: str | os.PathLike, model: GPT | Mapping[str, torch.Tensor], tokenizer: Any,
                    meta: Mapping[str, Any] | None = None, *, config: GPTConfig | None = None,
                    overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write a checkpoint directory atomically and return its path.

    `model` is a GPT, or a state dict in our names (then `config` is required; e.g. weights gathered
    from a ZeRO-3 engine). `tokenizer` is a Tokenizer or a tokenizer.json path. `meta` may carry step,
    tokens_seen, parents (data_manifest_id, train_config_hash) and anything JSON-serialisable; code_version
    and created_at are filled in when absent. `dtype` casts floating weights before writing (default: as is).
    """
    from safetensors.torch import save_file

    # unwrap DDP/DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers
    for attr in ("module", "_orig_mod", "module"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            model = inner
    if isinstance(model, GPT):
        config = model.config
        sd = model.state_dict()
    elif isinstance(model, Mapping):
        if config is None:
            raise CheckpointError("save_checkpoint got a state dict without config=GPTConfig(...)")
        # strip wrapper prefixes a state dict may carry
        sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in model.items()}
    else:
        raise CheckpointError(f"save_checkpoint needs a gptcore GPT or a state dict, got {type(model).__name__}")
    tok_text = _tokenizer_json(tokenizer)
    tok = _parse_tokenizer(tok_text, "tokenizer")
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
    meta_out.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    meta_out["tokenizer_id"] = getattr(tok, "id", None)
    meta_out["num_params"] = sum(t.numel() for t in tensors.values())
    try:
        meta_text = json.dumps(meta_out, indent=2, sort_keys=True)
    except TypeError as e:
        raise CheckpointError(f"meta must be JSON-serialisable: {e}") from e

    with _AtomicDir(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / MODEL_FILE),
                  metadata={"format": "pt", "raygpt_format": FORMAT,
                            "tied": ",".join(f"{a}={b}" for a, b in TIED.items())})
        _fsync_file(tmp / MODEL_FILE)
        _write_text(tmp / CONFIG_FILE, json.dumps({"format": FORMAT, "model": config.to_dict()},
                                                  indent=2, sort_keys=True))
        _write_text(tmp / TOKENIZER_FILE, tok_text)
        _write_text(tmp / META_FILE, meta_text)
        files = {n: {"sha256": _sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size} for n in CHECKED_FILES}
        _write_text(tmp / CHECKSUMS_FILE, json.dumps({"algorithm": "sha256", "files": files},
                                                     indent=2, sort_keys=True))
    return Path(out_dir)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from e


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
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
    sums = _read_json(p / CHECKSUMS_FILE, CHECKSUMS_FILE)
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
        got = _sha256_file(f)
        if got != want.get("sha256"):
            raise CheckpointError(f"{f} was altered: sha256 {got[:16]}... does not match the recorded "
                                  f"{str(want.get('sha256'))[:16]}...")
    cfg = _read_json(p / CONFIG_FILE, CONFIG_FILE)
    fmt = cfg.get("format") if isinstance(cfg, dict) else None
    if fmt not in SUPPORTED_FORMATS:
        raise CheckpointError(f"{p / CONFIG_FILE}: unknown checkpoint format {fmt!r}; this raygpt reads "
                              f"{list(SUPPORTED_FORMATS)} (upgrade raygpt, or re-export the checkpoint)")
    return sums


def checkpoint_id(path: str | os.PathLike) -> str:
    """Content id of a checkpoint: sha256 of its checksums.json (which pins every file's sha256)."""
    p = Path(path) / CHECKSUMS_FILE
    if not p.is_file():
        raise CheckpointError(f"{p} is missing: {Path(path)} is not a complete raygpt checkpoint")
    return hashlib.sha256(p.read_bytes()).hexdigest()


def read_config(path: str | os.PathLike) -> GPTConfig:
    """The model config of a checkpoint (no weights loaded, no verification)."""
    d = _read_json(Path(path) / CONFIG_FILE, CONFIG_FILE)
    try:
        return GPTConfig.from_dict(d["model"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{Path(path) / CONFIG_FILE}: invalid model config ({e})") from e


def read_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a checkpoint (no weights loaded, no verification)."""
    p = Path(path) / TOKENIZER_FILE
    return _parse_tokenizer(p.read_text(encoding="utf-8"), str(p))


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights + header metadata; safetensors only (a pickle or garbage gives a CheckpointError)."""
    from safetensors import SafetensorError, safe_open

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


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, *, verify: bool = True) -> Checkpoint:
    """Verify and load a checkpoint directory. `dtype` None keeps the stored dtype; model is in eval()."""
    p = Path(path)
    if verify:
        verify_checkpoint(p)
    elif not p.is_dir():
        raise CheckpointError(f"checkpoint path {p} is not a directory")
    config = read_config(p)
    tokenizer = _parse_tokenizer((p / TOKENIZER_FILE).read_text(encoding="utf-8"), str(p / TOKENIZER_FILE))
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{p / TOKENIZER_FILE}: tokenizer vocab_size {tokenizer.vocab_size} does not "
                              f"match config.json vocab_size {config.vocab_size}; the tokenizer belongs to "
                              f"another model")
    meta = _read_json(p / META_FILE, META_FILE)
    tensors, header = _load_safetensors(p / MODEL_FILE)
    model = _empty_model(config)
    _load_into(model, tensors, source=str(p / MODEL_FILE))
    stored = {t.dtype for t in tensors.values() if t.is_floating_point()}
    target = dtype or (stored.pop() if len(stored) == 1 else torch.float32)
    model = model.to(device=device, dtype=target).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, config=config, meta=meta,
                      id=checkpoint_id(p), path=p, extra={"safetensors_metadata": header})


# ---- Hugging Face export / import -----------------------------------------------------------


def _hf_tokenizer_files(tokenizer: Any, out: Path, *, block_size: int) -> None:
    """tokenizer.json (HF `tokenizers` format) + tokenizer_config.json for AutoTokenizer."""
    # our tokenizer.json already is a HF `tokenizers` file (BPE + ByteLevel, or char-level WordLevel + Fuse)
    _write_text(out / "tokenizer.json", tokenizer.to_json_str())
    specials = dict(getattr(tokenizer, "special_tokens", {}) or {})
    eos_id = getattr(tokenizer, "eos_id", None)
    eos = next((t for t, i in specials.items() if i == eos_id), None)
    tcfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
    }
    if eos is not None:
        tcfg.update(eos_token=eos, bos_token=eos, unk_token=eos)
    _write_text(out / "tokenizer_config.json", json.dumps(tcfg, indent=2, sort_keys=True))
    smap = {k: eos for k in ("bos_token", "eos_token", "unk_token")} if eos is not None else {}
    _write_text(out / "special_tokens_map.json", json.dumps(smap, indent=2, sort_keys=True))


def export_hf(ckpt_or_path: Checkpoint | str | os.PathLike, out_dir: str | os.PathLike, *,
              overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write a Hugging Face GPT-2 directory (config.json, model.safetensors, generation_config.json,
    tokenizer files) that `GPT2LMHeadModel.from_pretrained` and `AutoTokenizer.from_pretrained` load
    offline. The tied lm_head is left out of the file, as transformers' own save_pretrained does."""
    from safetensors.torch import save_file

    ckpt = ckpt_or_path if isinstance(ckpt_or_path, Checkpoint) else load_checkpoint(ckpt_or_path)
    sd = to_hf_state_dict(ckpt.model)
    sd.pop("lm_head.weight")
    tensors = {}
    for k, t in sd.items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[k] = t.contiguous()
    stored = next(iter(tensors.values())).dtype
    dtype_name = str(stored).removeprefix("torch.")
    eos_id = getattr(ckpt.tokenizer, "eos_id", None)
    with _AtomicDir(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_cfg = hf_config_dict(ckpt.config, bos_token_id=eos_id, eos_token_id=eos_id, dtype=dtype_name)
        _write_text(tmp / "config.json", json.dumps(hf_cfg, indent=2, sort_keys=True))
        gen = {"bos_token_id": eos_id, "eos_token_id": eos_id}
        _write_text(tmp / "generation_config.json", json.dumps(gen, indent=2, sort_keys=True))
        _hf_tokenizer_files(ckpt.tokenizer, tmp, block_size=ckpt.config.block_size)
        _write_text(tmp / "raygpt_source.json", json.dumps(
            {"checkpoint_id": ckpt.id, "format": FORMAT, "meta": ckpt.meta}, indent=2, sort_keys=True, default=str))
    return Path(out_dir)


def _resolve_hf_dir(in_dir: str | os.PathLike) -> Path:
    s = str(in_dir)
    if Path(s).exists():
        return Path(s)
    if s.startswith("hf://"):
        # only for a path that is not local: fetches safetensors/json files (never pickles)
        from huggingface_hub import snapshot_download

        repo = s.removeprefix("hf://")
        return Path(snapshot_download(repo_id=repo, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    raise CheckpointError(f"Hugging Face model directory {s} does not exist (a remote model is written "
                          f"hf://org/name)")


def _hf_weights(d: Path) -> dict[str, torch.Tensor]:
    single = d / "model.safetensors"
    index = d / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)[0]
    if index.is_file():
        shards = sorted(set(_read_json(index, index.name).get("weight_map", {}).values()))
        out: dict[str, torch.Tensor] = {}
        for s in shards:
            out.update(_load_safetensors(d / s)[0])
        return out
    pickles = [n for n in ("pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json") if (d / n).exists()]
    if pickles:
        raise CheckpointError(f"{d} holds only pickled weights ({', '.join(pickles)}); raygpt never unpickles "
                              f"(it can run arbitrary code). Re-save them with transformers: "
                              f"model.save_pretrained(dir, safe_serialization=True)")
    raise CheckpointError(f"{d} has no model.safetensors (or model.safetensors.index.json)")


def _hf_tokenizer(d: Path) -> Any:

    tj = d / "tokenizer.json"
    if tj.is_file():  # our tokenizer file format IS the HF `tokenizers` JSON (byte-level BPE or char WordLevel)
        return _parse_tokenizer(tj.read_text(encoding="utf-8"), str(tj))
    vocab, merges = d / "vocab.json", d / "merges.txt"
    if vocab.is_file() and merges.is_file():
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

        tk = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
        if "<|endoftext|>" in tk.get_vocab():
            tk.add_special_tokens(["<|endoftext|>"])
        return _parse_tokenizer(tk.to_str(), f"{vocab} + {merges}")
    raise CheckpointError(f"{d} has no tokenizer.json (nor vocab.json + merges.txt); pass a tokenizer")


def import_hf(in_dir: str | os.PathLike, out_ckpt: str | os.PathLike, *, tokenizer: Any = None,
              meta: Mapping[str, Any] | None = None, overwrite: bool = False,
              dtype: torch.dtype | None = None) -> Path:
    """Convert a Hugging Face GPT-2 directory (safetensors only) into a raygpt checkpoint.

    `tokenizer` (a Tokenizer or tokenizer.json path in raygpt format) overrides the directory's own."""
    d = _resolve_hf_dir(in_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory; expected a Hugging Face model directory")
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d / 'config.json'} is missing; not a Hugging Face model directory")
    hf_cfg = _read_json(d / "config.json", "config.json")
    if isinstance(hf_cfg, dict) and str(hf_cfg.get("format", "")).startswith("raygpt-checkpoint/"):
        raise CheckpointError(f"{d} is already a raygpt checkpoint, not a Hugging Face directory; load it "
                              f"directly (or `raygpt export --format hf` it)")
    config = config_from_hf_dict(hf_cfg, name=f"hf:{d.name}")
    sd = _hf_weights(d)
    model = from_hf_state_dict(sd, config)
    if tokenizer is None:
        tokenizer = _hf_tokenizer(d)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _parse_tokenizer(Path(tokenizer).read_text(encoding="utf-8"), str(tokenizer))
    m = {"source": {"kind": "huggingface", "path": str(in_dir)}}
    m.update(dict(meta or {}))
    return save_checkpoint(out_ckpt, model, tokenizer, m, overwrite=overwrite, dtype=dtype)
