"""Text-cleaning steps of data prep: fix_text, normalize_whitespace, strip_boilerplate, min_length,
max_length. The other steps live next door: decode (clean_decode.py), html_extract (clean_html.py),
language_id (clean_langid.py), gopher_quality / gopher_repetition / c4_lines (clean_quality.py) and
pii_redact (clean_pii.py); pipelines/data/steps.py imports them all to fill STEP_REGISTRY.

    from pipelines.data.steps import build_step
    batch = build_step("fix_text", {})(batch)       # "cafÃ©" -> "café", NFC

Each step follows the protocol in pipelines/data/steps.py (alive rows only, counted drop reasons).
Runs inside Ray Data workers; everything here is plain Python + numpy, pickles, and loads models
(langid) lazily once per process. Does not: read files, deduplicate, tokenize.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from typing import Literal

from pipelines.data.steps import Batch, Cleaner, Filter, Step, register_step


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# ============================================================================ fix_text

def _mojibake_pairs() -> str:
    """Regex: a UTF-8 lead byte followed by a continuation byte, as the code pages ftfy undoes show
    them. Every multi-byte UTF-8 sequence misread in one of them contains such a pair."""
    leads, conts = set(), set()
    for enc in ("latin-1", "cp1252", "cp1251", "cp1250", "cp1253", "cp1254", "cp1257", "iso8859-2",
                "mac_roman", "cp437"):
        leads.update(bytes(range(0xC2, 0xF5)).decode(enc, "ignore"))
        conts.update(bytes(range(0x80, 0xC0)).decode(enc, "ignore"))
    esc = lambda chars: "".join(sorted(re.escape(c) for c in chars))  # noqa: E731
    return f"[{esc(leads)}][{esc(conts)}]"


_MOJIBAKE_PAIR = re.compile(_mojibake_pairs())
_HTML_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")  # what ftfy's unescape_html touches
_A0_AS_SPACE = re.compile("[\xc2\xc3\u0420] ")  # NBSP continuation byte turned into a space


@dataclasses.dataclass(frozen=True)
class FixTextConfig:
    """fix_text: ftfy mojibake repair + Unicode normalization. Typography (curly quotes, full-width
    forms) is kept by default; set uncurl_quotes / fix_character_width to get ftfy's defaults."""

    fix_encoding: bool = True
    unescape_html: Literal["auto", "true", "false"] = "auto"
    fix_latin_ligatures: bool = True
    fix_character_width: bool = False
    uncurl_quotes: bool = False
    remove_control_chars: bool = True
    normalization: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = "NFC"
    max_decode_length: int = 1_000_000

    def __post_init__(self):
        _check(self.max_decode_length >= 1000,
               f"fix_text.max_decode_length must be >= 1000, got {self.max_decode_length}")

    def ftfy_config(self):
        import ftfy

        return ftfy.TextFixerConfig(
            unescape_html={"auto": "auto", "true": True, "false": False}[self.unescape_html],
            fix_encoding=self.fix_encoding, fix_latin_ligatures=self.fix_latin_ligatures,
            fix_character_width=self.fix_character_width, uncurl_quotes=self.uncurl_quotes,
            remove_control_chars=self.remove_control_chars, fix_line_breaks=False,
            normalization=None if self.normalization == "none" else self.normalization,
            max_decode_length=self.max_decode_length, explain=False)


@register_step
class FixText(Cleaner):
    name = "fix_text"
    Config = FixTextConfig
    reasons = ("empty",)

    def setup(self) -> None:
        self._ftfy_cfgs = None  # built on first use (imports ftfy lazily)
        c = self.config
        odd = "\x80-\x9f\ufffd\x1b\ud800-\udfff"  # C1 controls, replacement char, escapes, surrogates
        if c.fix_latin_ligatures:
            odd += "\u0132\u0133\u0149\u01c4-\u01cc\u01f1-\u01f3\ufb00-\ufb06"
        if c.fix_character_width:
            odd += "\u3000\uff01-\uffee"
        if c.uncurl_quotes:
            odd += "\u02bc\u2018-\u201f"
        if c.remove_control_chars:
            odd += "\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc"
        # A line gives ftfy work only if it holds a mojibake pair, one of the characters above or
        # (when unescaping) an HTML entity. Only those lines go through ftfy (a few MB/s), as ftfy
        # itself fixes text line by line; everything gets Unicode normalization.
        self._triggers = [re.compile(f"[{odd}]")] + ([_MOJIBAKE_PAIR, _A0_AS_SPACE] if c.fix_encoding else [])
        self._form = None if c.normalization == "none" else c.normalization

    def _fix_segments(self, text: str) -> str:
        html = self.config.unescape_html
        unescape = html == "true" or (html == "auto" and "<" not in text)  # ftfy's own "auto" rule
        triggers = self._triggers[:1] if text.isascii() else self._triggers  # the pairs are non-ASCII
        if unescape and "&" in text:
            triggers = triggers + [_HTML_ENTITY]
        starts = sorted({m.start() for r in triggers for m in r.finditer(text)})
        if not starts:
            return text
        import ftfy

        if self._ftfy_cfgs is None:
            base = self.config.ftfy_config()
            self._ftfy_cfgs = (base, base._replace(unescape_html=False))
        cfg = self._ftfy_cfgs[0 if unescape else 1]
        pieces, last = [], 0
        for pos in starts:
            if pos < last:
                continue  # inside a line already fixed
            ls = text.rfind("\n", 0, pos) + 1
            le = text.find("\n", pos)
            le = len(text) if le < 0 else le + 1
            pieces.append(text[last:ls])
            pieces.append(ftfy.fix_text(text[ls:le], cfg))
            last = le
        pieces.append(text[last:])
        return "".join(pieces)

    def clean(self, text: str) -> str:
        text = self._fix_segments(text)
        if self._form and not text.isascii() and not unicodedata.is_normalized(self._form, text):
            text = unicodedata.normalize(self._form, text)
        return text


# ============================================================================ normalize_whitespace

_C0_C1 = {c: None for c in list(range(0, 9)) + list(range(14, 32)) + list(range(0x7F, 0xA0)) if c != 0x85}
_SPACES = {c: " " for c in (0xA0, 0x1680, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000)}
_LINE_SEPS = {0x0B: "\n", 0x0C: "\n", 0x85: "\n", 0x2028: "\n", 0x2029: "\n\n"}
# characters the translate table changes; searching for them first is much cheaper than translating
_WS_ODD = "\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029"
_WS_ODD_SPACES = "\xa0\u1680\u2000-\u200a\u202f\u205f\u3000"
_MULTI_SPACE = re.compile(r"(?<=\S)[ \t]{2,}(?=\S)")


@dataclasses.dataclass(frozen=True)
class NormalizeWhitespaceConfig:
    """normalize_whitespace: CRLF/CR -> LF, control characters removed (\\n and \\t kept), exotic
    spaces -> " ", trailing spaces removed, runs of more than max_blank_lines blank lines collapsed,
    the document stripped. collapse_spaces also squeezes runs of inner spaces (off: keeps indentation)."""

    max_blank_lines: int = 2
    unicode_spaces: bool = True
    collapse_spaces: bool = False
    strip: bool = True

    def __post_init__(self):
        _check(self.max_blank_lines >= 0,
               f"normalize_whitespace.max_blank_lines must be >= 0, got {self.max_blank_lines}")


@register_step
class NormalizeWhitespace(Cleaner):
    name = "normalize_whitespace"
    Config = NormalizeWhitespaceConfig
    reasons = ("empty",)

    def setup(self) -> None:
        table = dict(_C0_C1)
        table.update(_LINE_SEPS)
        odd = _WS_ODD
        if self.config.unicode_spaces:
            table.update(_SPACES)
            odd += _WS_ODD_SPACES
        self._table = table
        self._odd = re.compile(f"[{odd}]")
        k = self.config.max_blank_lines
        self._blank_runs = re.compile(r"\n{" + str(k + 2) + ",}")
        self._blank_repl = "\n" * (k + 1)

    def clean(self, text: str) -> str:
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self._odd.search(text):
            text = text.translate(self._table)
        if " \n" in text or "\t\n" in text:
            text = "\n".join([line.rstrip(" \t") for line in text.split("\n")])
        if self.config.collapse_spaces:
            text = _MULTI_SPACE.sub(" ", text)
        if "\n" * (self.config.max_blank_lines + 2) in text:
            text = self._blank_runs.sub(self._blank_repl, text)
        return text.strip() if self.config.strip else text.rstrip(" \t")


# ============================================================================ strip_boilerplate

_PG_START = re.compile(
    r"^[ \t]*\*{3,}[ \t]*START[ \t]+OF[ \t]+(?:THE|THIS)[ \t]+PROJECT[ \t]+GUTENBERG[^\n]*$"
    r"|^[ \t]*\*END\*THE SMALL PRINT[^\n]*$", re.I | re.M)
_PG_END = re.compile(
    r"^[ \t]*\*{3,}[ \t]*END[ \t]+OF[ \t]+(?:THE[ \t]+|THIS[ \t]+)?PROJECT[ \t]+GUTENBERG[^\n]*$"
    r"|^[ \t]*End[ \t]+of[ \t]+(?:the[ \t]+)?Project[ \t]+Gutenberg(?:'s)?[^\n]*$"
    r"|^[ \t]*\*{3,}[ \t]*START:?[ \t]*FULL[ \t]+LICENSE[^\n]*$", re.I | re.M)
_PG_PRODUCED = re.compile(
    r"\A\s*(?:Produced|Prepared|Transcribed|E-?text (?:prepared|produced)|This (?:e-?text|e-?book) was "
    r"(?:produced|prepared))[^\r\n]*(?:\r?\n[^\r\n]+)*\r?\n[ \t\r]*\n", re.I)


@dataclasses.dataclass(frozen=True)
class StripBoilerplateConfig:
    """strip_boilerplate: Project Gutenberg header (up to the `*** START OF ...` line) and footer (from
    `End of (the) Project Gutenberg ...` / `*** END OF ...`), plus the `Produced by ...` credit
    paragraph. Documents without the markers pass unchanged. Needs whole books as documents (read
    plain-text books with text_mode: file; per-paragraph documents never see both markers)."""

    gutenberg: bool = True
    drop_credits: bool = True


@register_step
class StripBoilerplate(Cleaner):
    name = "strip_boilerplate"
    Config = StripBoilerplateConfig
    reasons = ("empty",)

    def clean(self, text: str) -> str:
        if not self.config.gutenberg or ("gutenberg" not in text[:50_000].lower()
                                         and "gutenberg" not in text[-50_000:].lower()):
            return text
        m = _PG_START.search(text, 0, min(len(text), 50_000))
        start = m.end() if m else 0
        e = _PG_END.search(text, start)
        end = e.start() if e else len(text)
        if not m and not e:
            return text
        body = text[start:end]
        if m and self.config.drop_credits:
            body = _PG_PRODUCED.sub("", body, count=1)
        return body.strip("\r\n") if body.strip() else ""


# ============================================================================ length filters

@dataclasses.dataclass(frozen=True)
class MinLengthConfig:
    min_chars: int = 50

    def __post_init__(self):
        _check(self.min_chars >= 0, f"min_length.min_chars must be >= 0, got {self.min_chars}")


@register_step
class MinLength(Filter):
    """Drop documents shorter than min_chars characters (after stripping)."""

    name = "min_length"
    Config = MinLengthConfig
    reasons = ("too_short",)

    def reason(self, text: str) -> str | None:
        n = self.config.min_chars
        if len(text) < n or len(text.strip()) < n:
            return "too_short"
        return None


@dataclasses.dataclass(frozen=True)
class MaxLengthConfig:
    max_chars: int = 10_000_000
    action: Literal["drop", "truncate"] = "drop"

    def __post_init__(self):
        _check(self.max_chars >= 1, f"max_length.max_chars must be >= 1, got {self.max_chars}")


@register_step
class MaxLength(Step):
    """Drop (or truncate at a line/space boundary) documents longer than max_chars characters."""

    name = "max_length"
    Config = MaxLengthConfig
    reasons = ("too_long",)

    def __call__(self, batch: Batch) -> Batch:
        n = self.config.max_chars
        texts, drops = batch["text"], list(batch["drop"])
        new_texts = None
        for i, t in enumerate(texts):
            if drops[i] or len(t) <= n:
                continue
            if self.config.action == "drop":
                drops[i] = f"{self.name}:too_long"
            else:
                cut = t.rfind("\n", n // 2, n)
                cut = cut if cut > 0 else t.rfind(" ", n // 2, n)
                new_texts = new_texts or list(texts)
                new_texts[i] = t[: cut if cut > 0 else n]
        out = dict(batch)
        out["drop"] = drops
        if new_texts is not None:
            out["text"] = new_texts
        return out
