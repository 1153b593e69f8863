"""Hugging Face GPT-2 interop proved against the real transformers library (offline, CPU, fp32).

    .venv/bin/python -m pytest tests/gptcore/test_hf_interop.py -q
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

from gptcore.checkpoint import (  # noqa: E402
    CheckpointError,
    export_hf,
    from_hf_state_dict,
    hf_config_dict,
    import_hf,
    load_checkpoint,
    save_checkpoint,
    to_hf_state_dict,
)
from gptcore.config import GPTConfig  # noqa: E402
from gptcore.model import GPT  # noqa: E402

SAMPLE_TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Unicode: café, naïve, 日本語, emoji 🙂👍🏽, combining e\u0301",
    "numbers 1234567 and punctuation?!... <|endoftext|> after a special token",
]


def _hf_model_from_ours(model: GPT) -> transformers.GPT2LMHeadModel:
    d = {k: v for k, v in hf_config_dict(model.config).items() if k not in ("architectures", "model_type")}
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**d)).eval()
    hf.load_state_dict(to_hf_state_dict(model), strict=True)
    return hf


@pytest.mark.parametrize("bias,activation", [(True, "gelu_tanh"), (False, "gelu_tanh"), (False, "gelu")])
def test_state_dict_mapping_gives_identical_logits(bias, activation):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=97, bias=bias, activation=activation)
    assert hf_config_dict(cfg)["activation_function"] == {"gelu_tanh": "gelu_new", "gelu": "gelu"}[activation]
    ours = GPT(cfg).eval()
    hf = _hf_model_from_ours(ours)
    x = torch.randint(0, cfg.vocab_size, (3, 20))
    with torch.no_grad():
        a = ours(x)[0]
        b = hf(x).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()

    # and back: names with the transformer. prefix (LMHead) and without (GPT2Model), HF buffers ignored
    back = from_hf_state_dict(hf.state_dict(), cfg).eval()
    assert back.lm_head.weight is back.transformer.wte.weight  # still tied
    bare = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 32, 32, dtype=torch.bool)  # old transformers' mask buffer
    bare["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    back2 = from_hf_state_dict(bare, cfg).eval()
    with torch.no_grad():
        assert torch.equal(back(x)[0], a)
        assert torch.equal(back2(x)[0], a)


def test_from_hf_state_dict_names_missing_tensors():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11)
    sd = to_hf_state_dict(GPT(cfg))
    del sd["transformer.h.0.mlp.c_fc.bias"]
    with pytest.raises(CheckpointError, match="h.0.mlp.c_fc.bias"):
        from_hf_state_dict(sd, cfg)


# ---- export / import through directories, with tokenizers --------------------------------------

CORPUS = "\n".join(
    f"Line {i}: the quick brown fox jumps over the lazy dog; café {i * 7} naïve résumé. "
    f"To be, or not to be, that is the question {i % 13}!"
    for i in range(300)
) + "\n日本語のテキスト, emoji 🙂👍🏽, combining e\u0301 and tabs\tend.\n"


@pytest.fixture(scope="module")
def bpe_tok():
    from gptcore.tokenizer import train_bpe

    return train_bpe(iter([CORPUS]), vocab_size=400)


@pytest.fixture(scope="module")
def char_tok():
    from gptcore.tokenizer import train_char

    return train_char(iter([CORPUS + "".join(SAMPLE_TEXTS)]), special_tokens=("<|endoftext|>",))


def _ckpt(tmp_path, tok, name="ckpt"):
    torch.manual_seed(1)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size)).eval()
    return model, save_checkpoint(tmp_path / name, model, tok, {"step": 3})


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_export_loads_offline_in_transformers(tmp_path, kind, bpe_tok, char_tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = bpe_tok if kind == "bpe" else char_tok
    model, path = _ckpt(tmp_path, tok)
    out = export_hf(path, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied on load
    x = torch.tensor([tok.encode(CORPUS[:400])[:60], tok.encode(CORPUS[400:800])[:60]])
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token_id == tok.eos_id == hf.config.eos_token_id
    for text in SAMPLE_TEXTS:
        want = tok.encode(text, allowed_special="all")  # HF always matches special-token text
        assert hf_tok(text)["input_ids"] == want, text
        assert hf_tok.decode(want) == tok.decode(want)


def test_import_random_transformers_model(tmp_path, bpe_tok):
    torch.manual_seed(2)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=64, vocab_size=bpe_tok.vocab_size, n_positions=128,
        bos_token_id=bpe_tok.eos_id, eos_token_id=bpe_tok.eos_id)).eval()
    src = tmp_path / "hf-src"
    hf.save_pretrained(src)
    bpe_tok.hf_tokenizer().save(str(src / "tokenizer.json"))  # our files are HF `tokenizers` JSON

    ck = load_checkpoint(import_hf(src, tmp_path / "imported"))
    assert ck.config.n_embd == 64 and ck.config.block_size == 128 and ck.config.vocab_size == bpe_tok.vocab_size
    assert ck.tokenizer.encode("the quick brown fox") == bpe_tok.encode("the quick brown fox")
    assert ck.meta["source"]["kind"] == "huggingface"
    x = torch.randint(0, bpe_tok.vocab_size, (3, 100))
    with torch.no_grad():
        assert torch.allclose(ck.model(x)[0], hf(x).logits, atol=1e-4, rtol=0)

    assert ck.config.activation == "gelu_tanh"  # GPT2Config's default, "gelu_new"

    # round trip back out: identical tensors
    again = export_hf(ck, tmp_path / "hf-again")
    hf2 = transformers.GPT2LMHeadModel.from_pretrained(again)
    for k, v in hf.state_dict().items():
        assert torch.equal(v, hf2.state_dict()[k]), k


def test_import_refuses_pickles_and_foreign_architectures(tmp_path, bpe_tok):
    src = tmp_path / "pickled"
    src.mkdir()
    cfg = {k: v for k, v in hf_config_dict(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8,
                                                     vocab_size=bpe_tok.vocab_size)).items()}
    (src / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "PWNED"
    import pickle

    class Booby:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (src / "pytorch_model.bin").write_bytes(pickle.dumps(Booby()))
    with pytest.raises(CheckpointError, match="safe_serialization=True"):
        import_hf(src, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()

    (src / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(CheckpointError, match="activation_function"):
        import_hf(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type"):
        import_hf(src, tmp_path / "out")
    with pytest.raises(CheckpointError, match="does not exist"):
        import_hf(tmp_path / "nowhere", tmp_path / "out")


def test_import_exact_gelu_transformers_model(tmp_path, bpe_tok):
    """activation_function "gelu" (exact) imports as GPTConfig.activation "gelu" with the same logits."""
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, vocab_size=bpe_tok.vocab_size, n_positions=64,
        activation_function="gelu")).eval()
    src = tmp_path / "hf-gelu"
    hf.save_pretrained(src)
    bpe_tok.hf_tokenizer().save(str(src / "tokenizer.json"))
    ck = load_checkpoint(import_hf(src, tmp_path / "imported"))
    assert ck.config.activation == "gelu"
    x = torch.randint(0, bpe_tok.vocab_size, (2, 40))
    with torch.no_grad():
        assert torch.allclose(ck.model(x)[0], hf(x).logits, atol=1e-4, rtol=0)
