"""Token-for-token parity of the gptcore engine with transformers' GPT2LMHeadModel.generate (greedy and
beam search, including the classic GPT-2 example num_beams=5, no_repeat_ngram_size=2,
early_stopping=True), on the same weights converted with gptcore.checkpoint."""

from __future__ import annotations

import pytest
import torch

from gptcore.checkpoint import hf_config_dict, to_hf_state_dict
from gptcore.config import GPTConfig
from gptcore.engine import Engine
from gptcore.model import GPT
from gptcore.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

V = 512


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(1)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=V, block_size=128)
    model = GPT(cfg).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (4, 9, 6, 13)]
    # make EOS likely in many contexts (its tied embedding row is scaled up), so beams finish on EOS
    # as well as on max_new_tokens and the finished-hypotheses bookkeeping is exercised
    eos = V - 1
    with torch.no_grad():
        model.transformer.wte.weight[eos] *= 5.0
    hf_cfg = {k: v for k, v in hf_config_dict(cfg, bos_token_id=eos, eos_token_id=eos).items()
              if k != "architectures"}
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_cfg))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not unexpected and all(".attn.bias" in k or "masked_bias" in k for k in missing), (missing, unexpected)
    hf.eval()
    return model, hf, prompts, eos


def _hf_generate(hf, prompt, eos, **kw):
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=eos,
                          eos_token_id=eos, **kw)
    return [row[len(prompt):] for row in out.tolist()]


def _ours_as_hf(c, eos):
    """Our completion in HF's layout: the EOS that ended it is part of HF's sequence."""
    return c.token_ids + ([eos] if c.finish_reason == "stop" else [])


def _same(hf_row, ours):
    # HF pads finished rows (with pad_token_id = eos here) to the longest row of the batch
    return hf_row[:len(ours)] == ours and all(t == hf_row[-1] for t in hf_row[len(ours):])


def test_logits_match(setup):
    model, hf, prompts, _ = setup
    x = torch.tensor([prompts[3]])
    with torch.no_grad():
        torch.testing.assert_close(model.forward_logits(x), hf(x).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kw", [{}, {"no_repeat_ngram_size": 2}, {"repetition_penalty": 1.5}])
def test_greedy_matches_transformers(setup, kw):
    model, hf, prompts, eos = setup
    eng = Engine(model, None, eos_id=eos)
    ours = eng.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0, **kw))
    stopped = 0
    for prompt, res in zip(prompts, ours):
        c = res.outputs[0]
        stopped += c.finish_reason == "stop"
        assert _same(_hf_generate(hf, prompt, eos, max_new_tokens=24, **kw)[0], _ours_as_hf(c, eos))
    if not kw:
        assert stopped >= 1  # EOS is really exercised


@pytest.mark.parametrize("kw", [
    dict(num_beams=5, no_repeat_ngram_size=2, early_stopping=True),  # the classic GPT-2 example
    dict(num_beams=4, early_stopping=False, n=4),
    dict(num_beams=3, early_stopping="never", length_penalty=2.0, n=2),
    dict(num_beams=4, length_penalty=-0.5, repetition_penalty=1.3, n=3),
])
def test_beam_search_matches_transformers(setup, kw):
    model, hf, prompts, eos = setup
    eng = Engine(model, None, eos_id=eos)
    n = kw.pop("n", 1)
    stops = 0
    for prompt in prompts:
        for max_new in (3, 16):
            ours = eng.generate([prompt], SamplingParams(max_new_tokens=max_new, n=n, **kw))[0].outputs
            theirs = _hf_generate(hf, prompt, eos, max_new_tokens=max_new, num_return_sequences=n, **kw)
            assert len(ours) == len(theirs) == n
            for h, c in zip(theirs, ours):
                stops += c.finish_reason == "stop"
                assert _same(h, _ours_as_hf(c, eos)), (kw, max_new, h, c)
    assert stops >= 1
