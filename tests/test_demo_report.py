"""The demo report's likelihood scorer: mean log-probability per completion token, checked by hand.

    pytest tests/test_demo_report.py -q
"""

from __future__ import annotations

import math

import torch

from gptcore.checkpoint import save_checkpoint
from gptcore.config import preset
from gptcore.model import GPT
from gptcore.tokenizer import train_bpe
from pipelines.demo_report import mean_logprobs

TEXT = "the cat sat on the mat and the dog sat on the log while the bird sang in the tree. " * 20


def _ckpt(tmp_path):
    tok = train_bpe([TEXT], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(preset("debug", vocab_size=tok.vocab_size, block_size=32))
    return save_checkpoint(tmp_path / "ck", model, tok, {"step": 0}), model.eval(), tok


def test_mean_logprobs_match_a_direct_computation(tmp_path):
    path, model, tok = _ckpt(tmp_path)
    pairs = [("the cat sat", " on the mat"), ("the dog", " sat on the log and the bird sang"), ("x", "")]
    got = mean_logprobs(str(path), pairs)
    for (prompt, completion), g in zip(pairs[:2], got[:2]):
        p, c = tok.encode(prompt), tok.encode(completion)
        ids = p + c
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids[:-1]]))
        logp = torch.log_softmax(logits[0].float(), -1)
        want = sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(c)) / len(c)
        assert math.isclose(g, want, rel_tol=1e-4, abs_tol=1e-5)
    assert got[2] == -math.inf  # an empty completion never wins best-of-n


def test_a_completion_longer_than_the_context_scores_its_visible_tail(tmp_path):
    path, _, _ = _ckpt(tmp_path)
    long = " the cat sat on the mat" * 20  # far more than block_size 32 tokens
    (score,) = mean_logprobs(str(path), [("the", long)])
    assert math.isfinite(score) and score < 0


def test_copy_test_tells_a_copying_model_from_one_that_cannot(tmp_path):
    from pipelines.demo_report import copy_losses, copy_test

    path, _, _ = _ckpt(tmp_path)
    first, repeat = copy_test(str(path), span=8)
    assert abs(first - repeat) < 0.5 * first  # random weights: both halves alike

    span = 8

    def copier(idx):  # logits point at the token `span` positions back: a perfect copier of the repeat
        logits = torch.zeros(*idx.shape, 300)
        logits.scatter_(2, torch.roll(idx, span - 1, dims=1)[..., None], 30.0)
        return logits, None

    first, repeat = copy_losses(copier, 300, span)
    assert repeat < 0.01 and first > 1.0
