"""The engine's request bookkeeping: output types, one request and its decode rows, request
validation (context rule, token ids, row budget) and stop-string search.

    from gptcore.engine_requests import prepare_request, find_stop
    req = prepare_request("r1", "Hello", SamplingParams(max_new_tokens=8), stream=True, deltas=True,
                          config=model.config, tokenizer=tok, eos_id=tok.eos_id, max_batch_size=32)
    find_stop("abc STOP def", ["STOP"], 0)            # -> 4

The output types (CompletionOutput, RequestOutput, StepOutput) and PromptTooLongError are public
through gptcore.engine; the rest is internal to the engine (tests/gptcore/test_engine.py covers it).

Does not: tokenize beyond calling `tokenizer.encode`, sample, or touch the KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gptcore.config import GPTConfig
from gptcore.errors import GPTError
from gptcore.sampling import NGramIndex, SamplingParams

__all__ = ["EngineError", "PromptTooLongError", "CompletionOutput", "RequestOutput", "StepOutput", "Seq", "Request",
           "prepare_request", "seed_for", "find_stop", "stop_prefix_len"]


class EngineError(GPTError):
    """A request or engine argument breaks a documented constraint (token ids outside the vocabulary, text
    without a tokenizer, more rows than max_batch_size, ...). A ValueError, as before it had a class."""


class PromptTooLongError(EngineError):
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


# ---- one request and its decode rows ----------------------------------------------------------------


class Seq:
    """One decode row: a single completion of a request."""

    def __init__(self, req: Request, index: int, generator: torch.Generator | None):
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


class Request:
    """One request: its prompt, parameters, decode rows (or beam-search outputs) and stop token ids."""

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                 stream: bool, deltas: bool = True):
        self.request_id, self.prompt, self.prompt_ids, self.params = request_id, prompt, prompt_ids, params
        self.stream = stream  # step() reports this request (add_request); generate() collects it itself
        self.deltas = deltas  # report every step's new tokens, or only each completion when it finishes
        self.seqs: list[Seq] = []
        self.outputs: list[CompletionOutput] | None = None  # beam search results
        self.stop_ids: frozenset[int] = frozenset()
        self.max_stop_len = max((len(s) for s in params.stop), default=0)
        self.prompt_mask: torch.Tensor | None = None  # (V,) bool tokens of the prompt, built when copy_bias needs it

    @property
    def rows_needed(self) -> int:
        return self.params.num_beams if self.params.use_beam_search else self.params.n

    def finished(self) -> bool:
        if self.params.use_beam_search:
            return self.outputs is not None
        return bool(self.seqs) and all(s.finished for s in self.seqs)


def seed_for(seed: int, index: int) -> int:
    """Generator seed of completion `index` of a request seeded with `seed` (index 0 uses seed itself)."""
    return (seed + 0x9E3779B97F4A7C15 * index) % (2 ** 63)


# ---- validation and stop strings --------------------------------------------------------------------


def prepare_request(request_id: str, prompt: str | Sequence[int], params: SamplingParams | None,
                    stream: bool, deltas: bool, *, config: GPTConfig, tokenizer: Any, eos_id: int | None,
                    max_batch_size: int) -> Request:
    """Validate one request against the model (vocabulary, context, row budget) and build it.

    Raises PromptTooLongError when prompt + max_new_tokens does not fit block_size (unless
    truncate="left"), EngineError (a ValueError) for other bad input; the messages name the value and the fix."""
    params = params if params is not None else SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    V, block = config.vocab_size, config.block_size
    text = None
    if isinstance(prompt, str):
        if tokenizer is None:
            raise EngineError("a text prompt needs a tokenizer: build Engine(model, tokenizer) or pass token ids")
        text = prompt
        ids = list(tokenizer.encode(prompt))
    else:
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise EngineError(f"prompt token ids must be in [0, vocab_size={V}), got {bad[:5]}; "
                              f"encode the prompt with the model's own tokenizer")
    if params.stop and tokenizer is None:
        raise EngineError("stop strings need a tokenizer to decode text; pass stop_token_ids instead "
                          "or build the Engine with a tokenizer")
    if not ids:
        if eos_id is None:
            raise EngineError("the prompt is empty and the engine has no eos_id to start from; "
                              "pass at least one token")
        ids = [eos_id]  # GPT-2 convention: <|endoftext|> starts a fresh document
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
    if rows > max_batch_size:
        raise EngineError(f"this request needs {rows} decode rows (n={params.n}, num_beams={params.num_beams}) "
                          f"but the engine has max_batch_size={max_batch_size}; lower n/num_beams or "
                          f"raise max_batch_size")
    req = Request(request_id, text, ids, params, stream, deltas)
    stop_ids = set(params.stop_token_ids)
    if eos_id is not None and not params.ignore_eos:
        stop_ids.add(eos_id)
    req.stop_ids = frozenset(stop_ids)
    return req


def find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    """Index of the earliest occurrence of any stop string in text[start:], or None."""
    best = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string (held back
    when streaming: the next token may complete the stop string)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best

