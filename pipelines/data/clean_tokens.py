"""Whitespace tokenization of many texts at once with numpy (shared by the Gopher quality and
repetition steps): per-text token statistics and per-token hashes/lengths.

    stats = token_stats(texts)             # (n, 5): tokens, punct-only tokens, their chars,
                                           #         tokens without a letter, token chars
    h, lens, counts = token_hashes(texts)  # one uint64 hash and one length per token, tokens per text

Tokens are exactly `str.split()` tokens. Texts made of BMP characters (nearly all) are encoded to
UTF-16 code units and processed as arrays (about 10x faster than per-token Python); the others
take an equivalent per-token Python path. Does not: know any thresholds (clean_quality does).
"""

from __future__ import annotations

import re

import numpy as np

_PUNCT_TOKEN = re.compile(r"(?<!\S)[^\w\s]+(?!\S)")  # tokens made only of punctuation/symbols
_NON_ALPHA_TOKEN = re.compile(r"(?<!\S)(?:[\d_]|[^\w\s])+(?!\S)")  # tokens without a letter-like char

_CHUNK_CHARS = 1 << 20  # texts are processed in runs of about this many characters (bounds memory)
_B = 0x9E3779B97F4A7C15  # odd: invertible modulo 2**64
_B_INV = pow(_B, -1, 1 << 64)

_classes: np.ndarray | None = None


def char_classes() -> np.ndarray:
    """(65536,) uint8 class of each BMP character, matching the regexes above: 0 whitespace
    (str.isspace, as str.split and \\s), 1 word character that is not a decimal digit or "_"
    (\\w minus [\\d_]: letters and letter-like numerals), 2 decimal digit or "_", 3 anything else."""
    global _classes
    if _classes is None:
        cls = np.full(65536, 3, dtype=np.uint8)
        for cp in range(65536):
            ch = chr(cp)
            if ch.isspace():
                cls[cp] = 0
            elif ch == "_" or ch.isdecimal():
                cls[cp] = 2
            elif ch.isalnum():
                cls[cp] = 1
        _classes = cls
    return _classes


def _runs(texts: list[str]):
    """Yield (kind, [indices]) in order: "np" runs of BMP-only texts up to _CHUNK_CHARS, "py" singles."""
    run: list[int] = []
    size = 0
    for i, t in enumerate(texts):
        if not t.isascii() and len(t.encode("utf-16-le", "surrogatepass")) != 2 * len(t):
            if run:
                yield "np", run
                run, size = [], 0
            yield "py", [i]
            continue
        if run and size + len(t) > _CHUNK_CHARS:
            yield "np", run
            run, size = [], 0
        run.append(i)
        size += len(t) + 1
    if run:
        yield "np", run


def _codes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> (UTF-16 code units of the texts joined by "\\n", start offset of each text)."""
    data = "\n".join(texts).encode("utf-16-le", "surrogatepass")
    codes = np.frombuffer(data, dtype="<u2")
    starts = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])
    return codes, starts


def _bounds(cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tok = (cls != 0).view(np.int8)
    edge = np.diff(tok, prepend=np.int8(0), append=np.int8(0))  # +1 at token starts, -1 just after ends
    starts = np.flatnonzero(edge == 1)
    return starts, np.flatnonzero(edge == -1)


def token_stats_regex(text: str) -> tuple[int, int, int, int, int]:
    """(tokens, punctuation-only tokens, their characters, tokens without a letter, token characters)."""
    tokens = text.split()
    if not tokens:
        return 0, 0, 0, 0, 0
    punct = _PUNCT_TOKEN.findall(text)
    non_alpha = len(_NON_ALPHA_TOKEN.findall(text))
    return len(tokens), len(punct), sum(map(len, punct)), non_alpha, sum(map(len, tokens))


def token_stats(texts: list[str]) -> np.ndarray:
    """token_stats_regex of every text, vectorised: (n, 5) int64."""
    out = np.zeros((len(texts), 5), dtype=np.int64)
    table = char_classes()
    for kind, idx in _runs(texts):
        if kind == "py":
            out[idx[0]] = token_stats_regex(texts[idx[0]])
            continue
        run = [texts[i] for i in idx]
        codes, text_starts = _codes(run)
        if not len(codes):
            continue
        cls = table[codes]  # (L,)
        starts, ends = _bounds(cls)
        if not len(starts):
            continue
        lens = ends - starts
        # segment k = token k plus the whitespace after it (whitespace adds nothing to any/or)
        has_alpha = np.logical_or.reduceat(cls == 1, starts)
        has_word = np.logical_or.reduceat((cls == 1) | (cls == 2), starts)
        doc = np.searchsorted(text_starts, starts, side="right") - 1  # (tokens,) text of each token
        m = len(run)
        punct = ~has_word
        stats = np.stack([
            np.bincount(doc, minlength=m),
            np.bincount(doc, weights=punct, minlength=m),
            np.bincount(doc, weights=lens * punct, minlength=m),
            np.bincount(doc, weights=~has_alpha, minlength=m),
            np.bincount(doc, weights=lens, minlength=m),
        ], axis=1)
        out[idx] = stats.astype(np.int64)
    return out


def token_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (hash per token uint64 (N,), length per token int64 (N,), tokens per text int64 (n,)).
    Equal tokens of one text get equal hashes (hashes are only compared within a text)."""
    hs, ls = [], []
    counts = np.zeros(len(texts), dtype=np.int64)
    table = char_classes()
    for kind, idx in _runs(texts):
        if kind == "py":
            toks = texts[idx[0]].split()
            hs.append(np.fromiter(map(hash, toks), dtype=np.int64, count=len(toks)).view(np.uint64))
            ls.append(np.fromiter(map(len, toks), dtype=np.int64, count=len(toks)))
            counts[idx[0]] = len(toks)
            continue
        run = [texts[i] for i in idx]
        codes, text_starts = _codes(run)
        if not len(codes):
            continue
        starts, ends = _bounds(table[codes])
        if not len(starts):
            continue
        # polynomial hash of each token from prefix sums: sum_i c_i * B^(i - start), mod 2**64
        L = len(codes)
        pw = np.cumprod(np.full(L, _B, dtype=np.uint64))  # B^(i+1)
        prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum((codes.astype(np.uint64) + 1) * pw)])
        ipw = np.cumprod(np.full(L, _B_INV, dtype=np.uint64))  # B^-(i+1)
        hs.append((prefix[ends] - prefix[starts]) * ipw[starts])
        ls.append((ends - starts).astype(np.int64))
        doc = np.searchsorted(text_starts, starts, side="right") - 1
        counts[idx] = np.bincount(doc, minlength=len(run))
    if not hs:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), counts
    return np.concatenate(hs), np.concatenate(ls), counts
