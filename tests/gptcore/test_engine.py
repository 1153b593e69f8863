"""The generation engine on a tiny random GPT: cache correctness, batching, sampling rules, stopping,
seeds, beam search bookkeeping and the continuous-batching step API."""

from __future__ import annotations

import time

import pytest
import torch

from gptcore import gemv
from gptcore.config import GPTConfig
from gptcore.engine import Engine, PromptTooLongError
from gptcore.model import GPT, KVCache
from gptcore.sampling import SamplingParams

V = 512
EOS = 511


class PairTokenizer:
    """Token i is two letters, so stop strings can start in the middle of a token; EOS decodes to ''."""

    eos_id = EOS
    vocab_size = V

    @staticmethod
    def piece(i: int) -> str:
        return chr(65 + i % 26) + chr(97 + (i // 26) % 26)

    def encode(self, text: str) -> list[int]:
        table = {self.piece(i): i for i in range(V - 1)}
        return [table[text[k:k + 2]] for k in range(0, len(text), 2)]

    def decode(self, ids) -> str:
        return "".join(self.piece(i) for i in ids if i != EOS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread avoids OpenMP barrier stalls when the CPU is oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=V, block_size=96)).eval()


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, PairTokenizer())


def greedy(**kw):
    return SamplingParams(temperature=0, **kw)


PROMPTS = [[5, 17, 300], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [100, 200, 300, 400, 7, 7]]


# ---- model-level correctness ---------------------------------------------------------------------


def test_causality_future_tokens_never_change_past_logits(model):
    x = torch.randint(0, V, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        a, b = model.forward_logits(x), model.forward_logits(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("kernel", ["model", "torch", "onednn", "onednn-always-packed", "gemv"])
def test_kv_cache_decode_equals_full_recompute(model, kernel, monkeypatch):
    if kernel == "onednn-always-packed":  # tiny matmuls normally skip the packed kernel: force it
        import gptcore.engine

        monkeypatch.setattr(gptcore.engine._Linear, "BIG", 0)
        kernel = "onednn"
    if kernel == "gemv" and not gemv.available():
        pytest.skip(f"the gemv kernel is unavailable here: {gemv.why_unavailable()}")
    eng = Engine(model, None, kernel=kernel)
    if kernel == "onednn" and eng.kernel != "onednn":
        pytest.skip("oneDNN is not available in this torch build")
    out = eng.generate(PROMPTS, greedy(max_new_tokens=12, logprobs=True))
    for prompt, res in zip(PROMPTS, out):
        c = res.outputs[0]
        seq = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            full = torch.log_softmax(model.forward_logits(seq)[0].float(), -1)  # (T, V) no cache
        P = len(prompt)
        for i, tok in enumerate(c.token_ids):
            assert int(full[P - 1 + i].argmax()) == tok  # greedy under full recompute
            assert abs(float(full[P - 1 + i, tok]) - c.logprobs[i]) < 1e-4


def test_ragged_batch_equals_each_prompt_alone(engine):
    params = greedy(max_new_tokens=15, logprobs=True)
    batch = engine.generate(PROMPTS, params)
    for prompt, res in zip(PROMPTS, batch):
        alone = engine.generate([prompt], params)[0].outputs[0]
        assert res.outputs[0].token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(res.outputs[0].logprobs), torch.tensor(alone.logprobs),
                                   rtol=0, atol=1e-5)
        assert res.prompt_token_ids == prompt and res.prompt is None


def test_onednn_and_model_kernels_agree_in_bf16(model):
    a = Engine(model, None, dtype=torch.bfloat16, kernel="model").generate(PROMPTS[:2], greedy(max_new_tokens=4))
    b = Engine(model, None, dtype=torch.bfloat16).generate(PROMPTS[:2], greedy(max_new_tokens=4))
    assert all(len(r.outputs[0].token_ids) == 4 for r in a + b)


# ---- sampling rules ------------------------------------------------------------------------------


def test_top_k_1_equals_greedy(engine):
    g = engine.generate(PROMPTS, greedy(max_new_tokens=10))
    k1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.3, top_k=1, seed=3))
    assert [r.outputs[0].token_ids for r in g] == [r.outputs[0].token_ids for r in k1]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_size_never_repeats_an_ngram(engine, n):
    prompt = [7, 8, 9, 10]
    for params in (greedy(max_new_tokens=40, no_repeat_ngram_size=n, ignore_eos=True),
                   SamplingParams(max_new_tokens=40, no_repeat_ngram_size=n, temperature=1.0, top_k=3, seed=0,
                                  ignore_eos=True)):
        toks = prompt + engine.generate([prompt], params)[0].outputs[0].token_ids
        grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
        assert len(grams) == len(set(grams)), f"repeated {n}-gram in {toks}"


def test_repetition_penalty_changes_greedy_output(engine):
    plain = engine.generate([[3, 3, 3]], greedy(max_new_tokens=20))[0].outputs[0].token_ids
    pen = engine.generate([[3, 3, 3]], greedy(max_new_tokens=20, repetition_penalty=5.0))[0].outputs[0].token_ids
    assert len(set(pen)) > len(set(plain))


def test_copy_bias_steers_greedy_and_beam_output_to_prompt_tokens(engine):
    prompt = [7, 8, 9, 10, 11, 12]
    for base in (greedy(max_new_tokens=12, ignore_eos=True), SamplingParams(num_beams=3, max_new_tokens=6)):
        plain = engine.generate([prompt], base)[0].outputs[0].token_ids
        assert engine.generate([prompt], base.replace(copy_bias=0.0))[0].outputs[0].token_ids == plain
        copied = engine.generate([prompt], base.replace(copy_bias=50.0))[0].outputs[0].token_ids
        assert set(copied) <= set(prompt) and sum(t in prompt for t in plain) < len(plain)
        away = engine.generate([prompt], base.replace(copy_bias=-50.0))[0].outputs[0].token_ids
        assert not set(away) & set(prompt)
    # the bias composes with the n-gram ban: prompt tokens only, and no 2-gram repeats
    toks = engine.generate([prompt], greedy(max_new_tokens=4, copy_bias=50.0, no_repeat_ngram_size=2,
                                            ignore_eos=True))[0].outputs[0].token_ids
    grams = [tuple((prompt + toks)[i:i + 2]) for i in range(len(prompt) + len(toks) - 1)]
    assert set(toks) <= set(prompt) and len(grams) == len(set(grams))


def test_per_row_params_in_one_batch_match_separate_runs(engine):
    params = [greedy(max_new_tokens=8),
              SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.8, seed=11, copy_bias=3.0),
              SamplingParams(max_new_tokens=9, temperature=1.5, top_k=20, seed=12, repetition_penalty=1.2),
              greedy(max_new_tokens=6, no_repeat_ngram_size=2, copy_bias=2.0)]
    together = engine.generate(PROMPTS, params)
    for prompt, p, res in zip(PROMPTS, params, together):
        alone = engine.generate([prompt], p)[0].outputs[0]
        assert res.outputs[0].token_ids == alone.token_ids
        assert len(alone.token_ids) == p.max_new_tokens and alone.finish_reason == "length"


def test_seeds_reproduce_independently_of_batch_mates(engine):
    p = SamplingParams(max_new_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    alone = engine.generate([PROMPTS[0]], p)[0].outputs[0].token_ids
    again = engine.generate([PROMPTS[0]], p)[0].outputs[0].token_ids
    mates = engine.generate([PROMPTS[2], PROMPTS[0], PROMPTS[1]],
                            [SamplingParams(max_new_tokens=7, temperature=0.9, seed=5), p, greedy(max_new_tokens=3)])
    assert alone == again == mates[1].outputs[0].token_ids
    other = engine.generate([PROMPTS[0]], p.replace(seed=4321))[0].outputs[0].token_ids
    assert other != alone
    # n > 1: distinct samples, each reproducible, numbered 0..n-1
    many = engine.generate([PROMPTS[0]], p.replace(n=3))[0].outputs
    assert [c.index for c in many] == [0, 1, 2]
    assert many[0].token_ids == alone and len({tuple(c.token_ids) for c in many}) == 3
    assert [c.token_ids for c in engine.generate([PROMPTS[0]], p.replace(n=3))[0].outputs] == \
        [c.token_ids for c in many]


def test_unseeded_sampling_follows_the_global_torch_seed(engine):
    p = SamplingParams(max_new_tokens=10, temperature=1.0)
    torch.manual_seed(99)
    a = engine.generate([PROMPTS[0]], p)[0].outputs[0].token_ids
    torch.manual_seed(99)
    assert engine.generate([PROMPTS[0]], p)[0].outputs[0].token_ids == a


# ---- stopping ------------------------------------------------------------------------------------


def test_eos_stop_token_ids_and_ignore_eos(model):
    free = Engine(model, None).generate([PROMPTS[1]], greedy(max_new_tokens=10))[0].outputs[0].token_ids
    stop_at = free[4]
    first = free.index(stop_at)
    for eng, params in ((Engine(model, None, eos_id=stop_at), greedy(max_new_tokens=10)),
                        (Engine(model, None), greedy(max_new_tokens=10, stop_token_ids=[stop_at]))):
        c = eng.generate([PROMPTS[1]], params)[0].outputs[0]
        assert c.finish_reason == "stop" and c.token_ids == free[:first]  # the stop token is not returned
    c = Engine(model, None, eos_id=stop_at).generate([PROMPTS[1]], greedy(max_new_tokens=10, ignore_eos=True))
    assert c[0].outputs[0].token_ids == free and c[0].outputs[0].finish_reason == "length"


def test_stop_strings_cut_exactly(engine):
    tok = PairTokenizer()
    free = engine.generate([PROMPTS[3]], greedy(max_new_tokens=12, ignore_eos=True))[0].outputs[0]
    assert free.text == tok.decode(free.token_ids) and len(free.text) == 24
    for start in (9, 12):  # inside a token (odd) and on a token boundary (even)
        stop = free.text[start:start + 3]
        cut = free.text.index(stop)
        for params in (greedy(max_new_tokens=12, ignore_eos=True, stop=[stop, "zzzzzz"], logprobs=True),
                       SamplingParams(max_new_tokens=12, temperature=0.5, top_k=1, ignore_eos=True, stop=[stop])):
            c = engine.generate([PROMPTS[3]], params)[0].outputs[0]
            assert c.finish_reason == "stop"
            assert c.text == free.text[:cut] and stop not in c.text
            assert c.token_ids == free.token_ids[:cut // 2]  # only tokens wholly before the stop string
            assert tok.decode(c.token_ids) == free.text[:cut - cut % 2]
            if c.logprobs is not None:
                assert len(c.logprobs) == len(c.token_ids)


def test_streaming_deltas_add_up_and_never_leak_a_stop_string(engine):
    free = engine.generate([PROMPTS[3]], greedy(max_new_tokens=12, ignore_eos=True))[0].outputs[0]
    stop = free.text[9:12]
    engine.add_request("s1", PROMPTS[3], greedy(max_new_tokens=12, ignore_eos=True, stop=[stop]))
    engine.add_request("s2", PROMPTS[3], greedy(max_new_tokens=12, ignore_eos=True))
    text = {"s1": "", "s2": ""}
    ids = {"s1": [], "s2": []}
    final = {}
    while engine.has_unfinished():
        for o in engine.step():
            text[o.request_id] += o.new_text
            ids[o.request_id] += o.new_token_ids
            assert stop not in text["s1"]
            if o.finished:
                final[o.request_id] = o
    assert text["s1"] == final["s1"].output.text == free.text[:free.text.index(stop)]
    assert ids["s1"] == final["s1"].output.token_ids and final["s1"].finish_reason == "stop"
    assert text["s2"] == free.text and ids["s2"] == free.token_ids and final["s2"].finish_reason == "length"


def test_text_prompts_with_a_real_tokenizer_and_from_checkpoint(tmp_path):
    tokenizer_mod = pytest.importorskip("gptcore.tokenizer")
    tok = tokenizer_mod.train_char(["hello world, the quick brown fox jumps over the lazy dog"],
                                   special_tokens=("<|endoftext|>",))
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=tok.vocab_size, block_size=64)).eval()
    eng = Engine(m, tok)
    res = eng.generate(["hello ", ""], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    assert res[0].prompt == "hello " and res[0].prompt_token_ids == tok.encode("hello ")
    assert res[0].outputs[0].text == tok.decode(res[0].outputs[0].token_ids)
    assert res[1].prompt_token_ids == [tok.eos_id]  # an empty prompt starts from <|endoftext|>
    from gptcore.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / "ckpt", m, tok, {"step": 0})
    again = Engine.from_checkpoint(path).generate(["hello "], SamplingParams(max_new_tokens=6, temperature=0,
                                                                             ignore_eos=True))
    assert again[0].outputs[0].token_ids == res[0].outputs[0].token_ids


# ---- context length ------------------------------------------------------------------------------


def test_prompt_too_long_errors_or_truncates_left(engine):
    long = list(range(90))  # block_size 96
    with pytest.raises(PromptTooLongError) as e:
        engine.generate([long], greedy(max_new_tokens=10))
    msg = str(e.value)
    assert "90 tokens" in msg and "max_new_tokens=10" in msg and "block_size=96" in msg and "truncate='left'" in msg
    res = engine.generate([long], greedy(max_new_tokens=10, truncate="left"))[0]
    assert res.prompt_token_ids == long[-86:] and len(res.outputs[0].token_ids) <= 10
    with pytest.raises(PromptTooLongError, match="leaves no room"):
        engine.generate([[1]], greedy(max_new_tokens=96))
    assert not engine.has_unfinished()  # a refused batch leaves the engine idle
    with pytest.raises(ValueError, match=r"\[0, vocab_size=512\)"):
        engine.generate([[V + 3]], greedy())


# ---- beam search bookkeeping (token parity with HF is in test_generate_hf_parity.py) -------------


def test_beam_search_returns_n_best_beams_sorted(engine):
    res = engine.generate([PROMPTS[1]], SamplingParams(num_beams=4, n=3, max_new_tokens=6, logprobs=True))[0]
    assert [c.index for c in res.outputs] == [0, 1, 2]
    scores = [c.cumulative_logprob for c in res.outputs]
    assert scores == sorted(scores, reverse=True)
    for c in res.outputs:
        assert len(c.token_ids) == len(c.logprobs) and c.finish_reason in ("stop", "length")
        # with length_penalty 1 the score is the mean log-prob of the beam's tokens (+ EOS if it stopped)
        if c.finish_reason == "length":
            assert abs(sum(c.logprobs) / len(c.logprobs) - c.cumulative_logprob) < 1e-4
    greedy_out = engine.generate([PROMPTS[1]], greedy(max_new_tokens=6))[0].outputs[0]
    assert res.outputs[0].cumulative_logprob >= sum(
        engine.generate([PROMPTS[1]], greedy(max_new_tokens=6, logprobs=True))[0].outputs[0].logprobs) / 6 - 1e-5
    assert len(greedy_out.token_ids) == 6


# ---- continuous batching -------------------------------------------------------------------------


def test_continuous_batching_requests_joining_mid_flight_match_alone(model):
    eng = Engine(model, PairTokenizer(), max_batch_size=4)
    seeded = SamplingParams(max_new_tokens=9, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    plan = {0: [("a", PROMPTS[0], greedy(max_new_tokens=10, ignore_eos=True)),
                ("b", PROMPTS[1], greedy(max_new_tokens=4, ignore_eos=True))],
            1: [("s", PROMPTS[3], seeded)],
            2: [("c", PROMPTS[2], greedy(max_new_tokens=12, ignore_eos=True))],
            3: [("d", PROMPTS[3], greedy(max_new_tokens=6, ignore_eos=True)),
                ("e", [9, 9], greedy(max_new_tokens=5, ignore_eos=True))]}  # d/e wait for free slots
    got: dict[str, list[int]] = {}
    reasons = {}
    step = 0
    while step in plan or eng.has_unfinished():
        for rid, prompt, params in plan.get(step, []):
            eng.add_request(rid, prompt, params)
        outs = eng.step()
        assert len({(o.request_id, o.index) for o in outs}) == len(outs)
        assert len(eng._rows) <= 4
        for o in outs:
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
        step += 1
    alone = Engine(model, PairTokenizer())
    for rid, prompt, params in [x for v in plan.values() for x in v]:
        ref = alone.generate([prompt], params)[0].outputs[0].token_ids
        assert got[rid] == ref, rid
        assert reasons[rid] == "length"
    assert not eng.has_unfinished() and eng._rows == []


def test_abort_frees_the_slot_and_generate_refuses_while_busy(model):
    eng = Engine(model, None, max_batch_size=2)
    eng.add_request("x", PROMPTS[0], greedy(max_new_tokens=50))
    eng.add_request("y", PROMPTS[1], SamplingParams(max_new_tokens=50, num_beams=2))
    eng.step()
    with pytest.raises(ValueError, match="already in flight"):
        eng.add_request("x", PROMPTS[0], greedy())
    with pytest.raises(RuntimeError, match="idle engine"):
        eng.generate([PROMPTS[0]], greedy())
    assert eng.abort("x") and eng.abort("y") and not eng.abort("nope")
    assert not eng.has_unfinished()
    assert eng.generate([PROMPTS[0]], greedy(max_new_tokens=3))[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kernel,dtype", [("onednn", torch.float32), ("torch", torch.float32),
                                          ("onednn", torch.bfloat16), ("gemv", torch.float32),
                                          ("gemv", torch.bfloat16)])
def test_mixed_step_equals_a_decode_step_plus_a_separate_prefill(model, kernel, dtype):
    """Requests joining a running batch are prefilled in the same forward as the decode step
    (`_Forward.mixed`); its logits and cache writes must equal the two separate forwards (bf16: weights
    bf16, keys/values fp32, within bf16 rounding)."""
    if kernel == "gemv" and not gemv.available():
        pytest.skip(f"the gemv kernel is unavailable here: {gemv.why_unavailable()}")
    eng = Engine(model, None, max_batch_size=6, kernel=kernel, dtype=dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    if eng.kernel != kernel:
        pytest.skip(f"kernel {kernel} unavailable here")
    fwd = eng._fwd
    # three running rows of different lengths (ragged), then two prompts of lengths 4 and 2 join
    run_prompts = [[5, 17, 300], [1, 2, 3, 4, 5, 6, 7], [42]]
    new = torch.tensor([[9, 8, 7, 6], [3, 4, 0, 0]])
    lens = torch.tensor([4, 2])

    def prefilled():
        cache = fwd.new_cache(6, 32)
        idx = torch.zeros(3, 7, dtype=torch.long)
        for i, p in enumerate(run_prompts):
            idx[i, :len(p)] = torch.tensor(p)
        adv = torch.tensor([len(p) for p in run_prompts])
        view = KVCache(k=[t[:3] for t in cache.k], v=[t[:3] for t in cache.v], lengths=cache.lengths[:3].clone())
        fwd(idx, view, advance=adv, logits_at=adv - 1)
        cache.lengths[:3] = view.lengths
        return cache

    last = torch.tensor([11, 12, 13])
    with torch.inference_mode():
        a = prefilled()  # reference: decode step of rows 0-2, then a prefill of rows 3-4
        va = KVCache(k=[t[:3] for t in a.k], v=[t[:3] for t in a.v], lengths=a.lengths[:3].clone())
        ref_dec = fwd(last[:, None], va)
        vb = KVCache(k=[t[3:5] for t in a.k], v=[t[3:5] for t in a.v], lengths=torch.zeros(2, dtype=torch.long))
        ref_new = fwd(new, vb, advance=lens, logits_at=lens - 1)
        b = prefilled()
        got = fwd.mixed(last, new, lens, b)
    assert got.shape == (5, V)
    torch.testing.assert_close(got[:3], ref_dec, **tol)
    torch.testing.assert_close(got[3:], ref_new, **tol)
    assert b.lengths[:5].tolist() == [4, 8, 2, 4, 2]
    for layer in range(len(a.k)):
        for r, n_valid in enumerate([4, 8, 2, 4, 2]):  # positions past a row's length are never read
            torch.testing.assert_close(b.k[layer][r, :, :n_valid], a.k[layer][r, :, :n_valid], **tol)
            torch.testing.assert_close(b.v[layer][r, :, :n_valid], a.v[layer][r, :, :n_valid], **tol)


def test_joins_use_one_forward_per_step_and_keep_every_sampling_rule(model):
    """A join mid-decode costs no extra forward; n > 1, repetition penalty and seeded sampling of
    joining requests still match running them alone."""
    eng = Engine(model, PairTokenizer(), max_batch_size=8)
    calls = {"mixed": 0, "plain": 0}
    fwd = eng._fwd
    orig_call, orig_mixed = fwd.__class__.__call__, fwd.__class__.mixed

    class Counting(fwd.__class__):
        def __call__(self, *a, **k):
            calls["plain"] += 1
            return orig_call(self, *a, **k)

        def mixed(self, *a, **k):
            calls["mixed"] += 1
            return orig_mixed(self, *a, **k)

    fwd.__class__ = Counting
    plan = {0: [("a", PROMPTS[0], greedy(max_new_tokens=12, ignore_eos=True))],
            2: [("r", PROMPTS[1], greedy(max_new_tokens=8, ignore_eos=True, repetition_penalty=1.7))],
            3: [("n", PROMPTS[3], SamplingParams(max_new_tokens=7, temperature=0.8, n=3, seed=5, ignore_eos=True)),
                ("g", [9, 9], greedy(max_new_tokens=5, ignore_eos=True))]}
    got: dict[tuple[str, int], list[int]] = {}
    step = 0
    while step in plan or eng.has_unfinished():
        for rid, prompt, params in plan.get(step, []):
            eng.add_request(rid, prompt, params)
        for o in eng.step():
            got.setdefault((o.request_id, o.index), []).extend(o.new_token_ids)
        step += 1
    assert calls["mixed"] == 2 and calls["plain"] == step - 2, calls  # one forward per step
    alone = Engine(model, PairTokenizer())
    for rid, prompt, params in [x for v in plan.values() for x in v]:
        ref = alone.generate([prompt], params)[0].outputs
        assert [got[(rid, c.index)] for c in ref] == [c.token_ids for c in ref], rid


def test_add_request_without_deltas_reports_each_completion_once_whole(model):
    eng = Engine(model, PairTokenizer(), max_batch_size=4)
    eng.add_request("q", PROMPTS[1], greedy(max_new_tokens=7, ignore_eos=True, logprobs=True), deltas=False)
    eng.add_request("s", PROMPTS[0], greedy(max_new_tokens=7, ignore_eos=True))  # streaming neighbour
    per_step, stamps = [], []
    while eng.has_unfinished():
        per_step.append([o for o in eng.step()])
        stamps.append(time.perf_counter())
    q = [o for outs in per_step for o in outs if o.request_id == "q"]
    s = [o for outs in per_step for o in outs if o.request_id == "s"]
    assert len(q) == 1 and q[0].finished and len(s) == 7  # the streaming one reports every step
    ref = Engine(model, PairTokenizer()).generate([PROMPTS[1]], greedy(max_new_tokens=7, ignore_eos=True,
                                                                       logprobs=True))[0].outputs[0]
    assert q[0].new_token_ids == ref.token_ids and q[0].new_text == ref.text
    assert q[0].new_logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert q[0].output.text == ref.text and q[0].finish_reason == "length"
    assert q[0].first_token_time <= stamps[0] < stamps[-1]  # when its first token came, not when it finished
    assert s[0].first_token_time == s[-1].first_token_time  # the first token's time, not the step's



@pytest.mark.parametrize("kernel", ["onednn", "torch", "gemv"])
def test_exact_gelu_models_decode_like_the_model(kernel):
    """GPTConfig.activation="gelu": the engine's fused/packed MLP uses the exact GELU too."""
    if kernel == "gemv" and not gemv.available():
        pytest.skip(f"the gemv kernel is unavailable here: {gemv.why_unavailable()}")
    torch.manual_seed(1)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=V, block_size=96, activation="gelu")).eval()
    eng = Engine(m, None, kernel=kernel)
    ref = Engine(m, None, kernel="model")
    if eng.kernel != kernel:
        pytest.skip(f"kernel {kernel} unavailable here")
    p = greedy(max_new_tokens=12, ignore_eos=True, logprobs=True)
    a = eng.generate(PROMPTS, p)
    b = ref.generate(PROMPTS, p)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert x.outputs[0].logprobs == pytest.approx(y.outputs[0].logprobs, abs=1e-4)
    # and it is a different function from the tanh form (the option is not ignored)
    tanh = GPT(m.config.replace(activation="gelu_tanh")).eval()
    tanh.load_state_dict(m.state_dict())
    x = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        assert not torch.equal(m(x)[0], tanh(x)[0])
