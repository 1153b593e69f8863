"""decode step: undecoded bytes (the `raw` column) -> text, for any input, never raising.

    text, encoding = decode_bytes(data)            # (None, "binary" | "undecodable") when it cannot
    batch = build_step("decode", {})(batch)        # fills `text` and `encoding`, or drops "decode:<reason>"

Order: byte-order marks; binary detection (NUL/control bytes, with BOM-less UTF-16 rescued); ASCII
including the 7-bit CJK encodings (ISO-2022, HZ); UTF-8 (tolerating a cut last character);
configured encodings and an HTML <meta charset>; then charset-normalizer among common code pages,
with near-ties broken by whether the non-ASCII characters inside Latin words decode to letters and
by how common the code page is. Does not: guess font-specific legacy encodings (no Unicode mapping).
"""

from __future__ import annotations

import codecs
import dataclasses
import re

from pipelines.data.steps import Batch, Step, register_step


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# Bytes that never appear in text in any encoding we accept (ESC 0x1b is kept: ISO-2022 uses it).
_CTRL_BYTES = bytes(b for b in range(32) if b not in (9, 10, 12, 13, 27)) + b"\x7f"
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),  # before UTF-16 (prefix)
    (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_APOSTROPHES = frozenset("\u2019\u2018\u00b4\u02bb\u02bc\u0060\u00b7")  # legitimately inside words


def _latin_letter(c: str) -> bool:
    """A character that can sit inside a Latin-script word: Latin letters, apostrophe-likes."""
    return (c <= "\u024f" or "\u1e00" <= c <= "\u1eff") and c.isalpha() or c in _APOSTROPHES


_IN_WORD_NON_ASCII = re.compile(r"(?<=[A-Za-z])[^\x00-\x7f](?=[A-Za-z])")
_META_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]{2,40})""", re.I)


# Encodings the detector chooses among by default: the legacy code pages real text comes in. Leaving
# out rare DOS/Mac pages (cp775, cp850, hp_roman8, ...) stops short texts with a few accented
# letters from being "detected" as one of them.
COMMON_ENCODINGS = (
    "cp1252", "latin_1", "iso8859_15", "cp1250", "iso8859_2", "cp1251", "koi8_r", "koi8_u", "iso8859_5", "cp1253",
    "iso8859_7", "cp1254", "iso8859_9", "cp1255", "iso8859_8", "cp1256", "iso8859_6", "cp1257",
    "iso8859_13", "iso8859_4", "cp1258", "tis_620", "cp874", "shift_jis", "cp932", "euc_jp", "iso2022_jp",
    "gb2312", "gb18030", "big5", "big5hkscs", "euc_kr", "cp949", "hz", "ptcp154", "kz1048", "mac_roman",
    "utf_16", "utf_32",
)


def _codec_name(name: str) -> str | None:
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """decode: bytes in the `raw` column -> `text`.

    encodings: codecs tried (strictly) after UTF-8 and before detection, e.g. ["cp1251"] for a known
    legacy corpus. detect: use charset-normalizer when nothing else fits. max_chaos: its mess
    threshold (0.2 is its default; 0.5 also accepts hand-made mixed-script files). fallback: a codec
    to force when nothing works ("" = drop as decode:undecodable). max_control_ratio: share of
    control bytes (NUL etc.) above which the bytes are binary. max_replacement_ratio: share of
    U+FFFD tolerated in a lossy decode (truncated UTF-8 tails, a few broken bytes).
    """

    encodings: list[str] = dataclasses.field(default_factory=list)
    detect: bool = True
    detect_candidates: list[str] = dataclasses.field(default_factory=lambda: list(COMMON_ENCODINGS))
    max_chaos: float = 0.5
    detect_max_bytes: int = 65536
    fallback: str = ""
    max_control_ratio: float = 0.01
    max_replacement_ratio: float = 0.01
    record_encoding: bool = True
    keep_raw: bool = False

    def __post_init__(self):
        for enc in list(self.encodings) + list(self.detect_candidates) + ([self.fallback] if self.fallback else []):
            _check(_codec_name(enc) is not None,
                   f"decode.encodings/fallback: unknown codec {enc!r}; use a Python codec name such as "
                   f"'cp1252', 'latin-1', 'cp1251', 'shift_jis'")
        _check(0.0 < self.max_chaos <= 1.0, f"decode.max_chaos must be in (0, 1], got {self.max_chaos}")
        _check(self.detect_max_bytes >= 512, f"decode.detect_max_bytes must be >= 512, got {self.detect_max_bytes}")
        _check(0.0 <= self.max_control_ratio < 1.0,
               f"decode.max_control_ratio must be in [0, 1), got {self.max_control_ratio}")
        _check(0.0 <= self.max_replacement_ratio < 1.0,
               f"decode.max_replacement_ratio must be in [0, 1), got {self.max_replacement_ratio}")


def _try_decode(data: bytes, enc: str, cfg: DecodeConfig) -> str | None:
    """Strict decode, or a lossy one when only a few bytes are broken (a file cut mid-character)."""
    try:
        return data.decode(enc)
    except UnicodeDecodeError:
        pass
    except LookupError:
        return None
    text = data.decode(enc, "replace")
    bad = text.count("\ufffd")
    return text if bad <= 2 + cfg.max_replacement_ratio * len(text) else None


def _detect(data: bytes, cfg: DecodeConfig) -> tuple[str, str] | None:
    """Statistical detection on a prefix, then decode everything with the winner (None: nothing fits)."""
    try:
        from charset_normalizer import from_bytes

        matches = list(from_bytes(data[: cfg.detect_max_bytes], threshold=cfg.max_chaos,
                                  cp_isolation=list(cfg.detect_candidates) or None))
    except Exception:  # the detector must never take the pipeline down
        matches = []
    if matches:
        # Short texts with a few accented letters fit many code pages about equally well. Among
        # the near-best candidates prefer the one whose non-ASCII characters inside words are
        # letters (a wrong page turns "ä" into "‰"), then the more common encoding.
        rank = {_codec_name(e): k for k, e in enumerate(cfg.detect_candidates)}
        near = [(str(m), m.chaos, m.coherence, m.could_be_from_charset or [m.encoding])
                for m in matches if m.chaos <= matches[0].chaos + 0.05]
        if cfg.detect_candidates and _codec_name(cfg.detect_candidates[0]) not in {
                _codec_name(e) for *_, encs in near for e in encs}:
            # the most common page always competes (the mess detector can reject it for a few symbols)
            alt = _try_decode(data[: cfg.detect_max_bytes], cfg.detect_candidates[0], cfg)
            if alt is not None:
                near.append((alt, cfg.max_chaos, 0.0, [cfg.detect_candidates[0]]))
        scored = []
        for sample, chaos, coherence, encs in near:
            head = sample[:20000]
            odd = sum(1 for c in _IN_WORD_NON_ASCII.findall(head) if not _latin_letter(c))
            odd = round(odd / max(1, len(head) - len(head.encode("ascii", "ignore"))), 1)
            for enc in encs:
                scored.append((odd, round(chaos, 2), -round(coherence, 1),
                               rank.get(_codec_name(enc), len(rank)), enc))
        scored.sort()
        for *_, enc in scored + [(0, 0, 0, 0, m.encoding) for m in matches]:
            text = _try_decode(data, enc, cfg)
            if text is not None:
                return text, _codec_name(enc) or enc
    return None


def decode_bytes(data: bytes, cfg: DecodeConfig = DecodeConfig()) -> tuple[str | None, str]:
    """bytes -> (text, encoding) or (None, reason) with reason in {"binary", "undecodable"}.
    Never raises on any input."""
    if not data:
        return "", "empty"
    # 1. byte-order marks are authoritative
    for bom, enc in _BOMS:
        if data.startswith(bom):
            body = data[len(bom):]
            if enc.startswith("utf-16"):
                body = body[: len(body) & ~1]  # a truncated file may end mid code unit
            elif enc.startswith("utf-32"):
                body = body[: len(body) & ~3]
            text = body.decode(enc, "replace")
            if text.count("\ufffd") <= max(1, cfg.max_replacement_ratio * len(text)):
                return text, enc.replace("-le", "").replace("-be", "") if enc != "utf-8" else "utf-8-sig"
            break
    # 2. binary: NULs and other control bytes (sampled at the head, where file magic lives)
    head = data[:65536]
    n_ctrl = len(head) - len(head.translate(None, _CTRL_BYTES))
    if n_ctrl > cfg.max_control_ratio * len(head):
        nul_odd, nul_even = head[1::2].count(0), head[0::2].count(0)
        half = len(head) // 2
        # BOM-less UTF-16: one byte of each ASCII-range code unit is NUL
        for enc, nuls in (("utf-16-le", nul_odd), ("utf-16-be", nul_even)):
            if half and nuls > 0.3 * half and (nul_odd + nul_even - nuls) < 0.05 * half:
                text = data[: len(data) & ~1].decode(enc, "replace")
                if text.count("\ufffd") <= cfg.max_replacement_ratio * len(text) + 1:
                    return text, "utf-16"
        return None, "binary"
    # 3. ASCII, including 7-bit CJK encodings (ISO-2022 escapes, HZ shifts)
    if data.isascii():
        if b"\x1b$" in data:
            for enc in ("iso2022_jp_2", "iso2022_kr"):
                text = _try_decode(data, enc, cfg)
                if text is not None:
                    return text, enc
        if b"~{" in data and b"~}" in data:
            text = _try_decode(data, "hz", cfg)
            if text is not None and any("\u4e00" <= c <= "\u9fff" for c in text[:4096]):
                return text, "hz"
        return data.decode("ascii"), "utf-8"
    # 4. UTF-8, tolerating a few broken bytes (files cut mid-character) when the rest is clearly UTF-8
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text = data.decode("utf-8", "replace")
        bad = text.count("\ufffd") - data.count(b"\xef\xbf\xbd")
        non_ascii = len(text) - len(text.encode("ascii", "ignore")) - bad  # well-formed non-ASCII chars
        if bad <= cfg.max_replacement_ratio * len(text) and non_ascii >= 10 * bad:
            return text, "utf-8"
    # 5. configured legacy encodings, then an HTML <meta charset>
    candidates = list(cfg.encodings)
    m = _META_CHARSET.search(data, 0, 8192)
    if m:
        enc = _codec_name(m.group(1).decode("ascii", "ignore"))
        if enc and enc not in ("utf-8", "utf-16", "utf-32"):
            candidates.append(enc)
    for enc in candidates:
        text = _try_decode(data, enc, cfg)
        if text is not None:
            return text, _codec_name(enc) or enc
    # 6. statistical detection on a prefix, then decode everything with the winner
    if cfg.detect:
        found = _detect(data, cfg)
        if found is not None:
            return found
    if cfg.fallback:
        return data.decode(cfg.fallback, "replace"), _codec_name(cfg.fallback) or cfg.fallback
    return None, "undecodable"


@register_step
class Decode(Step):
    """raw bytes -> text. Rows whose `raw` is None keep their text (already decoded upstream)."""

    name = "decode"
    Config = DecodeConfig
    columns = {"encoding": ""}
    reasons = ("binary", "undecodable", "empty")

    def __call__(self, batch: Batch) -> Batch:
        cfg = self.config
        out = dict(batch)
        raws = batch.get("raw")
        n = len(batch["drop"])
        encodings = list(batch.get("encoding") or [""] * n)
        if raws is None:
            if cfg.record_encoding and "encoding" not in batch:
                out["encoding"] = encodings
            return out
        texts = list(batch["text"])
        drops = list(batch["drop"])
        new_raw = list(raws) if not cfg.keep_raw else raws
        for i, data in enumerate(raws):
            if drops[i] or data is None:
                continue
            if isinstance(data, str):  # tolerate an upstream that already decoded
                texts[i], encodings[i] = data, "str"
            else:
                text, enc = decode_bytes(bytes(data), cfg)
                if text is None or not text:
                    drops[i] = f"{self.name}:{enc if text is None else 'empty'}"
                    continue
                texts[i], encodings[i] = text, enc
            if not cfg.keep_raw:
                new_raw[i] = None
        out["text"], out["drop"], out["raw"] = texts, drops, new_raw
        if cfg.record_encoding:
            out["encoding"] = encodings
        return out


