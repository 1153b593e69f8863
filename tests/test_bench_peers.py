"""The peer benchmarks' own plumbing: GGUF export computes our model's function; datatrove gets the same bytes.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_bench_peers.py

GGUF: a tiny random GPT exported by bench/gguf_export.py is read back with gguf.GGUFReader and run by a
numpy GPT-2 forward written from llama.cpp's graph (src/models/gpt2.cpp: ggml's ne0 is a weight's input
dimension); its logits match ours. With llama-cpp-python installed, llama.cpp's greedy tokens match ours at
f32. Skips where the `bench` extra is not installed. Does not: time anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def _tiny_model():
    import torch

    from gptcore.config import GPTConfig
    from gptcore.model import GPT

    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=300, block_size=64)).eval()


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gguf_forward(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's GPT-2 graph in numpy over the tensors of a GGUF file (f32)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    t = {x.name: np.asarray(x.data, dtype=np.float32) for x in r.tensors}
    f = {k: r.fields[k].contents() for k in r.fields}
    L, H = f["gpt2.block_count"], f["gpt2.attention.head_count"]
    eps = f["gpt2.attention.layer_norm_epsilon"]
    x = t["token_embd.weight"][ids] + t["position_embd.weight"][: len(ids)]
    T, C = x.shape
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
    for i in range(L):
        p = f"blk.{i}."
        h = _ln(x, t[p + "attn_norm.weight"], t[p + "attn_norm.bias"], eps)
        qkv = h @ t[p + "attn_qkv.weight"].T + t[p + "attn_qkv.bias"]
        q, k, v = (a.reshape(T, H, C // H).transpose(1, 0, 2) for a in np.split(qkv, 3, axis=-1))
        att = q @ k.transpose(0, 2, 1) / np.sqrt(C // H) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ v).transpose(1, 0, 2).reshape(T, C)
        x = x + y @ t[p + "attn_output.weight"].T + t[p + "attn_output.bias"]
        h = _ln(x, t[p + "ffn_norm.weight"], t[p + "ffn_norm.bias"], eps)
        u = h @ t[p + "ffn_up.weight"].T + t[p + "ffn_up.bias"]
        u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
        x = x + u @ t[p + "ffn_down.weight"].T + t[p + "ffn_down.bias"]
    x = _ln(x, t["output_norm.weight"], t["output_norm.bias"], eps)
    assert "output.weight" not in t  # tied: llama.cpp reuses token_embd
    return x @ t["token_embd.weight"].T


def test_gguf_export_computes_our_function(tmp_path):
    pytest.importorskip("gguf")
    import torch
    from gguf_export import write_gguf

    model = _tiny_model()
    path = write_gguf(model, tmp_path / "tiny-f32.gguf", "f32")
    ids = [5, 17, 299, 0, 42, 42, 7]
    with torch.no_grad():
        ours = model.forward_logits(torch.tensor([ids]))[0]
    theirs = _gguf_forward(path, ids)
    np.testing.assert_allclose(theirs, ours.float().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ftype,nbytes", [("f16", 2), ("bf16", 2)])
def test_gguf_export_half_types(tmp_path, ftype, nbytes):
    gguf = pytest.importorskip("gguf")
    from gguf_export import write_gguf

    r = gguf.GGUFReader(str(write_gguf(_tiny_model(), tmp_path / f"t-{ftype}.gguf", ftype)))
    types = {x.name: x.tensor_type.name for x in r.tensors}
    assert types["blk.0.attn_qkv.weight"] == ftype.upper() and types["token_embd.weight"] == ftype.upper()
    assert types["blk.0.attn_qkv.bias"] == "F32" and types["output_norm.weight"] == "F32"
    assert r.fields["tokenizer.ggml.model"].contents() == "none"
    assert r.fields["gpt2.vocab_size"].contents() == 300


def test_gguf_export_refuses_erf_gelu(tmp_path):
    pytest.importorskip("gguf")
    from gguf_export import write_gguf

    from gptcore.config import GPTConfig
    from gptcore.model import GPT

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=300, block_size=64, activation="gelu"))
    with pytest.raises(ValueError, match="tanh GELU"):
        write_gguf(model, tmp_path / "x.gguf")


def test_llamacpp_greedy_matches_ours_f32(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from generate_llamacpp import LlamaCppDecoder
    from gguf_export import write_gguf

    from gptcore.engine import Engine
    from gptcore.sampling import SamplingParams

    model = _tiny_model()
    path = write_gguf(model, tmp_path / "tiny-f32.gguf", "f32")
    prompts = [[1, 2, 3, 4], [250, 9, 9, 31]]
    ours = [o.outputs[0].token_ids for o in Engine(model, None).generate(
        prompts, SamplingParams(max_new_tokens=12, temperature=0))]
    llama = LlamaCppDecoder(path, max_seqs=2, prompt_len=4, max_len=16, threads=1)
    try:
        assert llama.generate(prompts, 12) == ours
    finally:
        llama.close()


def test_split_corpus_keeps_every_byte(tmp_path):
    from prep_datatrove import split_corpus

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i} " * (i % 7 + 1)}) + "\n" for i in range(101)))
    parts = sorted(split_corpus(corpus, 3, tmp_path / "parts").glob("*.jsonl"))
    assert len(parts) == 3 and all(p.stat().st_size > 0 for p in parts)
    assert b"".join(p.read_bytes() for p in parts) == corpus.read_bytes()
