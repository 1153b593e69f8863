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
(`_Forward.mixed`): a request joining a running batch costs its prompt's tokens, not a second
forward pass. Then it samples each row with its own parameters (vectorised; all-greedy batches take
a plain argmax), and retires finished rows, moving the last rows into the freed slots. Each sampling row draws from its own
torch.Generator (seeded from the request's seed, or from torch's global RNG when seed is None), so
a seeded request's output does not depend on its batch mates. Beam-search requests run as separate
groups (num_beams rows each) that follow transformers' beam search step for step. `generate()` is
a loop over `step()`. One Engine is not thread-safe: drive it from one thread.

Speed: the inference forward (`_Forward`) is GPT.forward's maths with less overhead (one attention
mask per step, no mask at all for an equal-length decode step, strided KV writes when rows are
equally long). On x86 CPUs large Linear weights are pre-packed once for oneDNN
(torch.ops.mkldnn._linear_pointwise, the kernel torch.compile's CPU "freezing" uses), ~3x faster
than the default fp32 GEMM for skinny decode matmuls and equal to nn.Linear up to fp32 rounding
(checked at start-up, otherwise nn.Linear is used). In bf16 the weights are bf16 but keys, values
and attention stay fp32 (CPU bf16 attention is slower and less accurate). kernel="model" runs
`GPT.forward` itself (the reference the tests compare against).

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

from gptcore.errors import GPTError

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.nn import functional as F

from gptcore.model import GPT, KVCache
from gptcore.sampling import (
    NGramIndex,
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    argmax,
    no_repeat_ngram_mask,
    sample_from_probs,
    token_presence,
)

__all__ = ["Engine", "PromptTooLongError", "RequestOutput", "CompletionOutput", "StepOutput"]


class PromptTooLongError(GPTError):
    """The prompt plus max_new_tokens does not fit the model's context (block_size)."""


@dataclass
class CompletionOutput:
    index: int  # which of the request's n completions (beam rank for beam search)
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token id, stop string) | "length" (max_new_tokens)
    logprobs: list[float] | None = None  # per token of token_ids, under the raw model distribution
    cumulative_logprob: float | None = None  # beam search: the beam's score (length-penalised)


@dataclass
class RequestOutput:
    prompt: str | None  # the prompt text (None when given as token ids)
    prompt_token_ids: list[int]  # after truncation, what the model actually saw
    outputs: list[CompletionOutput]
    request_id: str | None = None


@dataclass
class StepOutput:
    """What one `step()` produced for one completion of a request (streaming deltas)."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None  # set when finished
    new_logprobs: list[float] | None = None
    output: CompletionOutput | None = None  # the whole completion, when finished
    first_token_time: float | None = None  # time.perf_counter() when its first token was sampled


# ---- the forward pass used for inference -----------------------------------------------------------


def _onednn_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except Exception:  # pragma: no cover - exotic builds
        return False


# resolved once: looking the op up through torch.ops on every call costs microseconds per matmul
_LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise.default if _onednn_available() else None


class _Linear:
    """y = x W^T + b, optionally fused with tanh-GELU, on oneDNN pre-packed weights when that pays.

    oneDNN's packed GEMM is ~3x faster than the default fp32 GEMM for skinny decode matmuls, but has
    a fixed per-call cost of tens of microseconds, so tiny matmuls (rows x in x out < 2^20
    multiply-adds, weights < 2^20 elements) keep nn.functional.linear."""

    __slots__ = ("w", "b", "packed", "small", "approximate")

    BIG = 1 << 20

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool, approximate: str = "tanh"):
        self.b = bias
        self.approximate = approximate  # of the fused GELU: "tanh" (GPT-2) or "none" (exact)
        self.small = weight.numel() < self.BIG
        # the batch-size hint only picks the packed layout; any number of rows works afterwards
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16) if packed else None
        self.w = weight if (self.packed is None or self.small) else None  # big weights: packed copy only

    def __call__(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:  # x: (N, in)
        if self.packed is not None and (self.w is None or x.shape[0] * self.w.numel() >= self.BIG):
            if gelu:
                return _LINEAR_POINTWISE(x, self.packed, self.b, "gelu", [], self.approximate)
            return _LINEAR_POINTWISE(x, self.packed, self.b, "none", [], "")
        y = torch._C._nn.linear(x, self.w, self.b)
        return torch._C._nn.gelu(y, approximate=self.approximate) if gelu else y


class _Forward:
    """Inference forward over a KVCache: same maths as GPT.forward(cache=...), fewer overheads.

    kernel: "onednn" (packed weights, CPU), "torch" (nn.functional.linear) or "model" (call
    GPT.forward itself; the reference the others are tested against)."""

    def __init__(self, model: GPT, device: torch.device, dtype: torch.dtype, kernel: str):
        self.config = cfg = model.config
        self.device, self.dtype = device, dtype
        # bf16 on CPU: keys/values (and attention) stay fp32; the CPU bf16 SDPA kernel is ~5x slower
        # than fp32 for one-token queries, and fp32 attention is also the more accurate choice
        self.cache_dtype = torch.float32 if (device.type == "cpu" and dtype == torch.bfloat16) else dtype
        if kernel == "auto":
            kernel = "onednn" if (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
                                  and _onednn_available()) else "torch"
        if kernel not in ("onednn", "torch", "model"):
            raise ValueError(f"kernel must be 'auto', 'onednn', 'torch' or 'model', got {kernel!r}")
        self.model = None
        if kernel == "model":
            p = next(model.parameters())
            if p.dtype != dtype or p.device != device or model.training:
                import copy
                model = copy.deepcopy(model).to(device=device, dtype=dtype)
            self.model = model.eval()
        else:
            def t(x: torch.Tensor | None) -> torch.Tensor | None:
                return None if x is None else x.detach().to(device=device, dtype=dtype).contiguous()

            packed = kernel == "onednn"
            tr = model.transformer
            self.wte, self.wpe = t(tr.wte.weight), t(tr.wpe.weight)
            self.layers = []
            for blk in tr.h:
                self.layers.append((
                    t(blk.ln_1.weight), t(blk.ln_1.bias),
                    _Linear(t(blk.attn.c_attn.weight), t(blk.attn.c_attn.bias), packed),
                    _Linear(t(blk.attn.c_proj.weight), t(blk.attn.c_proj.bias), packed),
                    t(blk.ln_2.weight), t(blk.ln_2.bias),
                    _Linear(t(blk.mlp.c_fc.weight), t(blk.mlp.c_fc.bias), packed, cfg.gelu_approximate),
                    _Linear(t(blk.mlp.c_proj.weight), t(blk.mlp.c_proj.bias), packed),
                ))
            self.ln_f = (t(tr.ln_f.weight), t(tr.ln_f.bias))
            self.lm_head = _Linear(t(model.lm_head.weight), None, packed)
            if packed and not self._probe(model):
                kernel = "torch"
                self.__init__(model, device, dtype, "torch")
                return
        self.kernel = kernel

    def _probe(self, model: GPT) -> bool:
        """Check the packed kernel against nn.Linear once (exotic CPUs/builds fall back to torch)."""
        try:
            lin = model.transformer.h[0].mlp.c_fc
            x = torch.randn(3, lin.in_features, dtype=self.dtype, device=self.device)
            ref = F.gelu(F.linear(x, lin.weight.to(self.dtype), None if lin.bias is None else lin.bias.to(self.dtype)),
                         approximate=self.config.gelu_approximate)
            fc = self.layers[0][6]
            got = torch.ops.mkldnn._linear_pointwise(x, fc.packed, fc.b, "gelu", [], fc.approximate)
            tol = 1e-4 if self.dtype == torch.float32 else 5e-2
            return bool(torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol))
        except Exception:
            return False

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        cfg = self.config
        shape = (batch_size, cfg.n_head, max_len, cfg.head_size)
        dt = self.dtype if self.model is not None else self.cache_dtype
        return KVCache(k=[torch.zeros(shape, dtype=dt, device=self.device) for _ in range(cfg.n_layer)],
                       v=[torch.zeros(shape, dtype=dt, device=self.device) for _ in range(cfg.n_layer)],
                       lengths=torch.zeros(batch_size, dtype=torch.long, device=self.device))

    def __call__(self, idx: torch.Tensor, cache: KVCache, advance: torch.Tensor | None = None,
                 logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) right-padded; appends each row at its own length; returns (B, V) fp32 logits at
        `logits_at` (default: the last position)."""
        B, T = idx.shape
        if self.model is not None:
            if logits_at is None:
                logits, _ = self.model(idx, cache=cache, advance=advance, last_only=True)
            else:
                logits, _ = self.model(idx, cache=cache, advance=advance, logits_at=logits_at)
            return logits[:, 0].float()
        cfg = self.config
        C, nh = cfg.n_embd, cfg.n_head
        hs = C // nh
        start = cache.lengths  # (B,)
        ar = torch.arange(T, device=idx.device)
        pos = start[:, None] + ar[None, :]  # (B, T)
        lo, hi = torch.stack(torch.aminmax(start)).tolist() if B > 1 else (int(start[0]),) * 2
        t_used = hi + T  # attend over the used prefix of the cache only
        if t_used > cache.max_len:
            raise ValueError(f"sequence of {t_used} tokens exceeds the cache length {cache.max_len}")
        adt = self.cache_dtype
        if T == 1 and lo == hi:
            attn_mask = None  # one new token per row, all rows equally long: every cached key is visible
        else:
            keys = torch.arange(t_used, device=idx.device)
            visible = keys[None, None, None, :] <= pos[:, None, :, None]  # (B, 1, T, T_used) causal + row length
            # one additive mask for all layers (SDPA would convert a bool mask in every layer)
            attn_mask = torch.zeros(visible.shape, dtype=adt, device=idx.device).masked_fill_(~visible, float("-inf"))
        x = F.embedding(idx, self.wte) + F.embedding(pos.clamp(max=cfg.block_size - 1), self.wpe)  # (B, T, C)
        x = x.view(B * T, C)
        if lo != hi:
            scatter_idx = pos[:, None, :, None].expand(B, nh, T, hs)  # (B, nh, T, hs)
        eps = cfg.layer_norm_epsilon
        upcast = adt != self.dtype
        layer_norm, sdpa = torch.layer_norm, F.scaled_dot_product_attention
        decode = T == 1 and lo == hi  # the hot path: one token per row, all rows equally long
        for layer, (w1, b1, attn, proj, w2, b2, fc, fc2) in enumerate(self.layers):
            h = layer_norm(x, (C,), w1, b1, eps)
            kc, vc = cache.k[layer], cache.v[layer]
            if decode:  # fewer tensor ops: with T == 1 no transposes are needed
                qkv = attn(h)  # (B, 3C)
                q = qkv[:, :C].view(B, nh, 1, hs)
                kc[:, :, lo] = qkv[:, C:2 * C].view(B, nh, hs)
                vc[:, :, lo] = qkv[:, 2 * C:].view(B, nh, hs)
            else:
                qkv = attn(h).view(B, T, 3, nh, hs)
                q = qkv[:, :, 0].transpose(1, 2)  # (B, nh, T, hs)
                if lo == hi:  # all rows at the same length (static batch): a plain strided copy
                    kc[:, :, lo:lo + T] = qkv[:, :, 1].transpose(1, 2)
                    vc[:, :, lo:lo + T] = qkv[:, :, 2].transpose(1, 2)
                else:  # ragged rows: each row's keys go at its own offset
                    kc.scatter_(2, scatter_idx, qkv[:, :, 1].transpose(1, 2).to(adt))
                    vc.scatter_(2, scatter_idx, qkv[:, :, 2].transpose(1, 2).to(adt))
            if upcast:
                q = q.to(adt)
            y = sdpa(q, kc[:, :, :t_used], vc[:, :, :t_used], attn_mask=attn_mask)  # (B, nh, T, hs)
            y = y.reshape(B, C) if decode else y.transpose(1, 2).reshape(B * T, C)
            x = x + proj(y.to(self.dtype) if upcast else y)
            h = layer_norm(x, (C,), w2, b2, eps)
            x = x + fc2(fc(h, gelu=True))
        cache.lengths = cache.lengths + (advance if advance is not None else T)
        if T > 1 or logits_at is not None:
            at = logits_at if logits_at is not None else torch.full((B,), T - 1, device=idx.device)
            x = x.view(B, T, C)[torch.arange(B, device=idx.device), at]  # (B, C)
        x = layer_norm(x, (C,), self.ln_f[0], self.ln_f[1], eps)
        return self.lm_head(x).float()  # (B, V)

    def mixed(self, last: torch.Tensor, idx: torch.Tensor, lens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Decode rows [0, n) of `cache` by one token (`last` (n,)) and prefill new rows [n, n + B) from
        empty (right-padded prompts `idx` (B, T) of lengths `lens` (B,)) in ONE forward; returns
        (n + B, V) fp32 logits: each running row's next token, then each new row's first.

        Why: under continuous batching requests join a running batch one by one, and a separate
        prefill forward per join costs as much as a decode step for a small model (the cost is per
        op, not per token). Here the per-token work (embeddings, LayerNorms, matmuls, lm_head) runs
        once over the decode tokens and the prompt tokens together; only attention is done twice
        (decode queries against each row's cache, prompts causally among themselves). Same maths,
        same masks and kernels as two `__call__`s; outputs agree up to matmul rounding."""
        if self.model is not None:
            raise RuntimeError("mixed() needs the engine's own forward (kernel 'onednn' or 'torch')")
        cfg = self.config
        C, nh = cfg.n_embd, cfg.n_head
        hs = C // nh
        n, (B, T) = last.shape[0], idx.shape
        dev = idx.device
        start = cache.lengths[:n]  # (n,) each running row writes its token here
        lo, hi = torch.stack(torch.aminmax(start)).tolist() if n > 1 else (int(start[0]),) * 2
        t_used = hi + 1
        if t_used > cache.max_len or T > cache.max_len or n + B > cache.batch_size:
            raise ValueError(f"mixed step of {n} + {B} rows x {max(t_used, T)} positions exceeds the cache "
                             f"({cache.batch_size} x {cache.max_len})")
        adt = self.cache_dtype
        ninf = float("-inf")
        dec_mask = None  # decode rows all equally long: every cached key is visible
        if lo != hi:
            keys = torch.arange(t_used, device=dev)
            hidden = keys[None, None, None, :] > start[:, None, None, None]  # (n, 1, 1, t_used)
            dec_mask = torch.zeros(hidden.shape, dtype=adt, device=dev).masked_fill_(hidden, ninf)
            scatter_idx = start[:, None, None, None].expand(n, nh, 1, hs)  # (n, nh, 1, hs)
        ar = torch.arange(T, device=dev)
        # prompts start at position 0: plain causal attention (a pad query's output is never used)
        pre_mask = torch.zeros(T, T, dtype=adt, device=dev).masked_fill_(ar[None, :] > ar[:, None], ninf)
        pre_mask = pre_mask.expand(B, 1, T, T)
        tok = torch.cat([last, idx.reshape(B * T)])  # (N,) N = n + B*T: decode tokens, then prompts
        pos = torch.cat([start, ar.repeat(B)]).clamp_(max=cfg.block_size - 1)
        x = F.embedding(tok, self.wte) + F.embedding(pos, self.wpe)  # (N, C)
        eps = cfg.layer_norm_epsilon
        upcast = adt != self.dtype
        layer_norm, sdpa = torch.layer_norm, F.scaled_dot_product_attention
        for layer, (w1, b1, attn, proj, w2, b2, fc, fc2) in enumerate(self.layers):
            h = layer_norm(x, (C,), w1, b1, eps)
            qkv = attn(h)  # (N, 3C)
            kc, vc = cache.k[layer], cache.v[layer]
            d = qkv[:n]  # (n, 3C) the running rows' new token
            qd = d[:, :C].view(n, nh, 1, hs)
            if lo == hi:
                kc[:n, :, lo] = d[:, C:2 * C].view(n, nh, hs)
                vc[:n, :, lo] = d[:, 2 * C:].view(n, nh, hs)
            else:
                kc[:n].scatter_(2, scatter_idx, d[:, C:2 * C].view(n, nh, 1, hs).to(adt))
                vc[:n].scatter_(2, scatter_idx, d[:, 2 * C:].view(n, nh, 1, hs).to(adt))
            p = qkv[n:].view(B, T, 3, nh, hs)  # the new prompts
            kc[n:n + B, :, :T] = p[:, :, 1].transpose(1, 2)
            vc[n:n + B, :, :T] = p[:, :, 2].transpose(1, 2)
            qp = p[:, :, 0].transpose(1, 2)  # (B, nh, T, hs)
            if upcast:
                qd, qp = qd.to(adt), qp.to(adt)
            yd = sdpa(qd, kc[:n, :, :t_used], vc[:n, :, :t_used], attn_mask=dec_mask)  # (n, nh, 1, hs)
            yp = sdpa(qp, kc[n:n + B, :, :T], vc[n:n + B, :, :T], attn_mask=pre_mask)  # (B, nh, T, hs)
            y = torch.cat([yd.reshape(n, C), yp.transpose(1, 2).reshape(B * T, C)])  # (N, C)
            x = x + proj(y.to(self.dtype) if upcast else y)
            h = layer_norm(x, (C,), w2, b2, eps)
            x = x + fc2(fc(h, gelu=True))
        cache.lengths[:n] += 1
        cache.lengths[n:n + B] = lens
        sel = torch.cat([torch.arange(n, device=dev), n + torch.arange(B, device=dev) * T + lens - 1])
        x = layer_norm(x[sel], (C,), self.ln_f[0], self.ln_f[1], eps)  # (n + B, C)
        return self.lm_head(x).float()  # (n + B, V)


# ---- request bookkeeping --------------------------------------------------------------------------


class _Seq:
    """One decode row: a single completion of a request."""

    def __init__(self, req: "_Request", index: int, generator: torch.Generator | None):
        p = req.params
        self.req, self.index, self.params = req, index, p
        self.generator = generator
        self.tokens: list[int] = []
        self.logprobs: list[float] | None = [] if p.logprobs else None
        self.n_sampled = 0  # tokens sampled, including a final stop token that is not kept
        self.finished = False
        self.finish_reason: str | None = None
        self.ngram = NGramIndex(p.no_repeat_ngram_size, req.prompt_ids) if p.no_repeat_ngram_size > 0 else None
        # incremental detokenisation: text of tokens[:stable_n] is final (ends on a character boundary)
        self.stable_n, self.stable_text = 0, ""
        self.text: str | None = None  # final text once finished (cut at a stop string)
        self.checked_chars = 0  # stop strings were searched in text[:checked_chars]
        self.sent_tokens, self.sent_chars = 0, 0  # streaming: what step() already returned
        self.first_token_time: float | None = None


class _Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                 stream: bool, deltas: bool = True):
        self.request_id, self.prompt, self.prompt_ids, self.params = request_id, prompt, prompt_ids, params
        self.stream = stream  # step() reports this request (add_request); generate() collects it itself
        self.deltas = deltas  # report every step's new tokens, or only each completion when it finishes
        self.seqs: list[_Seq] = []
        self.beam: _BeamGroup | None = None
        self.outputs: list[CompletionOutput] | None = None  # beam search results
        self.stop_ids: frozenset[int] = frozenset()
        self.max_stop_len = max((len(s) for s in params.stop), default=0)

    @property
    def rows_needed(self) -> int:
        return self.params.num_beams if self.params.use_beam_search else self.params.n

    def finished(self) -> bool:
        if self.params.use_beam_search:
            return self.outputs is not None
        return bool(self.seqs) and all(s.finished for s in self.seqs)


def _seed_for(seed: int, index: int) -> int:
    """Generator seed of completion `index` of a request seeded with `seed` (index 0 uses seed itself)."""
    return (seed + 0x9E3779B97F4A7C15 * index) % (2 ** 63)


# ---- beam search ---------------------------------------------------------------------------------


class _BeamGroup:
    """Hugging Face beam search (transformers.generation.utils._beam_search), for one prompt.

    Keeps the 2*num_beams best continuations each step; candidates that end (stop token, stop string
    or max_new_tokens) and rank among the first num_beams become finished hypotheses scored
    sum_logprobs / generated_len ** length_penalty; the rest continue. Same early-stopping rules."""

    def __init__(self, engine: "Engine", req: _Request):
        p = req.params
        self.engine, self.req, self.p = engine, req, p
        self.K = K = p.num_beams
        self.P = P = len(req.prompt_ids)
        self.max_new = M = p.max_new_tokens
        dev = engine.device
        self.V = engine.config.vocab_size
        self.stop_ids = sorted(req.stop_ids)
        self.beams_to_keep = max(2, 1 + len(self.stop_ids)) * K
        self.prompt = torch.tensor(req.prompt_ids, dtype=torch.long, device=dev)
        self.cache = engine._fwd.new_cache(K, P + M)
        # prefill the prompt once (row 0) and copy its keys/values to the other beams
        row0 = KVCache(k=[t[:1] for t in self.cache.k], v=[t[:1] for t in self.cache.v],
                       lengths=torch.zeros(1, dtype=torch.long, device=dev))
        logits = engine._fwd(self.prompt[None], row0)  # (1, V)
        for t in self.cache.k + self.cache.v:
            t[1:, :, :P] = t[:1, :, :P]
        self.cache.lengths = torch.full((K,), P, dtype=torch.long, device=dev)
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
        eng, stops = self.engine, self.p.stop
        hits = []
        for row in cand[:, :n].tolist():
            text = eng._decode(row)
            hits.append(any(s in text for s in stops))
        return torch.tensor(hits, dtype=torch.bool, device=cand.device)

    def step(self) -> None:
        K, V, s, p = self.K, self.V, self.step_i, self.p
        if s > 0:
            last = self.running[:, s - 1:s]  # (K, 1)
            self.logits = self.engine._fwd(last, self.cache)
        logits = self.logits.float()
        log_probs = F.log_softmax(logits, dim=-1)  # (K, V) raw model log-probabilities
        scores = log_probs
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
        eng, req, p = self.engine, self.req, self.p
        outs = []
        for rank in range(p.n):
            n = int(self.fin_len[rank]) if bool(self.fin_done[rank]) else 0
            ids = self.fin[rank, :n].tolist()
            lps = self.fin_lp[rank, :n].tolist()
            reason = "length"
            if ids and ids[-1] in req.stop_ids:
                ids, lps, reason = ids[:-1], lps[:-1], "stop"
            text = eng._decode(ids)
            if p.stop:
                cut = _find_stop(text, p.stop, 0)
                if cut is not None:
                    text, reason = text[:cut], "stop"
                    keep = eng._tokens_within(ids, cut)
                    ids, lps = ids[:keep], lps[:keep]
            outs.append(CompletionOutput(index=rank, text=text, token_ids=ids, finish_reason=reason,
                                         logprobs=lps if p.logprobs else None,
                                         cumulative_logprob=float(self.fin_scores[rank])))
        req.outputs = outs
        self.cache = None  # free the memory now


def _find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    """Index of the earliest occurrence of any stop string in text[start:], or None."""
    best = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string (held back
    when streaming: the next token may complete the stop string)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


# ---- the engine ----------------------------------------------------------------------------------


class Engine:
    """Generation over a GPT with per-request SamplingParams; see the module docstring."""

    def __init__(self, model: GPT, tokenizer: Any = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, max_batch_size: int = 32, *,
                 eos_id: int | None = None, kernel: str = "auto"):
        if not (isinstance(max_batch_size, int) and max_batch_size >= 1):
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        self.config = model.config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", None)
        with torch.inference_mode():
            self._fwd = _Forward(model, self.device, dtype, kernel)
        self.kernel = self._fwd.kernel
        self._waiting: deque[_Request] = deque()
        self._requests: dict[str, _Request] = {}
        self._rows: list[_Seq] = []  # running rows; row i lives in cache slot i
        self._cache: KVCache | None = None
        self._presence: torch.Tensor | None = None  # (slots, V) bool, for repetition penalty
        self._last: torch.Tensor | None = None  # (slots,) long: each row's next input token
        self._row_params: dict[str, Any] | None = None  # per-row parameter tensors (rebuilt on change)
        self._beams: list[_BeamGroup] = []
        self._ids = itertools.count()
        # what the last step() advanced: sequences (beam search: every beam) and distinct requests
        self.last_step_rows = 0
        self.last_step_requests = 0

    @classmethod
    def from_checkpoint(cls, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        **kwargs: Any) -> "Engine":
        from gptcore.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path, device=device)
        return cls(ckpt.model, ckpt.tokenizer, device=device, dtype=dtype, **kwargs)

    # ---- text helpers ----------------------------------------------------------------------------

    def _decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None or not ids:
            return ""
        return self.tokenizer.decode(list(ids))

    def _tokens_within(self, ids: Sequence[int], nchars: int) -> int:
        """Largest i such that decode(ids[:i]) fits in the first `nchars` characters."""
        i = len(ids)
        while i > 0 and len(self._decode(ids[:i])) > nchars:
            i -= 1
        return i

    def _seq_text(self, seq: _Seq) -> str:
        """Decoded text of seq.tokens, incrementally (only the tokens since the last char boundary)."""
        tail = self._decode(seq.tokens[seq.stable_n:])
        text = seq.stable_text + tail
        if not tail.endswith("\ufffd"):  # no incomplete UTF-8 sequence pending: this prefix is final
            seq.stable_n, seq.stable_text = len(seq.tokens), text
        return text

    # ---- requests --------------------------------------------------------------------------------

    def _prepare(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None,
                 stream: bool, deltas: bool = True) -> _Request:
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        V, block = self.config.vocab_size, self.config.block_size
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: build Engine(model, tokenizer) or pass token ids")
            text = prompt
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < V]
            if bad:
                raise ValueError(f"prompt token ids must be in [0, vocab_size={V}), got {bad[:5]}; "
                                 f"encode the prompt with the model's own tokenizer")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode text; pass stop_token_ids instead "
                             "or build the Engine with a tokenizer")
        if not ids:
            if self.eos_id is None:
                raise ValueError("the prompt is empty and the engine has no eos_id to start from; "
                                 "pass at least one token")
            ids = [self.eos_id]  # GPT-2 convention: <|endoftext|> starts a fresh document
        room = block - params.max_new_tokens
        if room < 1:
            raise PromptTooLongError(
                f"max_new_tokens={params.max_new_tokens} leaves no room for a prompt in the model's context of "
                f"block_size={block} tokens; set max_new_tokens <= {block - 1}")
        if len(ids) > room:
            if params.truncate == "left":
                ids = ids[len(ids) - room:]
            else:
                raise PromptTooLongError(
                    f"prompt has {len(ids)} tokens and max_new_tokens={params.max_new_tokens}, together "
                    f"{len(ids) + params.max_new_tokens} > the model's context block_size={block}; shorten the "
                    f"prompt to <= {room} tokens, lower max_new_tokens, or pass truncate='left' to keep the "
                    f"last {room} prompt tokens")
        rows = params.num_beams if params.use_beam_search else params.n
        if rows > self.max_batch_size:
            raise ValueError(f"this request needs {rows} decode rows (n={params.n}, num_beams={params.num_beams}) "
                             f"but the engine has max_batch_size={self.max_batch_size}; lower n/num_beams or "
                             f"raise max_batch_size")
        req = _Request(request_id, text, ids, params, stream, deltas)
        stop_ids = set(params.stop_token_ids)
        if self.eos_id is not None and not params.ignore_eos:
            stop_ids.add(self.eos_id)
        req.stop_ids = frozenset(stop_ids)
        return req

    def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    *, deltas: bool = True) -> None:
        """Queue a request; it is prefilled and joins the running batch at the next `step()`.

        deltas=True: every step() reports the request's new tokens (streaming); deltas=False: step()
        reports each completion once, whole, when it finishes (a non-streaming server request: no
        per-token detokenisation and bookkeeping while it runs)."""
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in flight; use a unique id per request")
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
        if req.beam is not None and req.beam in self._beams:
            self._beams.remove(req.beam)
            req.beam.cache = None
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
        if cache is not None and cache.batch_size >= rows and cache.max_len >= length:
            return
        cur_rows = cache.batch_size if cache is not None else 0
        cur_len = cache.max_len if cache is not None else 0
        # grow geometrically so a stream of arriving requests reallocates O(log) times, not per request
        new_rows = min(self.max_batch_size, max(rows, 2 * cur_rows))
        new_len = min(self.config.block_size, max(-(-length // 64) * 64, 2 * cur_len if length > cur_len else cur_len))
        new = self._fwd.new_cache(new_rows, new_len)
        last = torch.zeros(new_rows, dtype=torch.long, device=self.device)
        n = len(self._rows)
        if cache is not None and n:
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

    def _params_tensors(self) -> dict[str, Any]:
        """Per-row sampling parameters (lists and tensors), rebuilt only when the set of rows changes."""
        if self._row_params is None:
            ps = [s.params for s in self._rows]
            dev = self.device
            self._row_params = dict(
                temperature_list=[p.temperature for p in ps],
                top_k_list=[p.top_k for p in ps],
                top_p_list=[p.top_p for p in ps],
                rep_list=[p.repetition_penalty for p in ps],
                ngram_list=[s.ngram is not None for s in self._rows],
                logprobs_list=[p.logprobs for p in ps],
                temperature=torch.tensor([p.temperature for p in ps], dtype=torch.float32, device=dev),
                top_k=torch.tensor([p.top_k for p in ps], dtype=torch.long, device=dev),
                top_p=torch.tensor([p.top_p for p in ps], dtype=torch.float32, device=dev),
                rep=torch.tensor([p.repetition_penalty for p in ps], dtype=torch.float32, device=dev),
                # the common serving/benchmark case: argmax of the raw logits for every row
                plain_greedy=all(p.temperature == 0 and p.repetition_penalty == 1.0 and not p.logprobs
                                 and p.no_repeat_ngram_size == 0 for p in ps),
            )
        return self._row_params

    # ---- sampling --------------------------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, start: int = 0) -> tuple[list[int], list[float] | None]:
        """Next token of running rows [start, start + len(logits)) from their (m, V) logits, each with
        its own parameters (HF order: repetition penalty, n-gram ban, temperature, top-k, top-p)."""
        rp = self._params_tensors()
        if rp["plain_greedy"]:
            return argmax(logits).tolist(), None
        m = logits.shape[0]
        stop = start + m
        temps = rp["temperature_list"][start:stop]
        reps = rp["rep_list"][start:stop]
        ngram = [i for i, f in enumerate(rp["ngram_list"][start:stop]) if f]
        x = logits
        if any(r != 1.0 for r in reps):
            x = apply_repetition_penalty(x, self._presence[start:stop], rp["rep"][start:stop])
        if ngram:
            r_idx, t_idx = [], []
            for i in ngram:
                banned = self._rows[start + i].ngram.banned()
                r_idx += [i] * len(banned)
                t_idx += banned
            if r_idx:
                x = x.clone() if x is logits else x
                x[torch.tensor(r_idx, device=x.device), torch.tensor(t_idx, device=x.device)] = float("-inf")
        nxt = argmax(x)  # greedy rows (the fast path when every row is greedy); same ties as torch.argmax
        rows = [i for i, t in enumerate(temps) if t > 0]
        if rows:
            ri = torch.tensor(rows, device=x.device)
            sel = ri + start
            y = apply_temperature(x[ri], rp["temperature"][sel])
            if any(rp["top_k_list"][start + i] > 0 for i in rows):
                y = apply_top_k(y, rp["top_k"][sel])
            if any(rp["top_p_list"][start + i] < 1.0 for i in rows):
                y = apply_top_p(y, rp["top_p"][sel])
            probs = torch.softmax(y, dim=-1)
            # one uniform per row from the row's own generator: independent of batch mates
            u = torch.cat([torch.rand(1, generator=self._rows[start + i].generator, device=x.device)
                           for i in rows])
            nxt[ri] = sample_from_probs(probs, u)
        lps = None
        if any(rp["logprobs_list"][start:stop]):
            lps = F.log_softmax(logits, dim=-1).gather(1, nxt[:, None])[:, 0].tolist()
        return nxt.tolist(), lps

    # ---- stepping --------------------------------------------------------------------------------

    def _admissible(self) -> list[_Request]:
        """Take the waiting requests that fit into free slots (beam-search ones start their groups)."""
        used = len(self._rows) + sum(g.K for g in self._beams)
        batch: list[_Request] = []
        while self._waiting and used + self._waiting[0].rows_needed <= self.max_batch_size:
            req = self._waiting.popleft()
            used += req.rows_needed
            if req.params.use_beam_search:
                req.beam = _BeamGroup(self, req)
                self._beams.append(req.beam)
            else:
                batch.append(req)
        return batch

    def _prefill_inputs(self, batch: list[_Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for `batch` after the running rows; its right-padded prompts (B, T) and lengths (B,)."""
        need_rows = len(self._rows) + sum(r.params.n for r in batch)
        need_len = max(len(r.prompt_ids) + r.params.max_new_tokens for r in batch)
        self._ensure_capacity(need_rows, need_len)
        lens = [len(r.prompt_ids) for r in batch]
        idx = torch.zeros(len(batch), max(lens), dtype=torch.long)
        for i, r in enumerate(batch):
            idx[i, :lens[i]] = torch.tensor(r.prompt_ids)
        return idx.to(self.device), torch.tensor(lens, device=self.device)

    def _admit(self) -> list[tuple[_Seq, float | None, int]]:
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

    def _add_rows(self, batch: list[_Request], logits: torch.Tensor) -> list[tuple[_Seq, float | None, int]]:
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
                    g.manual_seed(_seed_for(seed, j))
                seq = _Seq(r, j, g)
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
            for k, s in enumerate(self._rows[n0:]):
                self._presence[n0 + k] = False
                self._presence[n0 + k, torch.tensor(s.req.prompt_ids, device=self.device)] = True
        self._row_params = None
        # sample the first token of the new rows with the ordinary per-row machinery
        toks, lps = self._choose(row_logits, start=n0)
        return [(self._rows[n0 + k], None if lps is None else lps[k], toks[k]) for k in range(len(toks))]

    def _decode_step(self) -> list[tuple[_Seq, float | None, int]]:
        n = len(self._rows)
        if n == self._cache.batch_size:  # every slot is running: no view needed
            logits = self._fwd(self._last[:, None], self._cache)  # (n, V)
        else:
            view = self._view(0, n)
            logits = self._fwd(self._last[:n, None], view)  # (n, V)
            self._cache.lengths[:n] = view.lengths
        toks, lps = self._choose(logits)
        return [(self._rows[i], None if lps is None else lps[i], toks[i]) for i in range(n)]

    def _mixed_step(self) -> list[tuple[_Seq, float | None, int]]:
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

    def _accept(self, picks: list[tuple[_Seq, float | None, int]], stream_out: list[StepOutput]) -> None:
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
                    seq.logprobs.append(lp)
                if seq.ngram is not None:
                    seq.ngram.append(tok)
                if p.stop:
                    text = self._seq_text(seq)
                    cut = _find_stop(text, p.stop, max(0, seq.checked_chars - req.max_stop_len + 1))
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

    def _delta(self, seq: _Seq) -> StepOutput:
        """Streaming output of one row: text/tokens not yet sent, holding back a possible stop-string
        start and incomplete UTF-8 until they resolve."""
        if seq.finished:
            text, n_tok = seq.text, len(seq.tokens)
        else:
            text = self._seq_text(seq) if self.tokenizer is not None else ""
            safe = len(text)
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
            if seq.params.stop:
                safe = min(safe, len(text) - _stop_prefix_len(text, seq.params.stop))
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

    def _completion(self, seq: _Seq) -> CompletionOutput:
        return CompletionOutput(index=seq.index, text=seq.text if seq.text is not None else "",
                                token_ids=list(seq.tokens), finish_reason=seq.finish_reason or "length",
                                logprobs=list(seq.logprobs) if seq.logprobs is not None else None)

    def _maybe_forget(self, req: _Request) -> None:
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
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                        and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]  # one prompt
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            plist = [params] * len(prompts)
        else:
            plist = list(params)
            if len(plist) != len(prompts):
                raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts; pass one "
                                 f"SamplingParams for all or exactly one per prompt")
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine but step-API requests are in flight; finish "
                               "them (step() until has_unfinished() is False) or abort() them first")
        tag = next(self._ids)
        reqs = [self._prepare(f"generate-{tag}-{i}", p, sp, stream=False) for i, (p, sp) in enumerate(zip(prompts, plist))]
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
            outs = r.outputs if r.params.use_beam_search else [self._completion(s) for s in r.seqs]
            results.append(RequestOutput(prompt=r.prompt, prompt_token_ids=list(r.prompt_ids), outputs=outs,
                                         request_id=r.request_id))
        return results
