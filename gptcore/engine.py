"""The generation engine: batched prefill + KV-cache decode with per-row sampling, beam search, and a
step-level API for continuous batching.

    from gptcore.engine import Engine
    from gptcore.sampling import SamplingParams
    engine = Engine(model, tokenizer)                       # or Engine.from_checkpoint("ckpt/")
    outs = engine.generate(["Once upon a time"], SamplingParams(max_new_tokens=32, temperature=0))
    print(outs[0].outputs[0].text)

    engine.add_request("r1", "Hello", SamplingParams(max_new_tokens=8))   # serving: continuous batching
    while engine.has_unfinished():
        for out in engine.step(): print(out.request_id, out.new_text, out.finished)

Tests: `python -m pytest tests/gptcore/test_engine.py tests/gptcore/test_generate_hf_parity.py -q`;
speed: `python bench/generate.py`.

How it works. Decode rows live in "slots" of one pre-allocated KV cache (`gptcore.model.KVCache`, one
length per row); running rows always occupy slots [0, n) so a decode step is one forward of n rows.
`step()` advances every running row by one token and admits waiting requests into free slots (a
batched prefill of their right-padded prompts, written straight into those slots; n > 1 samples
copy the prompt's keys with `KVCache.copy_rows_from`; the prefill gives their first token). When
rows are running, the decode step and the prefill of the joining requests share ONE forward
(`Forward.mixed`): a request joining a running batch costs its prompt's tokens, not a second
forward pass. Then it samples each row with its own parameters (vectorised; all-greedy batches take
a plain argmax), and retires finished rows, moving the last rows into the freed slots. Each sampling
row draws from its own torch.Generator (seeded from the request's seed, or from torch's global RNG
when seed is None), so a seeded request's output does not depend on its batch mates. Beam-search
requests run as separate groups (num_beams rows each) that follow transformers' beam search step for
step. `generate()` is a loop over `step()`. One Engine is not thread-safe: drive it from one thread.

Where things live. This module holds the public Engine: requests, slots and the scheduler (admit,
decode / mixed step, accept, retire, streaming deltas). The inference forward and its oneDNN packed
fast path are in gptcore.engine_forward, per-row sampling in gptcore.engine_rows, beam groups in
gptcore.engine_beam, and the output types, request bookkeeping and validation in
gptcore.engine_requests (the public names are re-exported here).

Speed: the inference forward (`Forward`) is GPT.forward's maths with less overhead (one attention
mask per step, no mask at all for an equal-length decode step, strided KV writes when rows are
equally long). On x86 CPUs with AVX2 decode matmuls run on a hand-written streaming kernel
(gptcore.gemv: a decode step is bound by reading the weights), else on oneDNN pre-packed weights,
~3x faster than the default fp32 GEMM for skinny matmuls (see gptcore.engine_forward).
kernel="model" runs `GPT.forward` itself (the reference the tests compare against).

Context rule: a request needs prompt_tokens + max_new_tokens <= block_size; otherwise
`PromptTooLongError`, or with truncate="left" the prompt keeps its last block_size - max_new_tokens
tokens. Output conventions (OpenAI-style): `token_ids`/`text` never include the EOS token, a stop
token id or a stop string; text ends right before the first stop string; token_ids keep the tokens
whose text lies wholly before it (so decode(token_ids) == text unless the stop string begins inside
a token).

Does not: tokenize for you beyond calling `tokenizer.encode/decode`, shard across devices, page the
KV cache, or speculate. The engine snapshots the weights when built: rebuild it after changing them.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import torch

from gptcore.engine_beam import BeamGroup
from gptcore.engine_forward import Forward
from gptcore.engine_forward import PackedLinear as _Linear  # noqa: F401  (its old home: tests patch _Linear.BIG)
from gptcore.engine_requests import (
    CompletionOutput,
    EngineError,
    PromptTooLongError,
    Request,
    RequestOutput,
    Seq,
    StepOutput,
    find_stop,
    prepare_request,
    seed_for,
    stop_prefix_len,
)
from gptcore.engine_rows import RowParams, choose_tokens
from gptcore.model import GPT, KVCache
from gptcore.sampling import SamplingParams

__all__ = ["Engine", "EngineError", "PromptTooLongError", "RequestOutput", "CompletionOutput", "StepOutput"]


class Engine:
    """Generation over a GPT with per-request SamplingParams; see the module docstring."""

    def __init__(self, model: GPT, tokenizer: Any = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, max_batch_size: int = 32, *,
                 eos_id: int | None = None, kernel: str = "auto"):
        if not (isinstance(max_batch_size, int) and max_batch_size >= 1):
            raise EngineError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        self.config = model.config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", None)
        with torch.inference_mode():
            self._fwd = Forward(model, self.device, dtype, kernel)
        self.kernel = self._fwd.kernel
        self._waiting: deque[Request] = deque()
        self._requests: dict[str, Request] = {}
        self._rows: list[Seq] = []  # running rows; row i lives in cache slot i
        # the slot cache starts empty (0 slots x 0 positions); _ensure_capacity grows it on demand
        self._cache: KVCache = self._fwd.new_cache(0, 0)
        self._presence: torch.Tensor | None = None  # (slots, V) bool, for repetition penalty
        self._last = torch.zeros(0, dtype=torch.long, device=self.device)  # (slots,) long: each row's next input
        self._row_params: RowParams | None = None  # per-row parameter tensors (rebuilt on change)
        self._beams: list[BeamGroup] = []
        self._ids = itertools.count()
        # what the last step() advanced: sequences (beam search: every beam) and distinct requests
        self.last_step_rows = 0
        self.last_step_requests = 0

    @classmethod
    def from_checkpoint(cls, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        **kwargs: Any) -> Engine:
        from gptcore.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path, device=device)
        return cls(ckpt.model, ckpt.tokenizer, device=device, dtype=dtype, **kwargs)

    # ---- text helpers ----------------------------------------------------------------------------

    def _decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None or not ids:
            return ""
        text: str = self.tokenizer.decode(list(ids))
        return text

    def _tokens_within(self, ids: Sequence[int], nchars: int) -> int:
        """Largest i such that decode(ids[:i]) fits in the first `nchars` characters."""
        i = len(ids)
        while i > 0 and len(self._decode(ids[:i])) > nchars:
            i -= 1
        return i

    def _seq_text(self, seq: Seq) -> str:
        """Decoded text of seq.tokens, incrementally (only the tokens since the last char boundary)."""
        tail = self._decode(seq.tokens[seq.stable_n:])
        text = seq.stable_text + tail
        if not tail.endswith("\ufffd"):  # no incomplete UTF-8 sequence pending: this prefix is final
            seq.stable_n, seq.stable_text = len(seq.tokens), text
        return text

    # ---- requests --------------------------------------------------------------------------------

    def _prepare(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None,
                 stream: bool, deltas: bool = True) -> Request:
        return prepare_request(request_id, prompt, params, stream, deltas, config=self.config,
                               tokenizer=self.tokenizer, eos_id=self.eos_id, max_batch_size=self.max_batch_size)

    def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    *, deltas: bool = True) -> None:
        """Queue a request; it is prefilled and joins the running batch at the next `step()`.

        deltas=True: every step() reports the request's new tokens (streaming); deltas=False: step()
        reports each completion once, whole, when it finishes (a non-streaming server request: no
        per-token detokenisation and bookkeeping while it runs)."""
        if request_id in self._requests:
            raise EngineError(f"request_id {request_id!r} is already in flight; use a unique id per request")
        req = self._prepare(request_id, prompt, params, stream=True, deltas=deltas)
        self._requests[request_id] = req
        self._waiting.append(req)

    @torch.inference_mode()
    def abort(self, request_id: str) -> bool:
        """Drop a request (waiting or running) and free its slots. Returns whether it was found."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        if req in self._waiting:
            self._waiting.remove(req)
        beam = next((g for g in self._beams if g.req is req), None)
        if beam is not None:
            self._beams.remove(beam)
            beam.cache = None
        gone = [i for i, s in enumerate(self._rows) if s.req is req]
        if gone:
            self._retire(gone)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._rows or self._beams)

    def request_ids(self) -> list[str]:
        """Requests added and not yet reported finished (waiting or running)."""
        return list(self._requests)

    # ---- slots -----------------------------------------------------------------------------------

    def _ensure_capacity(self, rows: int, length: int) -> None:
        """Grow the slot cache to at least `rows` slots of `length` positions (copying live rows)."""
        cache = self._cache
        if cache.batch_size >= rows and cache.max_len >= length:
            return
        cur_rows, cur_len = cache.batch_size, cache.max_len  # 0, 0 before the first request
        # grow geometrically so a stream of arriving requests reallocates O(log) times, not per request
        new_rows = min(self.max_batch_size, max(rows, 2 * cur_rows))
        new_len = min(self.config.block_size, max(-(-length // 64) * 64, 2 * cur_len if length > cur_len else cur_len))
        new = self._fwd.new_cache(new_rows, new_len)
        last = torch.zeros(new_rows, dtype=torch.long, device=self.device)
        n = len(self._rows)
        if n:
            t = int(cache.lengths[:n].max())
            for a, b in zip(new.k + new.v, cache.k + cache.v):
                a[:n, :, :t] = b[:n, :, :t]
            new.lengths[:n] = cache.lengths[:n]
            last[:n] = self._last[:n]
        if self._presence is not None:
            pres = torch.zeros(new_rows, self.config.vocab_size, dtype=torch.bool, device=self.device)
            pres[:n] = self._presence[:n]
            self._presence = pres
        self._cache, self._last = new, last

    def _view(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) of the slot cache as a KVCache whose writes land in the slot cache."""
        c = self._cache
        return KVCache(k=[t[start:stop] for t in c.k], v=[t[start:stop] for t in c.v],
                       lengths=c.lengths[start:stop].clone())

    def _retire(self, rows: list[int]) -> None:
        """Free finished rows, keeping running rows packed in slots [0, n)."""
        gone = set(rows)
        n = len(self._rows)
        keep_n = n - len(gone)
        holes = sorted(i for i in gone if i < keep_n)
        movers = [i for i in range(keep_n, n) if i not in gone]
        if holes:
            c = self._cache
            dst = torch.tensor(holes, device=self.device)
            src = torch.tensor(movers, device=self.device)
            t = int(c.lengths[src].max())
            for tensor in c.k + c.v:
                tensor[dst, :, :t] = tensor[src, :, :t]
            c.lengths[dst] = c.lengths[src]
            self._last[dst] = self._last[src]
            if self._presence is not None:
                self._presence[dst] = self._presence[src]
            for h, m in zip(holes, movers):
                self._rows[h] = self._rows[m]
        del self._rows[keep_n:]
        self._cache.lengths[keep_n:] = 0
        self._row_params = None

    def _params_tensors(self) -> RowParams:
        """Per-row sampling parameters (lists and tensors), rebuilt only when the set of rows changes."""
        if self._row_params is None:
            self._row_params = RowParams.of(self._rows, self.device)
        return self._row_params

    def _choose(self, logits: torch.Tensor, start: int = 0) -> tuple[list[int], list[float] | None]:
        """Next token of running rows [start, start + len(logits)) from their (m, V) logits, each with
        its own parameters (gptcore.engine_rows.choose_tokens)."""
        return choose_tokens(logits, self._params_tensors(), self._rows, self._presence, start)

    # ---- stepping --------------------------------------------------------------------------------

    def _admissible(self) -> list[Request]:
        """Take the waiting requests that fit into free slots (beam-search ones start their groups)."""
        used = len(self._rows) + sum(g.K for g in self._beams)
        batch: list[Request] = []
        while self._waiting and used + self._waiting[0].rows_needed <= self.max_batch_size:
            req = self._waiting.popleft()
            used += req.rows_needed
            if req.params.use_beam_search:
                self._beams.append(BeamGroup(req, self._fwd, self.device, self.config.vocab_size,
                                             decode=self._decode, tokens_within=self._tokens_within))
            else:
                batch.append(req)
        return batch

    def _prefill_inputs(self, batch: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for `batch` after the running rows; its right-padded prompts (B, T) and lengths (B,)."""
        need_rows = len(self._rows) + sum(r.params.n for r in batch)
        need_len = max(len(r.prompt_ids) + r.params.max_new_tokens for r in batch)
        self._ensure_capacity(need_rows, need_len)
        lens = [len(r.prompt_ids) for r in batch]
        idx = torch.zeros(len(batch), max(lens), dtype=torch.long)
        for i, r in enumerate(batch):
            idx[i, :lens[i]] = torch.tensor(r.prompt_ids)
        return idx.to(self.device), torch.tensor(lens, device=self.device)

    def _admit(self) -> list[tuple[Seq, float | None, int]]:
        """Prefill waiting requests into free slots; returns (row, logprob, token) of their first token."""
        batch = self._admissible()
        if not batch:
            return []
        n0, B = len(self._rows), len(batch)
        idx, adv = self._prefill_inputs(batch)
        # one right-padded prefill for all new prompts, written into slots [n0, n0 + B)
        view = self._view(n0, n0 + B)
        view.lengths.zero_()
        logits = self._fwd(idx, view, advance=adv, logits_at=adv - 1)  # (B, V)
        self._cache.lengths[n0:n0 + B] = view.lengths
        return self._add_rows(batch, logits)

    def _add_rows(self, batch: list[Request], logits: torch.Tensor) -> list[tuple[Seq, float | None, int]]:
        """Make rows of freshly prefilled requests (slots [n0, n0 + B), their logits (B, V)) and sample
        their first token."""
        n0, B = len(self._rows), len(batch)
        # lay out rows: request i's first completion in slot n0 + i, extra samples (n > 1) after
        seqs, src_rows = [], []
        for i, r in enumerate(batch):
            seed = r.params.seed
            if seed is None and r.params.temperature > 0:  # unseeded: follow torch's global RNG
                seed = int(torch.randint(0, 2 ** 62, (1,)))
            for j in range(r.params.n):
                g = None
                if r.params.temperature > 0:
                    g = torch.Generator(device=self.device)
                    assert seed is not None  # drawn above for every sampling request
                    g.manual_seed(seed_for(seed, j))
                seq = Seq(r, j, g)
                r.seqs.append(seq)
                seqs.append(seq)
                src_rows.append(i)
        first = [s for s in seqs if s.index == 0]
        extra = [(s, i) for s, i in zip(seqs, src_rows) if s.index > 0]
        self._rows.extend(first)
        if extra:
            dst = torch.arange(len(self._rows), len(self._rows) + len(extra), device=self.device)
            src = torch.tensor([n0 + i for _, i in extra], device=self.device)
            self._cache.copy_rows_from(self._cache, dst, src)
            self._rows.extend(s for s, _ in extra)
        row_logits = logits[torch.tensor(list(range(B)) + [i for _, i in extra], device=self.device)]
        if any(r.params.repetition_penalty != 1.0 for r in batch) or self._presence is not None:
            if self._presence is None:
                self._presence = torch.zeros(self._cache.batch_size, self.config.vocab_size, dtype=torch.bool,
                                             device=self.device)
            presence = self._presence
            for k, s in enumerate(self._rows[n0:]):
                presence[n0 + k] = False
                presence[n0 + k, torch.tensor(s.req.prompt_ids, device=self.device)] = True
        self._row_params = None
        # sample the first token of the new rows with the ordinary per-row machinery
        toks, lps = self._choose(row_logits, start=n0)
        return [(self._rows[n0 + k], None if lps is None else lps[k], toks[k]) for k in range(len(toks))]

    def _decode_step(self) -> list[tuple[Seq, float | None, int]]:
        n = len(self._rows)
        if n == self._cache.batch_size:  # every slot is running: no view needed
            logits = self._fwd(self._last[:, None], self._cache)  # (n, V)
        else:
            view = self._view(0, n)
            logits = self._fwd(self._last[:n, None], view)  # (n, V)
            self._cache.lengths[:n] = view.lengths
        toks, lps = self._choose(logits)
        return [(self._rows[i], None if lps is None else lps[i], toks[i]) for i in range(n)]

    def _mixed_step(self) -> list[tuple[Seq, float | None, int]]:
        """Decode step of the running rows and prefill of the requests that join, in one forward."""
        batch = self._admissible()
        if not batch:
            return self._decode_step()
        n = len(self._rows)
        idx, lens = self._prefill_inputs(batch)  # may grow the cache: do it before the forward
        logits = self._fwd.mixed(self._last[:n], idx, lens, self._cache)  # (n + B, V)
        toks, lps = self._choose(logits[:n])  # the running rows, with their own parameters
        picks = [(self._rows[i], None if lps is None else lps[i], toks[i]) for i in range(n)]
        return picks + self._add_rows(batch, logits[n:])

    def _accept(self, picks: list[tuple[Seq, float | None, int]], stream_out: list[StepOutput]) -> None:
        """Append each row's new token, apply stop rules, emit streaming deltas, retire finished rows.

        picks[i] belongs to the row in slot i (decode rows first, then the rows admitted this step)."""
        finished_rows = []
        for slot, (seq, lp, tok) in enumerate(picks):
            p, req = seq.params, seq.req
            seq.n_sampled += 1
            if seq.n_sampled == 1:
                seq.first_token_time = time.perf_counter()
            if tok in req.stop_ids:
                seq.finished, seq.finish_reason = True, "stop"
            else:
                seq.tokens.append(tok)
                if seq.logprobs is not None:
                    assert lp is not None  # _choose returns logprobs whenever a row asked for them
                    seq.logprobs.append(lp)
                if seq.ngram is not None:
                    seq.ngram.append(tok)
                if p.stop:
                    text = self._seq_text(seq)
                    cut = find_stop(text, p.stop, max(0, seq.checked_chars - req.max_stop_len + 1))
                    if cut is not None:
                        seq.finished, seq.finish_reason = True, "stop"
                        seq.text = text[:cut]
                        keep = self._tokens_within(seq.tokens, cut)
                        del seq.tokens[keep:]
                        if seq.logprobs is not None:
                            del seq.logprobs[keep:]
                    else:
                        seq.checked_chars = len(text)
                if not seq.finished and seq.n_sampled >= p.max_new_tokens:
                    seq.finished, seq.finish_reason = True, "length"
            if seq.finished:
                if seq.text is None:
                    seq.text = self._decode(seq.tokens)
                finished_rows.append(slot)
            if req.stream and (req.deltas or seq.finished):
                stream_out.append(self._delta(seq))
        if picks:
            new = torch.tensor([tok for _, _, tok in picks], dtype=torch.long)
            # the next input of every row (finished rows are retired below; their value is unused)
            self._last[:len(picks)] = new.to(self.device)
            if self._presence is not None:  # repetition penalty: the new token now counts as seen
                self._presence[torch.arange(len(picks), device=self.device), new.to(self.device)] = True
        if finished_rows:
            self._retire(finished_rows)

    def _delta(self, seq: Seq) -> StepOutput:
        """Streaming output of one row: text/tokens not yet sent, holding back a possible stop-string
        start and incomplete UTF-8 until they resolve."""
        if seq.finished:
            assert seq.text is not None  # _accept sets the final text when a row finishes
            text, n_tok = seq.text, len(seq.tokens)
        else:
            text = self._seq_text(seq) if self.tokenizer is not None else ""
            safe = len(text)
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
            if seq.params.stop:
                safe = min(safe, len(text) - stop_prefix_len(text, seq.params.stop))
            n_tok = len(seq.tokens) if safe == len(text) else self._tokens_within(seq.tokens, safe)
            text = text[:safe]
        new_text = text[seq.sent_chars:] if len(text) >= seq.sent_chars else ""
        new_ids = seq.tokens[seq.sent_tokens:n_tok]
        new_lps = seq.logprobs[seq.sent_tokens:n_tok] if seq.logprobs is not None else None
        seq.sent_chars, seq.sent_tokens = max(seq.sent_chars, len(text)), max(seq.sent_tokens, n_tok)
        out = StepOutput(request_id=seq.req.request_id, index=seq.index, new_token_ids=new_ids,
                         new_text=new_text, finished=seq.finished, finish_reason=seq.finish_reason,
                         new_logprobs=new_lps, first_token_time=seq.first_token_time)
        if seq.finished:
            out.output = self._completion(seq)
            self._maybe_forget(seq.req)
        return out

    def _completion(self, seq: Seq) -> CompletionOutput:
        return CompletionOutput(index=seq.index, text=seq.text if seq.text is not None else "",
                                token_ids=list(seq.tokens), finish_reason=seq.finish_reason or "length",
                                logprobs=list(seq.logprobs) if seq.logprobs is not None else None)

    def _maybe_forget(self, req: Request) -> None:
        if req.finished() and req.stream:
            self._requests.pop(req.request_id, None)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Admit waiting requests, advance every running row by one token; return streaming deltas
        (only for requests added with add_request; beam-search requests report once, when done)."""
        out: list[StepOutput] = []
        # rows already running take their decode step first; then waiting requests are prefilled
        # into free slots (their first token comes from the prefill) and join from the next step
        if self._rows and self._waiting and self._fwd.model is None:
            picks = self._mixed_step()
        else:
            picks = self._decode_step() if self._rows else []
            picks += self._admit()
        self._accept(picks, out)
        self.last_step_rows = len(picks) + sum(g.K for g in self._beams)
        self.last_step_requests = len({seq.req.request_id for seq, _, _ in picks}) + len(self._beams)
        for g in list(self._beams):
            g.step()
            if g.done:
                self._beams.remove(g)
                req = g.req
                if req.stream:
                    assert req.outputs is not None  # a done group has written its outputs
                    for c in req.outputs:
                        out.append(StepOutput(request_id=req.request_id, index=c.index, new_token_ids=c.token_ids,
                                              new_text=c.text, finished=True, finish_reason=c.finish_reason,
                                              new_logprobs=c.logprobs, output=c))
                    self._maybe_forget(req)
        return out

    # ---- one-shot generation ---------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete every prompt (text or token ids); one RequestOutput per prompt, in order."""
        items = _prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            plist = [params] * len(items)
        else:
            plist = list(params)
            if len(plist) != len(items):
                raise EngineError(f"got {len(plist)} SamplingParams for {len(items)} prompts; pass one "
                                  f"SamplingParams for all or exactly one per prompt")
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine but step-API requests are in flight; finish "
                               "them (step() until has_unfinished() is False) or abort() them first")
        tag = next(self._ids)
        reqs = [self._prepare(f"generate-{tag}-{i}", p, sp, stream=False)
                for i, (p, sp) in enumerate(zip(items, plist))]
        self._waiting.extend(reqs)
        try:
            while self.has_unfinished():
                self.step()
        except BaseException:
            for r in reqs:  # leave the engine idle and reusable
                self._requests[r.request_id] = r
                self.abort(r.request_id)
            raise
        results = []
        for r in reqs:
            if r.params.use_beam_search:
                assert r.outputs is not None  # every request finished: its beam group wrote them
                outs = r.outputs
            else:
                outs = [self._completion(s) for s in r.seqs]
            results.append(RequestOutput(prompt=r.prompt, prompt_token_ids=list(r.prompt_ids), outputs=outs,
                                         request_id=r.request_id))
        return results


def _prompt_list(prompts: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]]) -> list[str | Sequence[int]]:
    """generate()'s prompts as a list: a single prompt (text, or a list of token ids) becomes a list of one."""
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                    and all(isinstance(t, int) for t in prompts)):
        return [cast("str | Sequence[int]", prompts)]  # one prompt
    return list(cast("Sequence[str | Sequence[int]]", prompts))
