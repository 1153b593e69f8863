"""Per-row sampling for the engine's running batch: every decode row draws its next token with its own
SamplingParams, vectorised over the batch.

    from gptcore.engine_rows import RowParams, choose_tokens
    rp = RowParams.of(rows, device)                            # rebuilt only when the set of rows changes
    toks, lps = choose_tokens(logits, rp, rows, presence, start=0)   # logits (m, V) -> m token ids

Order of the logit processors is Hugging Face's: repetition penalty, (copy bias,) n-gram ban,
temperature, top-k, top-p. All-greedy batches (the common serving case) take a plain argmax of the raw logits. Each
sampling row draws its uniform from its own torch.Generator, so a seeded request's output does not
depend on its batch mates. Internal to gptcore.engine; tested through tests/gptcore/test_engine.py.

Does not: own the rows, the presence matrix or the generators (the engine does), or do beam search
(gptcore.engine_beam).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from gptcore.engine_requests import Seq
from gptcore.sampling import (
    apply_copy_bias,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    argmax,
    sample_from_probs,
    token_presence,
)

__all__ = ["RowParams", "choose_tokens"]


@dataclass
class RowParams:
    """Sampling parameters of the running rows, as Python lists (cheap tests) and tensors (maths)."""

    temperature_list: list[float]
    top_k_list: list[int]
    top_p_list: list[float]
    rep_list: list[float]
    copy_list: list[float]
    ngram_list: list[bool]
    logprobs_list: list[bool]
    temperature: torch.Tensor  # (rows,) float32
    top_k: torch.Tensor  # (rows,) long
    top_p: torch.Tensor  # (rows,) float32
    rep: torch.Tensor  # (rows,) float32
    copy: torch.Tensor  # (rows,) float32
    plain_greedy: bool  # every row: argmax of the raw logits

    @classmethod
    def of(cls, rows: Sequence[Seq], device: torch.device) -> RowParams:
        ps = [s.params for s in rows]
        return cls(
            temperature_list=[p.temperature for p in ps],
            top_k_list=[p.top_k for p in ps],
            top_p_list=[p.top_p for p in ps],
            rep_list=[p.repetition_penalty for p in ps],
            copy_list=[p.copy_bias for p in ps],
            ngram_list=[s.ngram is not None for s in rows],
            logprobs_list=[p.logprobs for p in ps],
            temperature=torch.tensor([p.temperature for p in ps], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k for p in ps], dtype=torch.long, device=device),
            top_p=torch.tensor([p.top_p for p in ps], dtype=torch.float32, device=device),
            rep=torch.tensor([p.repetition_penalty for p in ps], dtype=torch.float32, device=device),
            copy=torch.tensor([p.copy_bias for p in ps], dtype=torch.float32, device=device),
            # the common serving/benchmark case: argmax of the raw logits for every row
            plain_greedy=all(p.temperature == 0 and p.repetition_penalty == 1.0 and not p.logprobs
                             and p.no_repeat_ngram_size == 0 and p.copy_bias == 0 for p in ps),
        )


def prompt_masks(rows: Sequence[Seq], vocab_size: int, device: torch.device) -> torch.Tensor:
    """(len(rows), V) bool: the tokens of each row's prompt (built once per request, then reused)."""
    out = []
    for s in rows:
        req = s.req
        if req.prompt_mask is None:
            req.prompt_mask = token_presence([req.prompt_ids], vocab_size, device)[0]
        out.append(req.prompt_mask)
    return torch.stack(out)


def _ban_ngrams(x: torch.Tensor, logits: torch.Tensor, rows: Sequence[Seq], start: int,
                ngram: list[int]) -> torch.Tensor:
    """Set the banned next tokens of rows `ngram` (indices into x) to -inf; copies x if it is `logits`."""
    r_idx: list[int] = []
    t_idx: list[int] = []
    for i in ngram:
        index = rows[start + i].ngram
        assert index is not None  # ngram lists exactly the rows that have an NGramIndex
        banned = index.banned()
        r_idx += [i] * len(banned)
        t_idx += banned
    if r_idx:
        x = x.clone() if x is logits else x
        x[torch.tensor(r_idx, device=x.device), torch.tensor(t_idx, device=x.device)] = float("-inf")
    return x


def choose_tokens(logits: torch.Tensor, rp: RowParams, rows: Sequence[Seq], presence: torch.Tensor | None,
                  start: int = 0) -> tuple[list[int], list[float] | None]:
    """Next token of running rows [start, start + len(logits)) from their (m, V) logits, each with
    its own parameters (HF order: repetition penalty, copy bias, n-gram ban, temperature, top-k, top-p).

    `presence` (slots, V) bool marks the tokens each row has seen (needed when a row has a
    repetition penalty). Returns the m token ids and, when any row asked for them, their logprobs
    under the raw model distribution."""
    if rp.plain_greedy:
        return argmax(logits).tolist(), None
    m = logits.shape[0]
    stop = start + m
    temps = rp.temperature_list[start:stop]
    reps = rp.rep_list[start:stop]
    ngram = [i for i, f in enumerate(rp.ngram_list[start:stop]) if f]
    x = logits
    if any(r != 1.0 for r in reps):
        assert presence is not None  # the engine keeps presence whenever a row has a repetition penalty
        x = apply_repetition_penalty(x, presence[start:stop], rp.rep[start:stop])
    if any(c != 0.0 for c in rp.copy_list[start:stop]):
        x = apply_copy_bias(x, prompt_masks(rows[start:stop], x.shape[-1], x.device), rp.copy[start:stop])
    if ngram:
        x = _ban_ngrams(x, logits, rows, start, ngram)
    nxt = argmax(x)  # greedy rows (the fast path when every row is greedy); same ties as torch.argmax
    sampled = [i for i, t in enumerate(temps) if t > 0]
    if sampled:
        ri = torch.tensor(sampled, device=x.device)
        sel = ri + start
        y = apply_temperature(x[ri], rp.temperature[sel])
        if any(rp.top_k_list[start + i] > 0 for i in sampled):
            y = apply_top_k(y, rp.top_k[sel])
        if any(rp.top_p_list[start + i] < 1.0 for i in sampled):
            y = apply_top_p(y, rp.top_p[sel])
        probs = torch.softmax(y, dim=-1)
        # one uniform per row from the row's own generator: independent of batch mates
        u = torch.cat([torch.rand(1, generator=rows[start + i].generator, device=x.device)
                       for i in sampled])
        nxt[ri] = sample_from_probs(probs, u)
    lps = None
    if any(rp.logprobs_list[start:stop]):
        lps = F.log_softmax(logits, dim=-1).gather(1, nxt[:, None])[:, 0].tolist()
    return nxt.tolist(), lps
