"""SamplingParams validation and the pure logit transforms, checked against Hugging Face's processors."""

from __future__ import annotations

import random

import pytest
import torch

from gptcore.sampling import (
    NGramIndex,
    SamplingParams,
    SamplingParamsError,
    apply_copy_bias,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    argmax,
    banned_ngram_tokens,
    no_repeat_ngram_mask,
    sample_from_probs,
    token_presence,
)

hf_lp = pytest.importorskip("transformers.generation.logits_process")


# ---- SamplingParams ----------------------------------------------------------------------------


def test_defaults_are_valid_and_roundtrip():
    p = SamplingParams()
    assert p.max_new_tokens == 16 and p.temperature == 1.0 and p.num_beams == 1 and p.truncate == "error"
    q = SamplingParams(stop=["\n\n", "END"], stop_token_ids=[3], seed=7, temperature=0.5, logprobs=True)
    assert q.stop == ("\n\n", "END") and q.stop_token_ids == (3,)
    d = q.to_dict()
    assert d["stop"] == ["\n\n", "END"]
    assert SamplingParams.from_dict(d) == q
    assert SamplingParams(stop="###").stop == ("###",)
    with pytest.raises(SamplingParamsError, match="unknown SamplingParams field.*'temp'"):
        SamplingParams.from_dict({"temp": 1.0})


@pytest.mark.parametrize("field,value,needle", [
    ("max_new_tokens", 0, ">= 1"),
    ("temperature", -0.1, ">= 0"),
    ("temperature", float("nan"), "finite"),
    ("top_k", -1, ">= 0"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.5, "(0, 1]"),
    ("repetition_penalty", 0.0, "> 0"),
    ("copy_bias", float("inf"), "finite"),
    ("copy_bias", "1", "finite"),
    ("no_repeat_ngram_size", -2, ">= 0"),
    ("num_beams", 0, ">= 1"),
    ("length_penalty", float("inf"), "finite"),
    ("early_stopping", "sometimes", "'never'"),
    ("stop", [""], "non-empty"),
    ("stop_token_ids", [-1], ">= 0"),
    ("n", 0, ">= 1"),
    ("seed", 1.5, "integer or None"),
    ("seed", True, "integer or None"),
    ("logprobs", 1, "true or false"),
    ("truncate", "right", "'error' or 'left'"),
    ("ignore_eos", "yes", "true or false"),
])
def test_each_field_is_validated_with_a_helpful_message(field, value, needle):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**{field: value})
    msg = str(e.value)
    assert field in msg and needle in msg and repr(value) in msg
    assert isinstance(e.value, ValueError)


def test_cross_field_rules():
    with pytest.raises(SamplingParamsError, match="n must be <= num_beams"):
        SamplingParams(num_beams=2, n=3, temperature=0)
    with pytest.raises(SamplingParamsError, match="deterministic"):
        SamplingParams(num_beams=4, temperature=0.7)
    with pytest.raises(SamplingParamsError, match="identical completions"):
        SamplingParams(n=2, temperature=0)
    # beam search accepts the default temperature (HF: sampling knobs do not apply without do_sample)
    assert SamplingParams(num_beams=5, n=5).use_beam_search
    assert SamplingParams(temperature=0).greedy


# ---- logit transforms vs Hugging Face --------------------------------------------------------------


def _logits(B=4, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * 3


def test_repetition_penalty_matches_hf():
    x = _logits()
    ids = torch.tensor([[1, 2, 3, 3], [4, 5, 6, 7], [0, 0, 0, 0], [49, 10, 11, 12]])
    ref = hf_lp.RepetitionPenaltyLogitsProcessor(1.3)(ids, x.clone())
    got = apply_repetition_penalty(x, token_presence(ids, 50), 1.3)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # per-row penalties: a row with 1.0 is untouched
    per_row = apply_repetition_penalty(x, token_presence(ids, 50), torch.tensor([1.3, 1.0, 1.3, 1.0]))
    torch.testing.assert_close(per_row[[0, 2]], ref[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(per_row[[1, 3]], x[[1, 3]], rtol=0, atol=0)
    # ragged lists and -1 padding give the same presence mask
    assert torch.equal(token_presence([[1, 2], [3]], 10), token_presence(torch.tensor([[1, 2], [3, -1]]), 10))


def test_copy_bias_adds_to_prompt_tokens_only_per_row():
    assert SamplingParams().copy_bias == 0.0 and SamplingParams(copy_bias=-0.5).copy_bias == -0.5
    logits = torch.tensor([[0.0, 1.0, -2.0, float("-inf")], [0.5, 0.5, 0.5, 0.5]])
    in_prompt = token_presence([[0, 3], [1, 2]], 4)
    out = apply_copy_bias(logits, in_prompt, torch.tensor([2.0, 0.0]))
    assert out.tolist() == [[2.0, 1.0, -2.0, float("-inf")], [0.5, 0.5, 0.5, 0.5]]  # -inf stays banned
    assert apply_copy_bias(logits, in_prompt, -1.0)[1].tolist() == [0.5, -0.5, -0.5, 0.5]
    assert logits[0, 0] == 0.0  # not in place


def test_top_k_and_top_p_match_hf_row_by_row():
    x = _logits(B=5, V=64, seed=1)
    ks = [0, 1, 5, 64, 10]
    got = apply_top_k(x, torch.tensor(ks))
    for b, k in enumerate(ks):
        ref = x[b:b + 1] if k == 0 else hf_lp.TopKLogitsWarper(k)(None, x[b:b + 1].clone())
        torch.testing.assert_close(got[b:b + 1], ref, rtol=0, atol=0)
    ps = [1.0, 0.9, 0.5, 0.01, 0.3]
    got = apply_top_p(x, torch.tensor(ps))
    for b, p in enumerate(ps):
        ref = x[b:b + 1] if p == 1.0 else hf_lp.TopPLogitsWarper(p)(None, x[b:b + 1].clone())
        torch.testing.assert_close(got[b:b + 1], ref, rtol=0, atol=0)
    assert int((got[3] > float("-inf")).sum()) >= 1  # always keeps the most likely token


def test_temperature_leaves_greedy_rows_alone():
    x = _logits(B=2)
    y = apply_temperature(x, torch.tensor([0.0, 2.0]))
    assert torch.equal(y[0], x[0]) and torch.allclose(y[1], x[1] / 2)


def test_no_repeat_ngram_mask_matches_hf_and_incremental_index():
    rng = random.Random(0)
    for n in (1, 2, 3):
        seqs = torch.tensor([[rng.randrange(6) for _ in range(15)] for _ in range(4)])
        scores = torch.zeros(4, 6)
        ref = hf_lp.NoRepeatNGramLogitsProcessor(n)(seqs, scores.clone()) == float("-inf")
        mask = no_repeat_ngram_mask(seqs, n, 6)
        assert torch.equal(mask, ref)
        for b in range(4):
            toks = seqs[b].tolist()
            assert sorted(set(banned_ngram_tokens(toks, n))) == mask[b].nonzero()[:, 0].tolist()
            idx = NGramIndex(n)
            for t in toks:
                idx.append(t)
            assert sorted(idx.banned()) == mask[b].nonzero()[:, 0].tolist()


def test_sample_from_probs_follows_the_distribution_and_never_picks_zero():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25]]).expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    draws = sample_from_probs(probs, torch.rand(4000, generator=g))
    counts = torch.bincount(draws, minlength=5).float() / 4000
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1] - 0.5) < 0.05 and abs(counts[3] - 0.25) < 0.05
    # unnormalised rows (after filtering) and u at the edges stay in range
    out = sample_from_probs(torch.tensor([[0.0, 2.0, 0.0]] * 2), torch.tensor([0.0, 0.999999]))
    assert out.tolist() == [1, 1]


def test_fast_argmax_equals_torch_argmax_including_ties():
    g = torch.Generator().manual_seed(0)
    for V in (10, 4096, 50257, 300):
        x = torch.randint(-3, 4, (9, V), generator=g).float()  # many ties: the first index must win
        x[0, -1] = 100.0  # maximum in the tail columns
        x[1, :] = 7.0  # all equal
        assert torch.equal(argmax(x), x.argmax(-1))
        y = torch.randn(5, V, generator=g)
        assert torch.equal(argmax(y), y.argmax(-1))
