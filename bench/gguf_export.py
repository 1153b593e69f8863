"""Our GPT, through its Hugging Face export, written as a GGUF file that llama.cpp loads (its `gpt2` architecture).

    PYTHONPATH=. .venv/bin/python bench/gguf_export.py --shape tiny --ftype f32 --out /tmp/tiny-f32.gguf
    PYTHONPATH=. .venv/bin/python bench/gguf_export.py --checkpoint runs/train/x/ckpt --ftype f16 --out x-f16.gguf
    from gguf_export import write_gguf; write_gguf(model, "m.gguf", "f16")      # bench/ on sys.path

Takes gptcore.checkpoint.to_hf_state_dict / hf_config_dict (the GPT2LMHeadModel export, Conv1D layout), turns
the Conv1D weights back to (out, in) and writes them with the `gguf` package's GGUFWriter under llama.cpp's
GPT-2 names: token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up, ffn_down}
(weights and biases), output_norm. `output.weight` is left out: llama.cpp then uses token_embd for the LM
head, as our tied model does. --ftype f32 | f16 | bf16: 2-D weights in that type (bf16 rounded by torch, as
our engine's cast rounds), 1-D norms and biases stay f32 (llama.cpp's convention). No tokenizer text:
`tokenizer.ggml.model = "none"` (llama.cpp's no-vocab type, supported by the version llama-cpp-python 0.3.x
vendors) and `gpt2.vocab_size`; token ids go in and come out directly.
Does not: quantize (no Q8/Q4), export a tokenizer, or support the exact-erf GELU (llama.cpp's GPT-2 uses the
tanh form: a model trained with `activation: gelu` is refused).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FTYPES = ("f32", "f16", "bf16")
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
_LAYER_NAMES = {"ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
                "attn.c_attn.weight": "attn_qkv.weight", "attn.c_attn.bias": "attn_qkv.bias",
                "attn.c_proj.weight": "attn_output.weight", "attn.c_proj.bias": "attn_output.bias",
                "ln_2.weight": "ffn_norm.weight", "ln_2.bias": "ffn_norm.bias",
                "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias",
                "mlp.c_proj.weight": "ffn_down.weight", "mlp.c_proj.bias": "ffn_down.bias"}
_TOP_NAMES = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
              "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's tensor name for an HF GPT-2 name; None for the tied lm_head (llama.cpp reuses token_embd)."""
    if hf_name == "lm_head.weight":
        return None
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # transformer.h.N.rest
    if len(parts) == 4 and parts[:2] == ["transformer", "h"] and parts[3] in _LAYER_NAMES:
        return f"blk.{int(parts[2])}.{_LAYER_NAMES[parts[3]]}"
    raise ValueError(f"gguf_export: no llama.cpp name for HF tensor {hf_name!r}; is this a GPT-2 state dict?")


def gguf_tensors(model, ftype: str):
    """[(llama.cpp name, numpy array, raw gguf type or None)] of `model` in `ftype` (1-D tensors f32)."""
    import gguf
    import torch

    from gptcore.checkpoint import to_hf_state_dict

    if ftype not in FTYPES:
        raise ValueError(f"gguf_export: ftype must be one of {FTYPES}, got {ftype!r}")
    out = []
    for hf_name, t in to_hf_state_dict(model).items():
        name = gguf_name(hf_name)
        if name is None:
            continue
        t = t.detach().float()
        if hf_name.endswith(_CONV1D):
            t = t.t()  # Conv1D (in, out) -> (out, in): ggml's ne0 is the input dimension
        t = t.contiguous()
        if t.dim() == 1 or ftype == "f32":
            out.append((name, t.numpy().astype("float32"), None))
        elif ftype == "f16":
            out.append((name, t.to(torch.float16).numpy(), None))
        else:  # bf16: torch rounds like our engine's cast; GGUF takes the raw bytes
            raw = t.to(torch.bfloat16).view(torch.int16).numpy().view("uint8")
            out.append((name, raw, gguf.GGMLQuantizationType.BF16))
    return out


def write_gguf(model, path: str | Path, ftype: str = "f32", name: str = "raygpt") -> Path:
    """Write `model` (a gptcore GPT) to `path` as a llama.cpp GPT-2 GGUF; returns the path."""
    import gguf

    from gptcore.checkpoint import hf_config_dict

    cfg = model.config
    hf = hf_config_dict(cfg)
    if hf["activation_function"] != "gelu_new":
        raise ValueError(f"gguf_export: llama.cpp's GPT-2 uses the tanh GELU; this model's activation is "
                         f"{cfg.activation!r} (HF {hf['activation_function']!r}); export a gelu_tanh model")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch="gpt2")
    w.add_name(name)
    w.add_context_length(hf["n_positions"])
    w.add_embedding_length(hf["n_embd"])
    w.add_feed_forward_length(4 * hf["n_embd"])
    w.add_block_count(hf["n_layer"])
    w.add_head_count(hf["n_head"])
    w.add_head_count_kv(hf["n_head"])
    w.add_layer_norm_eps(hf["layer_norm_epsilon"])
    w.add_vocab_size(hf["vocab_size"])
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16}[ftype])
    w.add_tokenizer_model("none")
    for tname, arr, raw in gguf_tensors(model, ftype):
        w.add_tensor(tname, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", help="a random-init shape from bench/generate.py (tiny, gpt2)")
    src.add_argument("--checkpoint", help="a checkpoint directory (gptcore.checkpoint.load_checkpoint)")
    ap.add_argument("--ftype", choices=FTYPES, default="f32")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.shape:
        sys.path.insert(0, str(REPO / "bench"))
        from generate import build

        model = build(args.shape)[0]
    else:
        from gptcore.checkpoint import load_checkpoint

        model = load_checkpoint(args.checkpoint).model
    p = write_gguf(model, args.out, args.ftype)
    print(f"wrote {p} ({p.stat().st_size / 2**20:.1f} MiB, {args.ftype})")


if __name__ == "__main__":
    main()
