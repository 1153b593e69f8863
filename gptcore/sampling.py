"""Decoding parameters (`SamplingParams`, validated like vLLM's) and the pure logit transforms they drive.

    from gptcore.sampling import SamplingParams
    params = SamplingParams(max_new_tokens=64, temperature=0.8, top_p=0.95, stop=["\\n\\n"], seed=1)

Used by `gptcore.engine` (run it with `python -m pytest tests/gptcore/test_sampling.py -q`). Every
transform is a small function over a `(B, V)` logits tensor with one parameter per row, so rows with
different settings share one batch. Semantics follow Hugging Face `generate` (processing order:
repetition penalty -> no-repeat-ngram ban -> temperature -> top-k -> top-p), which the parity tests
check token for token. `copy_bias` (no HF equivalent; off by default) adds a constant to the logits of
the tokens that occur in the prompt, after the repetition penalty and before the n-gram ban.

Does not: run a model, hold a KV cache or decode text (gptcore.engine does).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gptcore import gemv as _gemv
from gptcore.errors import GPTError

__all__ = [
    "SamplingParams",
    "SamplingParamsError",
    "apply_copy_bias",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "argmax",
    "banned_ngram_tokens",
    "no_repeat_ngram_mask",
    "NGramIndex",
    "sample_from_probs",
    "token_presence",
]


class SamplingParamsError(GPTError):
    """A decoding parameter breaks a constraint. The message names field, constraint, value and fix."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_list(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to decode one prompt. Immutable; `stop` and `stop_token_ids` are stored as tuples.

    temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 switch those filters off.
    num_beams > 1 selects beam search (deterministic, Hugging Face semantics): it returns the `n`
    best finished beams and ignores sampling. logprobs=True returns, per generated token, its
    log-probability under the model's raw distribution (before penalties and temperature).
    truncate="left" keeps the last tokens of a prompt that does not fit the context instead of
    raising `gptcore.engine.PromptTooLongError`. copy_bias adds that many logits (nats) to every
    token that occurs in the (possibly truncated) prompt, so decoding prefers to reuse the prompt's
    words (extractive summaries); 0.0 is off, a negative value steers away from the prompt.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    copy_bias: float = 0.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never" (HF beam-search stopping rule)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    seed: int | None = None
    logprobs: bool = False
    truncate: str = "error"  # "error" | "left"
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # normalise list-ish fields to tuples (frozen dataclass: go through object.__setattr__)
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if isinstance(stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(stop))
        if isinstance(self.stop_token_ids, (list, tuple)):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        errors = self._errors()
        if errors:
            raise SamplingParamsError("invalid SamplingParams:\n  - " + "\n  - ".join(errors))

    def _errors(self) -> list[str]:
        e: list[str] = []
        if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            e.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}; "
                     f"set how many tokens to generate, e.g. max_new_tokens=64")
        if not (_is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            e.append(f"temperature must be a finite number >= 0, got {self.temperature!r}; "
                     f"use 0 for greedy decoding or e.g. 0.8 for sampling")
        if not (_is_int(self.top_k) and self.top_k >= 0):
            e.append(f"top_k must be an integer >= 0, got {self.top_k!r}; use 0 to disable top-k or e.g. top_k=50")
        if not (_is_number(self.top_p) and 0.0 < self.top_p <= 1.0):
            e.append(f"top_p must be in (0, 1], got {self.top_p!r}; use 1.0 to disable nucleus sampling "
                     f"or e.g. top_p=0.9")
        if not (_is_number(self.repetition_penalty) and math.isfinite(self.repetition_penalty)
                and self.repetition_penalty > 0):
            e.append(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}; "
                     f"use 1.0 for no penalty, > 1 to discourage repeats (e.g. 1.2)")
        if not (_is_number(self.copy_bias) and math.isfinite(self.copy_bias)):
            e.append(f"copy_bias must be a finite number, got {self.copy_bias!r}; use 0.0 for none, e.g. 1.5 "
                     f"to favour tokens that occur in the prompt")
        if not (_is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0):
            e.append(f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}; "
                     f"use 0 to disable it or e.g. 3 to never repeat a 3-gram")
        if not (_is_int(self.num_beams) and self.num_beams >= 1):
            e.append(f"num_beams must be an integer >= 1, got {self.num_beams!r}; use 1 (no beam search) or e.g. 4")
        if not (_is_number(self.length_penalty) and math.isfinite(self.length_penalty)):
            e.append(f"length_penalty must be a finite number, got {self.length_penalty!r}; "
                     f"use 1.0 (default), > 1 to favour longer beams, < 1 for shorter ones")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            e.append(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            e.append(f"stop must be a list of non-empty strings, got {_as_list(self.stop)!r}; e.g. stop=['\\n\\n']")
        if not isinstance(self.stop_token_ids, tuple) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            e.append(f"stop_token_ids must be a list of integers >= 0, got {_as_list(self.stop_token_ids)!r}; "
                     f"e.g. stop_token_ids=[0]")
        if not (_is_int(self.n) and self.n >= 1):
            e.append(f"n must be an integer >= 1, got {self.n!r}; use 1 for one completion per prompt")
        if not (self.seed is None or _is_int(self.seed)):
            e.append(f"seed must be an integer or None, got {self.seed!r}; e.g. seed=0 for reproducible sampling")
        if not isinstance(self.logprobs, bool):
            e.append(f"logprobs must be true or false, got {self.logprobs!r}")
        if self.truncate not in ("error", "left"):
            e.append(f"truncate must be 'error' or 'left', got {self.truncate!r}; 'left' drops the oldest "
                     f"prompt tokens when the prompt does not fit the context")
        if not isinstance(self.ignore_eos, bool):
            e.append(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if e:  # the cross-field rules below assume well-typed fields
            return e
        if self.num_beams > 1:
            if self.temperature not in (0, 1) or self.top_k != 0 or self.top_p != 1.0:
                e.append(f"beam search (num_beams={self.num_beams}) is deterministic and does not sample, got "
                         f"temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}; leave them at "
                         f"their defaults (temperature 0 or 1, top_k 0, top_p 1.0) or use num_beams=1 to sample")
            if self.n > self.num_beams:
                e.append(f"n must be <= num_beams with beam search (it returns the n best beams), got n={self.n}, "
                         f"num_beams={self.num_beams}; raise num_beams to at least {self.n} or lower n")
        elif self.n > 1 and self.temperature == 0:
            e.append(f"n={self.n} with temperature=0 (greedy) would return {self.n} identical completions; "
                     f"set temperature > 0 to sample {self.n} different ones, or n=1")
        return e

    # ---- derived flags ------------------------------------------------------------------------

    @property
    def greedy(self) -> bool:
        return self.num_beams == 1 and self.temperature == 0

    @property
    def use_beam_search(self) -> bool:
        return self.num_beams > 1

    # ---- (de)serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SamplingParamsError(f"unknown SamplingParams field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)


# ---- logit transforms: (B, V) logits, one parameter per row --------------------------------------


def token_presence(token_ids: Sequence[Sequence[int]] | torch.Tensor, vocab_size: int,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """(B, V) bool: which tokens occur in each row's ids (ragged lists, or a tensor where -1 = pad)."""
    if isinstance(token_ids, torch.Tensor):
        ids = token_ids.long()
        out = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
        # pads go to a spare column past the vocabulary so they mark nothing
        out.scatter_(1, torch.where(ids < 0, vocab_size, ids), True)
        return out[:, :vocab_size]
    out = torch.zeros(len(token_ids), vocab_size, dtype=torch.bool, device=device)
    for b, row in enumerate(token_ids):
        if len(row):
            out[b, torch.as_tensor(list(row), dtype=torch.long, device=device)] = True
    return out


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float | torch.Tensor) -> torch.Tensor:
    """HF/CTRL repetition penalty: for tokens already seen (prompt + generated), divide positive
    logits by the penalty and multiply negative ones. `seen` is (B, V) bool, `penalty` a float or
    (B,) tensor (1.0 = off for that row). Returns a new tensor."""
    p = penalty if isinstance(penalty, torch.Tensor) else torch.tensor(float(penalty), device=logits.device)
    p = p.to(logits.dtype)
    if p.dim() == 1:
        p = p[:, None]  # (B, 1)
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def apply_copy_bias(logits: torch.Tensor, in_prompt: torch.Tensor, bias: float | torch.Tensor) -> torch.Tensor:
    """Add `bias` to the logits of the tokens each row's prompt contains. `in_prompt` is (B, V) bool,
    `bias` a float or (B,) tensor (0.0 = off for that row); -inf logits stay -inf. Returns a new tensor."""
    b = bias if isinstance(bias, torch.Tensor) else torch.tensor(float(bias), device=logits.device)
    b = b.to(device=logits.device, dtype=logits.dtype)
    if b.dim() == 1:
        b = b[:, None]  # (B, 1)
    return logits + in_prompt.to(logits.dtype) * b


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """Divide each row by its temperature; rows with temperature 0 (greedy) are left unchanged."""
    t = temperature if isinstance(temperature, torch.Tensor) else torch.tensor(float(temperature))
    t = t.to(device=logits.device, dtype=logits.dtype)
    t = torch.where(t > 0, t, torch.ones_like(t))
    return logits / (t[:, None] if t.dim() == 1 else t)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor | int) -> torch.Tensor:
    """Keep each row's k highest logits (ties with the k-th kept, as in HF); k = 0 leaves the row alone."""
    B, V = logits.shape
    k = top_k if isinstance(top_k, torch.Tensor) else torch.full((B,), int(top_k), dtype=torch.long)
    k = k.to(device=logits.device, dtype=torch.long).clamp(max=V)
    kmax = int(k.max()) if B else 0
    if kmax <= 0:
        return logits
    top = torch.topk(logits, kmax, dim=-1).values  # (B, kmax) sorted descending
    kth = top.gather(1, (k - 1).clamp(min=0)[:, None])  # (B, 1) each row's k-th largest
    remove = (logits < kth) & (k > 0)[:, None]
    return logits.masked_fill(remove, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """Nucleus filter (HF semantics): drop the lowest-probability tokens whose cumulative probability
    is <= 1 - top_p, always keeping the most likely token. top_p = 1.0 leaves the row alone."""
    B, V = logits.shape
    p = top_p if isinstance(top_p, torch.Tensor) else torch.full((B,), float(top_p))
    p = p.to(device=logits.device, dtype=torch.float32)
    active = p < 1.0
    if not bool(active.any()):
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)  # ascending
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    remove_sorted = cum <= (1 - p)[:, None]
    remove_sorted[:, -1] = False  # keep at least the most likely token
    remove_sorted &= active[:, None]
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def argmax(logits: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Row-wise argmax of (B, V), equal to `logits.argmax(-1)` (first index of the maximum) but
    ~5-10x faster on CPU for large V: torch's argmax reduction is not vectorised, amax is. Take
    the max of each block of `block` columns, pick the first block holding the row maximum, then
    the first position of the maximum inside it."""
    B, V = logits.shape
    fast = _gemv.argmax(logits)  # one C loop when the decode kernel is loaded (cold logits: ~0.4 ms less)
    if fast is not None:
        return fast
    nb = V // block
    if nb < 4 or not logits.is_contiguous() or logits.device.type != "cpu":
        return logits.argmax(dim=-1)
    main = logits[:, :nb * block].view(B, nb, block)  # (B, nb, block)
    block_max = main.amax(dim=-1)  # (B, nb)
    blk = block_max.argmax(dim=-1)  # (B,) first block that holds the row maximum
    rows = torch.arange(B, device=logits.device)
    idx = blk * block + main[rows, blk].argmax(dim=-1)  # first maximum inside that block
    if nb * block < V:  # the last V % block columns: they win only if strictly larger
        tail_val, tail_idx = logits[:, nb * block:].max(dim=-1)
        idx = torch.where(tail_val > block_max[rows, blk], tail_idx + nb * block, idx)
    return idx


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: one token per row from (B, V) probabilities and (B,) uniforms in [0, 1).

    Each row draws its uniform from its own torch.Generator, so a request's samples do not depend
    on which other requests share its batch. Tokens with zero probability are never chosen."""
    cdf = probs.float().cumsum(dim=-1)  # (B, V)
    target = uniforms.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]  # (B, 1) scale by the row total
    idx = torch.searchsorted(cdf, target, right=True)  # first index with cdf > target
    return idx.clamp(max=probs.shape[-1] - 1)[:, 0]


def banned_ngram_tokens(tokens: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `tokens` (prompt + generated)."""
    if n <= 0 or len(tokens) < n:
        return []
    if n == 1:
        return sorted(set(tokens))
    prefix = tuple(tokens[len(tokens) - n + 1:])
    banned = []
    for i in range(len(tokens) - n + 1):
        if tuple(tokens[i:i + n - 1]) == prefix:
            banned.append(tokens[i + n - 1])
    return banned


class NGramIndex:
    """Incremental no-repeat-ngram bookkeeping for one sequence: O(1) per appended token.

    Maps each (n-1)-token prefix seen so far to the set of tokens that followed it, so the tokens
    banned at the next step are `index.banned()` (those that would repeat an n-gram)."""

    __slots__ = ("n", "tokens", "follow")

    def __init__(self, n: int, tokens: Iterable[int] = ()):
        self.n = n
        self.tokens: list[int] = []
        self.follow: dict[tuple[int, ...], set[int]] = {}
        for t in tokens:
            self.append(t)

    def append(self, token: int) -> None:
        self.tokens.append(token)
        if len(self.tokens) >= self.n:
            key = tuple(self.tokens[len(self.tokens) - self.n:-1])
            self.follow.setdefault(key, set()).add(token)

    def banned(self) -> list[int]:
        if len(self.tokens) < self.n - 1 or self.n <= 0:
            return []
        key = tuple(self.tokens[len(self.tokens) - self.n + 1:]) if self.n > 1 else ()
        return list(self.follow.get(key, ()))


def no_repeat_ngram_mask(sequences: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """(B, V) bool ban mask for equal-length sequences (B, L): True where the next token would
    repeat an n-gram of its row (prompt + generated, as HF does for decoder-only models)."""
    B, L = sequences.shape
    mask = torch.zeros(B, vocab_size + 1, dtype=torch.bool, device=sequences.device)
    if n <= 0 or L < n:
        return mask[:, :vocab_size]
    prefix = sequences[:, L + 1 - n:]  # (B, n-1) the last n-1 tokens
    windows = sequences.unfold(1, n, 1)  # (B, L-n+1, n)
    matches = (windows[..., :-1] == prefix[:, None, :]).all(dim=-1)  # (B, L-n+1)
    # non-matching windows write into a spare column so they cannot un-ban anything
    mask.scatter_(1, torch.where(matches, windows[..., -1], vocab_size), True)
    return mask[:, :vocab_size]
