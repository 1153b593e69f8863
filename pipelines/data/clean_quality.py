"""Quality steps of data prep: gopher_quality, gopher_repetition, c4_lines; plus the plain function
`repetition_reason(text, **thresholds)` that the generation stage reuses as an output gate.

    batch = build_step("gopher_quality", {"min_words": 50})(batch)
    repetition_reason("the cat " * 100)   # -> "top_2gram"

Thresholds default to the Gopher paper (Rae et al. 2021, section A.1.1 and table A1) and to C4's
line rules (Raffel et al. 2020) as datatrove sets them. Words are str.split() tokens, counted for a
whole batch at once with numpy (clean_tokens.py), so the steps run at tens of MB/s.
Does not: use word lists beyond the Gopher stop words (no bad-word list shipped).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Literal

import numpy as np

from pipelines.data.clean_tokens import token_hashes, token_stats, token_stats_regex
from pipelines.data.steps import Batch, Filter, Step, register_step


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# ============================================================================ gopher_quality

_BULLETS = "•●○◦▪▫■□‣⁃∙·-*–"
_BULLET_LINE = re.compile(rf"^[ \t]*[{re.escape(_BULLETS)}]", re.M)
_ELLIPSIS_LINE = re.compile(r"(?:\.\.\.|…)[ \t]*$", re.M)


@dataclasses.dataclass(frozen=True)
class GopherQualityConfig:
    """gopher_quality: a document is dropped when it has fewer than min_words / more than max_words
    words (punctuation-only tokens do not count), a mean word length outside [min, max], more than
    max_symbol_word_ratio "#" or "..." per word, more than max_bullet_lines_ratio of its lines
    starting with a bullet, more than max_ellipsis_lines_ratio ending with an ellipsis, fewer than
    min_alpha_words_ratio of its words containing a letter, or fewer than min_stop_words occurrences
    of the stop words (case-insensitive)."""

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    stop_words: list[str] = dataclasses.field(
        default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"])

    def __post_init__(self):
        _check(0 <= self.min_words <= self.max_words,
               f"gopher_quality: need 0 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
        _check(0 <= self.min_mean_word_length <= self.max_mean_word_length,
               f"gopher_quality: need 0 <= min_mean_word_length <= max_mean_word_length, got "
               f"{self.min_mean_word_length}, {self.max_mean_word_length}")
        for f in ("max_symbol_word_ratio", "max_bullet_lines_ratio", "max_ellipsis_lines_ratio",
                  "min_alpha_words_ratio"):
            v = getattr(self, f)
            _check(v >= 0, f"gopher_quality.{f} must be >= 0, got {v}")
        _check(self.min_stop_words >= 0, f"gopher_quality.min_stop_words must be >= 0, got {self.min_stop_words}")
        _check(all(isinstance(w, str) and w.strip() for w in self.stop_words),
               f"gopher_quality.stop_words must be non-empty strings, got {self.stop_words}")


@register_step
class GopherQuality(Filter):
    name = "gopher_quality"
    Config = GopherQualityConfig
    reasons = ("word_count_below_min", "word_count_above_max", "mean_word_length_below_min",
               "mean_word_length_above_max", "hash_ratio", "ellipsis_ratio", "bullet_lines",
               "ellipsis_lines", "alpha_words_below_min", "stop_words_below_min")

    def setup(self) -> None:
        words = "|".join(re.escape(w) for w in sorted(self.config.stop_words, key=len, reverse=True))
        self._stop = re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.I)

    def reason(self, text: str, stats: tuple[int, int, int, int, int] | None = None) -> str | None:
        c = self.config
        n_tokens, n_punct, punct_chars, n_non_alpha, token_chars = stats or token_stats_regex(text)
        n_words = n_tokens - n_punct
        if n_words < c.min_words:
            return "word_count_below_min"
        if n_words > c.max_words:
            return "word_count_above_max"
        mean_len = (token_chars - punct_chars) / n_words
        if mean_len < c.min_mean_word_length:
            return "mean_word_length_below_min"
        if mean_len > c.max_mean_word_length:
            return "mean_word_length_above_max"
        if text.count("#") > c.max_symbol_word_ratio * n_words:
            return "hash_ratio"
        if text.count("...") + text.count("…") > c.max_symbol_word_ratio * n_words:
            return "ellipsis_ratio"
        n_lines = text.count("\n") + 1
        # count bullet/ellipsis lines only when the marker characters could reach the limit
        if sum(map(text.count, _BULLETS)) > c.max_bullet_lines_ratio * n_lines and \
                len(_BULLET_LINE.findall(text)) > c.max_bullet_lines_ratio * n_lines:
            return "bullet_lines"
        if text.count("...") + text.count("…") > c.max_ellipsis_lines_ratio * n_lines and \
                len(_ELLIPSIS_LINE.findall(text)) > c.max_ellipsis_lines_ratio * n_lines:
            return "ellipsis_lines"
        if n_tokens - n_non_alpha < c.min_alpha_words_ratio * n_tokens:
            return "alpha_words_below_min"
        if c.min_stop_words:
            need = c.min_stop_words
            for _ in self._stop.finditer(text):
                need -= 1
                if not need:
                    break
            else:
                return "stop_words_below_min"
        return None

    def __call__(self, batch: Batch) -> Batch:
        drops = list(batch["drop"])
        texts = batch["text"]
        alive = [i for i, d in enumerate(drops) if not d]
        stats = token_stats([texts[i] for i in alive]).tolist()
        for i, st in zip(alive, stats):
            r = self.reason(texts[i], st)
            if r:
                drops[i] = f"{self.name}:{r}"
        out = dict(batch)
        out["drop"] = drops
        return out


# ============================================================================ gopher_repetition

_PARA_SPLIT = re.compile(r"\n[ \t]*\n\s*")
_LINE_SPLIT = re.compile(r"\n\s*")
_P = np.uint64(0x9E3779B97F4A7C15)  # odd multipliers for the rolling n-gram hash
_Q = np.uint64(0xC2B2AE3D27D4EB4F)


@dataclasses.dataclass(frozen=True)
class GopherRepetitionConfig:
    """gopher_repetition (Gopher table A1): maximum fraction of duplicate lines / paragraphs (by count
    and by characters), of characters in the most frequent 2/3/4-gram, and of characters covered by
    duplicated 5..10-grams. Words are whitespace tokens; set a threshold to 1.0 to disable it."""

    dup_para_fraction: float = 0.30
    dup_para_char_fraction: float = 0.20
    dup_line_fraction: float = 0.30
    dup_line_char_fraction: float = 0.20
    top_2gram: float = 0.20
    top_3gram: float = 0.18
    top_4gram: float = 0.16
    dup_5gram: float = 0.15
    dup_6gram: float = 0.14
    dup_7gram: float = 0.13
    dup_8gram: float = 0.12
    dup_9gram: float = 0.11
    dup_10gram: float = 0.10

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            _check(isinstance(v, (int, float)) and 0.0 <= v <= 1.0,
                   f"gopher_repetition.{f.name} must be a fraction in [0, 1] (1.0 disables it), got {v!r}")


def _dup_fractions(parts: list[str], total_chars: int) -> tuple[float, float]:
    """(duplicate elements / elements, characters in duplicates after their first occurrence / total)."""
    uniq = set(parts)
    n_dup = len(parts) - len(uniq)
    if not n_dup:
        return 0.0, 0.0
    dup_chars = sum(map(len, parts)) - sum(map(len, uniq))
    return n_dup / len(parts), dup_chars / max(total_chars, 1)


def _line_para_reason(text: str, c: GopherRepetitionConfig) -> str | None:
    if "\n" not in text:
        return None
    stripped = text.strip()
    n = len(text)
    if c.dup_para_fraction < 1.0 or c.dup_para_char_fraction < 1.0:
        paras = _PARA_SPLIT.split(stripped)
        if len(paras) > 1:
            frac, chars = _dup_fractions(paras, n)
            if frac > c.dup_para_fraction:
                return "dup_para_fraction"
            if chars > c.dup_para_char_fraction:
                return "dup_para_char_fraction"
    if c.dup_line_fraction < 1.0 or c.dup_line_char_fraction < 1.0:
        lines = _LINE_SPLIT.split(stripped)
        if len(lines) > 1:
            frac, chars = _dup_fractions(lines, n)
            if frac > c.dup_line_fraction:
                return "dup_line_fraction"
            if chars > c.dup_line_char_fraction:
                return "dup_line_char_fraction"
    return None


def _ngram_reasons(texts: list[str], c: GopherRepetitionConfig) -> list[str | None]:
    """n-gram rules for many documents at once: one numpy pass over all their words per n."""
    m = len(texts)
    out: list[str | None] = [None] * m
    h, wlen, counts = token_hashes(texts)  # (N,) word hashes, (N,) word lengths, (m,) words per text
    N = len(h)
    if N < 2:
        return out
    doc = np.repeat(np.arange(m, dtype=np.int64), counts)  # (N,) document of each word
    cum = np.concatenate([[0], np.cumsum(wlen)])  # (N+1,) chars before word i
    total = np.maximum(np.bincount(doc, weights=wlen, minlength=m), 1.0)  # (m,) word chars per doc
    doc_end = np.cumsum(counts)[doc]  # (N,) end (exclusive) of each word's document
    salt = doc.astype(np.uint64) * _Q

    top = {2: c.top_2gram, 3: c.top_3gram, 4: c.top_4gram}
    dup = {n: getattr(c, f"dup_{n}gram") for n in range(5, 11)}
    enabled = [n for n, v in (*top.items(), *dup.items()) if v < 1.0]
    if not enabled:
        return out
    last_n = max(enabled)
    first: dict[int, str] = {}  # doc -> first rule it breaks (rules checked in n order)
    starts = np.arange(N - 1, dtype=np.int64)
    pos = starts[starts + 2 <= doc_end[:-1]]  # (K,) starts of 2-grams inside one document
    hn = h[pos] * _P + h[pos + 1]  # (K,) hash of the n-gram starting at each pos
    n = 2
    while True:
        _, inv, cnt = np.unique(hn + salt[pos], return_inverse=True, return_counts=True)
        c_at = cnt[inv]  # occurrences (within its document) of the n-gram at each pos
        is_dup = c_at > 1
        dpos = pos[is_dup]
        if n in top and top[n] < 1.0 and len(dpos):
            cc = c_at[is_dup]
            chars = cum[dpos + n] - cum[dpos]
            # the most frequent n-gram of each doc (ties: the longest) as count * its characters
            score = cc * (1 << 24) + np.minimum(chars, (1 << 24) - 1)
            d_of = doc[dpos]  # sorted, as positions are
            seg = np.flatnonzero(np.diff(d_of, prepend=-1))  # first dup position of each doc
            best = np.maximum.reduceat(score, seg)
            frac = (best >> 24) * (best & ((1 << 24) - 1)) / total[d_of[seg]]
            for d in d_of[seg][frac > top[n]]:
                first.setdefault(int(d), f"top_{n}gram")
        if n in dup and dup[n] < 1.0 and len(dpos):
            diff = np.bincount(dpos, minlength=N + 1) - np.bincount(dpos + n, minlength=N + 1)
            covered = np.cumsum(diff)[:N] > 0  # (N,) words inside any duplicated n-gram
            frac = np.bincount(doc, weights=wlen * covered, minlength=m) / total
            for d in np.nonzero(frac > dup[n])[0]:
                first.setdefault(int(d), f"dup_{n}gram")
        if n >= last_n or not len(dpos):
            break
        # an (n+1)-gram can repeat only where the n-grams at i and at i+1 both repeat
        mark = np.zeros(N + 1, dtype=bool)
        mark[dpos] = True
        keep = mark[dpos + 1] & (dpos + n + 1 <= doc_end[dpos])
        pos = dpos[keep]
        hn = hn[is_dup][keep] * _P + h[pos + n]
        n += 1
        if not len(pos):
            break
    for d, r in first.items():
        out[d] = r
    return out


def repetition_reasons(texts: list[str], config: GopherRepetitionConfig | None = None) -> list[str | None]:
    """Gopher repetition verdict for each text: None (keep) or the first rule it breaks."""
    c = config or GopherRepetitionConfig()
    out = [_line_para_reason(t, c) for t in texts]
    rest = [i for i, r in enumerate(out) if r is None]
    if rest:
        for i, r in zip(rest, _ngram_reasons([texts[i] for i in rest], c)):
            out[i] = r
    return out


@functools.lru_cache(maxsize=32)
def _config_for(items: tuple) -> GopherRepetitionConfig:
    return GopherRepetitionConfig(**dict(items))


def repetition_reason(text: str, **thresholds: float) -> str | None:
    """None if `text` passes the Gopher repetition rules, else the rule it breaks (e.g. "top_2gram").
    Keyword arguments override GopherRepetitionConfig fields (e.g. dup_line_fraction=0.5)."""
    return repetition_reasons([text], _config_for(tuple(sorted(thresholds.items()))))[0]


@register_step
class GopherRepetition(Step):
    name = "gopher_repetition"
    Config = GopherRepetitionConfig
    reasons = ("dup_para_fraction", "dup_para_char_fraction", "dup_line_fraction", "dup_line_char_fraction",
               "top_2gram", "top_3gram", "top_4gram", *(f"dup_{n}gram" for n in range(5, 11)))

    def __call__(self, batch: Batch) -> Batch:
        drops = list(batch["drop"])
        alive = [i for i, d in enumerate(drops) if not d]
        texts = batch["text"]
        for i, r in zip(alive, repetition_reasons([texts[i] for i in alive], self.config)):
            if r:
                drops[i] = f"{self.name}:{r}"
        out = dict(batch)
        out["drop"] = drops
        return out


# ============================================================================ c4_lines

_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.I)
_SENTENCE_END = re.compile(r"[.!?。！？]+[\"'”’)\]]*(?=\s|$)")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_END_PUNCT = (".", "?", "!", '"', "'", "”", "’", "。", "！", "？")


@dataclasses.dataclass(frozen=True)
class C4LinesConfig:
    """c4_lines (C4, as datatrove's C4QualityFilter): per line, drop lines without terminal punctuation,
    with fewer than min_words_per_line words, containing "javascript", a policy/cookie phrase, or a
    word longer than max_word_length; remove [1]/[edit]/[citation needed] citations. Per document,
    "lorem ipsum" and "{" drop the whole document (action "doc"), only the line ("line"), or
    nothing ("off"); a document with fewer than min_sentences sentences left is dropped."""

    min_words_per_line: int = 3
    min_sentences: int = 5
    max_word_length: int = 1000
    terminal_punct: bool = True
    javascript: bool = True
    policy: bool = True
    remove_citations: bool = True
    lorem_ipsum: Literal["doc", "line", "off"] = "doc"
    curly_bracket: Literal["doc", "line", "off"] = "doc"

    def __post_init__(self):
        _check(self.min_words_per_line >= 0, f"c4_lines.min_words_per_line must be >= 0, got {self.min_words_per_line}")
        _check(self.min_sentences >= 0, f"c4_lines.min_sentences must be >= 0, got {self.min_sentences}")
        _check(self.max_word_length >= 1, f"c4_lines.max_word_length must be >= 1, got {self.max_word_length}")


@register_step
class C4Lines(Step):
    name = "c4_lines"
    Config = C4LinesConfig
    reasons = ("lorem_ipsum", "curly_bracket", "too_few_sentences", "empty")

    def clean(self, text: str) -> tuple[str, str | None]:
        """-> (kept text, doc drop reason or None)."""
        c = self.config
        low = text.lower()
        if c.lorem_ipsum == "doc" and "lorem ipsum" in low:
            return text, "lorem_ipsum"
        if c.curly_bracket == "doc" and "{" in text:
            return text, "curly_bracket"
        kept = []
        for line in text.split("\n"):
            line = line.strip()
            if not line:
                continue
            if c.remove_citations and "[" in line:
                line = _CITATION.sub("", line)
            if c.terminal_punct and (not line.endswith(_END_PUNCT) or line.endswith("...")):
                continue
            words = line.split()
            if len(words) < c.min_words_per_line:
                continue
            if c.max_word_length < 1000 or len(line) > 1000:
                if max(map(len, words)) > c.max_word_length:
                    continue
            ll = line.lower()
            if c.javascript and "javascript" in ll:
                continue
            if c.policy and any(p in ll for p in _POLICY):
                continue
            if c.lorem_ipsum == "line" and "lorem ipsum" in ll:
                continue
            if c.curly_bracket == "line" and "{" in line:
                continue
            kept.append(line)
        if not kept:
            return "", "empty"
        out = "\n".join(kept)
        if c.min_sentences and len(_SENTENCE_END.findall(out)) < c.min_sentences:
            return out, "too_few_sentences"
        return out, None

    def __call__(self, batch: Batch) -> Batch:
        texts = list(batch["text"])
        drops = list(batch["drop"])
        for i, t in enumerate(texts):
            if drops[i]:
                continue
            new, reason = self.clean(t)
            if reason:
                drops[i] = f"{self.name}:{reason}"
            else:
                texts[i] = new
        out = dict(batch)
        out["text"], out["drop"] = texts, drops
        return out
