"""The tokenizer file formats, one per kind: what a byte-level BPE or char-level tokenizer.json may
contain, parsed into lookup tables, and when tiktoken's fast BPE encoding equals HF's merge-list BPE.

    from gptcore.tokenizer_formats import parse_bpe, parse_char, tiktoken_problem
    bpe = parse_bpe(spec, specials, "tokenizer.json")    # -> BpeVocab(id_to_bytes, vocab, merges, ...)
    chars = parse_char(spec, specials, "tokenizer.json")  # -> CharVocab(itos, lut, vocab_size)

Internal to gptcore.tokenizer (see its module docstring for the formats and the merge-consistency
argument); TokenizerError and EOT are re-exported there. Tests: tests/gptcore/test_tokenizer.py.

Does not: encode or decode text, train, or read files (gptcore.tokenizer does).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gptcore.errors import GPTError

__all__ = ["EOT", "TokenizerError", "BpeVocab", "CharVocab", "parse_bpe", "parse_char", "tiktoken_problem",
           "fix_surrogates", "BYTE_LEVEL_PATTERN", "CHAR_SPLIT_REGEX", "MAX_VOCAB"]

EOT = "<|endoftext|>"

# HF ByteLevel's pre-tokenisation regex, written as tiktoken's GPT-2 `pat_str` (same language: the alternation
# `'s|'t|'re|'ve|'m|'ll|'d` is spelled `'(?:[sdmt]|ll|ve|re)`). A test checks every code point against HF.
BYTE_LEVEL_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CHAR_SPLIT_REGEX = r"[\s\S]"  # one piece per code point (`.` would miss newlines)
MAX_VOCAB = 2**31 - 1  # ids are stored as int32 in token shards


class TokenizerError(GPTError):
    """Bad tokenizer input, file or argument. The message names what, the constraint, the value and the fix."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable char table (what HF's ByteLevel alphabet uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)  # non-printable bytes map to U+0100.. in byte order
            extra += 1
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def fix_surrogates(text: str) -> str:
    # A Python str may hold lone surrogates, which are not UTF-8; replace them (tiktoken does the same).
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def tiktoken_problem(
    vocab: dict[str, int], merges: list[tuple[str, ...]], specials: dict[str, int],
    hf_tokenize: Callable[[str], list[int]],
) -> str | None:
    """Why tiktoken could give different ids than HF's merge-list BPE for this vocabulary (None: it cannot).

    tiktoken merges any adjacent pair whose concatenation is in the vocabulary, lowest rank first, and returns a
    whole pre-token at once when it is in the vocabulary; HF applies only listed merges, in list order. With
    rank = id these agree when: each merge makes a new token, ids increase with merge index (so rank order is
    merge order), every non-byte token is made by a merge, and every token re-encodes (HF) to itself (see
    gptcore.tokenizer's module docstring for how sufficiency was checked). `hf_tokenize` maps a byte-level
    token string to HF ids.
    """
    byte_level = {c for c in CHAR_TO_BYTE}
    singles = {t for t in vocab if len(t) == 1 and t in byte_level and t not in specials}
    if len(singles) != 256:
        return f"vocabulary lacks {256 - len(singles)} of the 256 single-byte tokens"
    last = -1
    produced: set[str] = set()
    for k, m in enumerate(merges):
        if len(m) != 2:
            return f"merge #{k} {m!r} is not a pair"
        a, b = m
        t = a + b
        if a not in vocab or b not in vocab or t not in vocab:
            return f"merge #{k} ({a!r}, {b!r}) uses or makes a token missing from the vocabulary"
        if t in produced:
            return f"token {t!r} is made by two merges (second is #{k})"
        if vocab[t] <= last:
            return f"token ids do not increase with merge order at merge #{k} ({t!r}, id {vocab[t]})"
        last = vocab[t]
        produced.add(t)
    extra = [t for t in vocab if t not in specials and t not in singles and t not in produced]
    if extra:
        return f"{len(extra)} vocabulary token(s) are made by no merge, e.g. {extra[0]!r}"
    for t in produced:
        got = hf_tokenize(t)
        if got != [vocab[t]]:
            return f"token {t!r} (id {vocab[t]}) does not re-encode to itself (HF gives {got})"
    return None


# ---- per-kind parsing ---------------------------------------------------------------------------


@dataclass
class BpeVocab:
    """A byte-level BPE tokenizer.json, checked: every id's bytes, the vocabulary and the merges."""

    id_to_bytes: list[bytes]  # id -> token bytes (a special token: its UTF-8 text)
    vocab_size: int  # dense ids 0..vocab_size-1, specials included
    vocab: dict[str, int]  # the model's byte-level vocabulary (HF's printable-char spelling)
    merges: list[tuple[str, ...]]
    ignore_merges: bool  # HF returns an in-vocabulary pre-token whole: not tiktoken's rule


def parse_bpe(spec: dict[str, Any], specials: dict[str, int], src: str) -> BpeVocab:
    """Check a `tokenizers` BPE spec is byte-level BPE this package can run; build its id -> bytes table."""
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None:
        raise TokenizerError(f"{src}: BPE with a normalizer is unsupported; expected normalizer null")
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        raise TokenizerError(
            f"{src}: only byte-level BPE is supported (pre_tokenizer ByteLevel with add_prefix_space=false, "
            f"use_regex=true); got pre_tokenizer {json.dumps(pre)[:200]}"
        )
    model = spec["model"]
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise TokenizerError(f"{src}: BPE option {key}={model[key]!r} is unsupported; expected null")
    vocab: dict[str, int] = model["vocab"]
    n = max(list(vocab.values()) + list(specials.values())) + 1
    table: list[bytes | None] = [None] * n
    for s, i in specials.items():
        table[i] = s.encode("utf-8")
    for tok, i in vocab.items():
        if tok in specials:
            continue
        try:
            b = bytes(CHAR_TO_BYTE[c] for c in tok)
        except KeyError:
            raise TokenizerError(
                f"{src}: vocabulary entry {tok!r} (id {i}) is not byte-level encoded; only byte-level BPE is "
                "supported"
            ) from None
        if table[i] is not None and table[i] != b:
            raise TokenizerError(f"{src}: id {i} is used by two tokens ({table[i]!r} and {b!r})")
        table[i] = b
    dense = [b for b in table if b is not None]
    if len(dense) != n:
        missing = [i for i, b in enumerate(table) if b is None]
        raise TokenizerError(
            f"{src}: token ids must be dense 0..{n - 1}; {len(missing)} missing, e.g. {missing[:5]}"
        )
    raw_merges = model.get("merges") or []
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in raw_merges]
    return BpeVocab(id_to_bytes=dense, vocab_size=n, vocab=vocab, merges=merges,
                    ignore_merges=bool(model.get("ignore_merges")))


@dataclass
class CharVocab:
    """A char-level tokenizer.json, checked: id -> string and a code point -> id lookup table."""

    itos: list[str]  # id -> its character (a special token: its text)
    vocab_size: int
    lut: npt.NDArray[np.int64]  # code point -> id, -1 where the character is not in the vocabulary


def parse_char(spec: dict[str, Any], specials: dict[str, int], src: str) -> CharVocab:
    """Check a WordLevel spec is the char-level layout train_char writes; build its lookup tables."""
    pre = spec.get("pre_tokenizer") or {}
    ok = (
        spec.get("normalizer") is None
        and pre.get("type") == "Split"
        and pre.get("pattern") == {"Regex": CHAR_SPLIT_REGEX}
        and pre.get("behavior") == "Isolated"
        and not pre.get("invert")
        and (spec.get("decoder") or {}).get("type") == "Fuse"
    )
    if not ok:
        raise TokenizerError(
            f"{src}: a WordLevel model is only supported as a char-level tokenizer (normalizer null, "
            f"pre_tokenizer Split on {CHAR_SPLIT_REGEX!r} Isolated, decoder Fuse), as written by train_char"
        )
    vocab: dict[str, int] = spec["model"]["vocab"]
    n = len(vocab) + len(specials)
    itos: list[str | None] = [None] * n
    for ch, i in vocab.items():
        if len(ch) != 1:
            raise TokenizerError(f"{src}: char vocabulary entry {ch!r} (id {i}) is not a single character")
        if not 0 <= i < n or itos[i] is not None:
            raise TokenizerError(f"{src}: char vocabulary id {i} for {ch!r} is out of range or duplicated")
        itos[i] = ch
    for s, i in specials.items():
        if not 0 <= i < n or itos[i] is not None:
            raise TokenizerError(f"{src}: special token id {i} for {s!r} is out of range or duplicated")
        itos[i] = s
    # every slot is filled: n ids, each assigned exactly once above (duplicates and gaps raise)
    full = [s for s in itos if s is not None]
    # Code point -> id lookup table, so encoding is one vectorised gather.
    max_cp = max((ord(c) for c in vocab), default=0)
    lut = np.full(max_cp + 1, -1, dtype=np.int64)
    for ch, i in vocab.items():
        lut[ord(ch)] = i
    return CharVocab(itos=full, vocab_size=n, lut=lut)
