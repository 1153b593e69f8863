"""Beam search for the engine: one group of num_beams rows per request, following transformers'
beam search (transformers.generation.utils._beam_search) step for step.

    from gptcore.engine_beam import BeamGroup
    g = BeamGroup(req, fwd, device, vocab_size, decode=detok, tokens_within=fit)  # prefills the prompt
    while not g.done:
        g.step()
    req.outputs                                        # the n best finished beams, CompletionOutputs

Internal to gptcore.engine (Engine runs each beam-search request as a BeamGroup beside the sampled
rows); HF parity is tested in tests/gptcore/test_generate_hf_parity.py.

Does not: share a KV cache with the sampled rows (a group owns its own num_beams-row cache), stream
partial beams, or sample (beam search here is deterministic, as in HF with do_sample=False).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn import functional as F

from gptcore.engine_forward import Forward
from gptcore.engine_requests import CompletionOutput, Request, find_stop
from gptcore.model import KVCache
from gptcore.sampling import apply_copy_bias, apply_repetition_penalty, no_repeat_ngram_mask, token_presence

__all__ = ["BeamGroup"]


class BeamGroup:
    """Hugging Face beam search (transformers.generation.utils._beam_search), for one prompt.

    Keeps the 2*num_beams best continuations each step; candidates that end (stop token, stop string
    or max_new_tokens) and rank among the first num_beams become finished hypotheses scored
    sum_logprobs / generated_len ** length_penalty; the rest continue. Same early-stopping rules."""

    def __init__(self, req: Request, fwd: Forward, device: torch.device, vocab_size: int, *,
                 decode: Callable[[Sequence[int]], str], tokens_within: Callable[[Sequence[int], int], int]):
        p = req.params
        self.req, self.p = req, p
        self.fwd = fwd
        self.decode, self.tokens_within = decode, tokens_within  # the engine's detokenisation
        self.K = K = p.num_beams
        self.P = P = len(req.prompt_ids)
        self.max_new = M = p.max_new_tokens
        dev = device
        self.V = vocab_size
        self.stop_ids = sorted(req.stop_ids)
        self.beams_to_keep = max(2, 1 + len(self.stop_ids)) * K
        self.prompt = torch.tensor(req.prompt_ids, dtype=torch.long, device=dev)
        # (1, V) bool tokens of the prompt, for copy_bias
        self.prompt_mask = token_presence(self.prompt[None], vocab_size) if p.copy_bias != 0.0 else None
        cache = fwd.new_cache(K, P + M)
        # prefill the prompt once (row 0) and copy its keys/values to the other beams
        row0 = KVCache(k=[t[:1] for t in cache.k], v=[t[:1] for t in cache.v],
                       lengths=torch.zeros(1, dtype=torch.long, device=dev))
        logits = fwd(self.prompt[None], row0)  # (1, V)
        for t in cache.k + cache.v:
            t[1:, :, :P] = t[:1, :, :P]
        cache.lengths = torch.full((K,), P, dtype=torch.long, device=dev)
        self.cache: KVCache | None = cache  # None once finished (or aborted): the memory is freed
        self.logits = logits.expand(K, -1)  # (K, V) every beam starts from the prompt
        self.step_i = 0  # tokens generated so far
        self.running = torch.full((K, M), -1, dtype=torch.long, device=dev)
        self.running_lp = torch.zeros((K, M), dtype=torch.float32, device=dev)
        # only beam 0 is live at first so the K copies do not pick the same tokens
        self.running_scores = torch.zeros(K, dtype=torch.float32, device=dev)
        self.running_scores[1:] = -1e9
        self.fin = torch.full((K, M), -1, dtype=torch.long, device=dev)
        self.fin_lp = torch.zeros((K, M), dtype=torch.float32, device=dev)
        self.fin_scores = torch.full((K,), -1e9, dtype=torch.float32, device=dev)
        self.fin_done = torch.zeros(K, dtype=torch.bool, device=dev)
        self.fin_len = torch.zeros(K, dtype=torch.long, device=dev)
        self.heuristic_unsatisfied = True
        self.top_mask = torch.arange(self.beams_to_keep, device=dev) < K
        self.done = False

    def _stop_string_hits(self, cand: torch.Tensor, n: int) -> torch.Tensor:
        stops = self.p.stop
        hits = []
        for row in cand[:, :n].tolist():
            text = self.decode(row)
            hits.append(any(s in text for s in stops))
        return torch.tensor(hits, dtype=torch.bool, device=cand.device)

    def step(self) -> None:
        K, V, s, p = self.K, self.V, self.step_i, self.p
        if s > 0:
            last = self.running[:, s - 1:s]  # (K, 1)
            assert self.cache is not None  # a finished group is never stepped
            self.logits = self.fwd(last, self.cache)
        logits = self.logits.float()
        log_probs = F.log_softmax(logits, dim=-1)  # (K, V) raw model log-probabilities
        scores = log_probs
        if self.prompt_mask is not None:  # copy_bias, before the n-gram ban as in sampling
            scores = apply_copy_bias(scores, self.prompt_mask.expand(K, -1), p.copy_bias)
        if p.repetition_penalty != 1.0 or p.no_repeat_ngram_size > 0:
            seqs = torch.cat([self.prompt[None].expand(K, -1), self.running[:, :s]], dim=1)  # (K, P+s)
            if p.repetition_penalty != 1.0:
                scores = apply_repetition_penalty(scores, token_presence(seqs, V), p.repetition_penalty)
            if p.no_repeat_ngram_size > 0:
                scores = scores.masked_fill(no_repeat_ngram_mask(seqs, p.no_repeat_ngram_size, V), float("-inf"))
        scores = scores + self.running_scores[:, None]
        flat = scores.reshape(1, K * V)
        topk_scores, topk_idx = torch.topk(flat, k=self.beams_to_keep)  # (1, 2K) across all beams
        topk_scores, topk_idx = topk_scores[0], topk_idx[0]
        origin = topk_idx // V  # which beam each candidate extends
        tok = topk_idx % V
        cand = self.running[origin].clone()  # (2K, M)
        cand[:, s] = tok
        cand_lp = self.running_lp[origin].clone()
        cand_lp[:, s] = log_probs[origin, tok]
        # which candidates end here: stop token, stop string, or the token budget
        hits = torch.zeros_like(tok, dtype=torch.bool)
        for t in self.stop_ids:
            hits |= tok == t
        if p.stop:
            hits |= self._stop_string_hits(cand, s + 1)
        if s + 1 >= self.max_new:
            hits[:] = True
        # e. the best num_beams unfinished candidates keep running
        run_scores = topk_scores + hits.to(torch.float32) * -1.0e9
        nxt = torch.topk(run_scores, k=K).indices
        self.running, self.running_lp = cand[nxt], cand_lp[nxt]
        self.running_scores = run_scores[nxt]
        beam_origin = origin[nxt]
        # f. finished candidates among the top num_beams compete for the K finished slots
        just = hits & self.top_mask
        fin_scores = topk_scores / ((s + 1) ** p.length_penalty)
        full = bool(self.fin_done.all()) and p.early_stopping is True
        fin_scores = fin_scores + float(full) * -1.0e9
        fin_scores = fin_scores + float(not self.heuristic_unsatisfied) * -1.0e9
        fin_scores = fin_scores + (~just).to(torch.float32) * -1.0e9
        merged_scores = torch.cat([self.fin_scores, fin_scores])
        keep = torch.topk(merged_scores, k=K).indices
        self.fin = torch.cat([self.fin, cand])[keep]
        self.fin_lp = torch.cat([self.fin_lp, cand_lp])[keep]
        self.fin_scores = merged_scores[keep]
        self.fin_done = torch.cat([self.fin_done, just])[keep]
        self.fin_len = torch.cat([self.fin_len, torch.full_like(tok, s + 1)])[keep]
        # g. continue from the surviving beams
        assert self.cache is not None
        self.cache.reorder(beam_origin)
        self.step_i = s = s + 1
        lp = p.length_penalty
        best_len = self.max_new if (p.early_stopping == "never" and lp > 0.0) else s
        best_running = self.running_scores[:1] / (best_len ** lp)  # float32, as HF computes it
        worst_fin = torch.where(self.fin_done, self.fin_scores.min(), -1.0e9)
        self.heuristic_unsatisfied = self.heuristic_unsatisfied and bool((best_running > worst_fin).any())
        open_beam = not (bool(self.fin_done.all()) and p.early_stopping is True)
        valid = not bool(hits.all())
        self.done = not (self.heuristic_unsatisfied and open_beam and valid)
        if self.done:
            self._finish()

    def _finish(self) -> None:
        req, p = self.req, self.p
        outs = []
        for rank in range(p.n):
            n = int(self.fin_len[rank]) if bool(self.fin_done[rank]) else 0
            ids = self.fin[rank, :n].tolist()
            lps = self.fin_lp[rank, :n].tolist()
            reason = "length"
            if ids and ids[-1] in req.stop_ids:
                ids, lps, reason = ids[:-1], lps[:-1], "stop"
            text = self.decode(ids)
            if p.stop:
                cut = find_stop(text, p.stop, 0)
                if cut is not None:
                    text, reason = text[:cut], "stop"
                    keep = self.tokens_within(ids, cut)
                    ids, lps = ids[:keep], lps[:keep]
            outs.append(CompletionOutput(index=rank, text=text, token_ids=ids, finish_reason=reason,
                                         logprobs=lps if p.logprobs else None,
                                         cumulative_logprob=float(self.fin_scores[rank])))
        req.outputs = outs
        self.cache = None  # free the memory now
