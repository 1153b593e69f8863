"""Hugging Face GPT-2 interop: name/layout mapping between our GPT and GPT2LMHeadModel, config
mapping, and reading/writing HF model directories (safetensors only, never pickles).

    from gptcore.hf import to_hf_state_dict, from_hf_state_dict, hf_config_dict, write_hf_dir, read_hf_dir
    write_hf_dir(model, tokenizer, "out/hf", source={...})   # GPT2LMHeadModel.from_pretrained works offline
    config, model, tokenizer = read_hf_dir("some/hf-gpt2-dir")

Most callers use gptcore.checkpoint.export_hf / import_hf, which connect these to the raygpt
checkpoint format; every public name here is re-exported from gptcore.checkpoint. CLI: `raygpt
export --format hf CKPT OUT`, `raygpt import --format hf IN CKPT`. Tests:
tests/gptcore/test_hf_interop.py and test_generate_hf_parity.py.

Does not: import GPT-2 variants our model cannot reproduce exactly (they raise CheckpointError),
unpickle weights, or touch the network unless read_hf_dir is given an `hf://org/model` id that is
not a local path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from gptcore.checkpoint_io import (
    AtomicDir,
    CheckpointError,
    empty_model,
    load_into,
    load_safetensors,
    parse_tokenizer,
    read_json,
    write_text,
)
from gptcore.config import ConfigError, GPTConfig
from gptcore.model import GPT

__all__ = ["hf_config_dict", "config_from_hf_dict", "to_hf_state_dict", "from_hf_state_dict", "write_hf_dir",
           "read_hf_dir"]

# HF GPT-2 uses Conv1D (weight shape (in, out)) where we use nn.Linear (weight shape (out, in))
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# non-persistent attention-mask buffers older transformers versions wrote into GPT-2 state dicts
_HF_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu"}  # GPTConfig.activation -> GPT2Config.activation_function


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
    assert activation is not None  # otherwise a problem was recorded and raised above
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

        def z(n: int) -> torch.Tensor:
            return torch.zeros(n, dtype=ref.dtype, device=ref.device)

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
    model = empty_model(config)
    load_into(model, ours, source="Hugging Face state dict")
    return model


# ---- HF directories ----------------------------------------------------------------------------


def _hf_tokenizer_files(tokenizer: Any, out: Path, *, block_size: int) -> None:
    """tokenizer.json (HF `tokenizers` format) + tokenizer_config.json for AutoTokenizer."""
    # our tokenizer.json already is a HF `tokenizers` file (BPE + ByteLevel, or char-level WordLevel + Fuse)
    write_text(out / "tokenizer.json", tokenizer.to_json_str())
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
    write_text(out / "tokenizer_config.json", json.dumps(tcfg, indent=2, sort_keys=True))
    smap = {k: eos for k in ("bos_token", "eos_token", "unk_token")} if eos is not None else {}
    write_text(out / "special_tokens_map.json", json.dumps(smap, indent=2, sort_keys=True))


def _resolve_hf_dir(in_dir: str | os.PathLike[str]) -> Path:
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
        return load_safetensors(single)[0]
    if index.is_file():
        shards = sorted(set(read_json(index, index.name).get("weight_map", {}).values()))
        out: dict[str, torch.Tensor] = {}
        for s in shards:
            out.update(load_safetensors(d / s)[0])
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
        return parse_tokenizer(tj.read_text(encoding="utf-8"), str(tj))
    vocab, merges = d / "vocab.json", d / "merges.txt"
    if vocab.is_file() and merges.is_file():
        tk = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
        if "<|endoftext|>" in tk.get_vocab():
            tk.add_special_tokens(["<|endoftext|>"])
        return parse_tokenizer(tk.to_str(), f"{vocab} + {merges}")
    raise CheckpointError(f"{d} has no tokenizer.json (nor vocab.json + merges.txt); pass a tokenizer")


def write_hf_dir(model: GPT, tokenizer: Any, config: GPTConfig, out_dir: str | os.PathLike[str], *,
                 source: Mapping[str, Any], overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write a Hugging Face GPT-2 directory (config.json, model.safetensors, generation_config.json,
    tokenizer files, and `source` as raygpt_source.json) that `GPT2LMHeadModel.from_pretrained` and
    `AutoTokenizer.from_pretrained` load offline. The tied lm_head is left out of the file, as
    transformers' own save_pretrained does."""
    sd = to_hf_state_dict(model)
    sd.pop("lm_head.weight")
    tensors = {}
    for k, t in sd.items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[k] = t.contiguous()
    stored = next(iter(tensors.values())).dtype
    dtype_name = str(stored).removeprefix("torch.")
    eos_id = getattr(tokenizer, "eos_id", None)
    with AtomicDir(out_dir, overwrite) as tmp:
        # looked up on the module at call time, like save_checkpoint, so a test can inject a failing writer
        safetensors.torch.save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_cfg = hf_config_dict(config, bos_token_id=eos_id, eos_token_id=eos_id, dtype=dtype_name)
        write_text(tmp / "config.json", json.dumps(hf_cfg, indent=2, sort_keys=True))
        gen = {"bos_token_id": eos_id, "eos_token_id": eos_id}
        write_text(tmp / "generation_config.json", json.dumps(gen, indent=2, sort_keys=True))
        _hf_tokenizer_files(tokenizer, tmp, block_size=config.block_size)
        write_text(tmp / "raygpt_source.json", json.dumps(source, indent=2, sort_keys=True, default=str))
    return Path(out_dir)


def read_hf_dir(in_dir: str | os.PathLike[str], *, tokenizer: Any = None) -> tuple[GPTConfig, GPT, Any]:
    """Read a Hugging Face GPT-2 directory (safetensors only; `hf://org/name` downloads one) into
    (config, model, tokenizer). `tokenizer` (a Tokenizer, or a tokenizer.json path in raygpt format)
    overrides the directory's own."""
    d = _resolve_hf_dir(in_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory; expected a Hugging Face model directory")
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d / 'config.json'} is missing; not a Hugging Face model directory")
    hf_cfg = read_json(d / "config.json", "config.json")
    if isinstance(hf_cfg, dict) and str(hf_cfg.get("format", "")).startswith("raygpt-checkpoint/"):
        raise CheckpointError(f"{d} is already a raygpt checkpoint, not a Hugging Face directory; load it "
                              f"directly (or `raygpt export --format hf` it)")
    config = config_from_hf_dict(hf_cfg, name=f"hf:{d.name}")
    sd = _hf_weights(d)
    model = from_hf_state_dict(sd, config)
    if tokenizer is None:
        tokenizer = _hf_tokenizer(d)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = parse_tokenizer(Path(tokenizer).read_text(encoding="utf-8"), str(tokenizer))
    return config, model, tokenizer
