"""pii_redact step: e-mail addresses, phone numbers and IP addresses -> placeholders.

    batch = build_step("pii_redact", {})(batch)   # "mail bob@example.com" -> "mail <EMAIL>"
    redact_pii("call +1 (555) 123-4567")          # -> ("call <PHONE>", 1)

Candidates are found with regexes and then validated (IPs through the `ipaddress` module, phone
numbers by digit count and shape) so that version numbers (1.2.3, v10.0.0.1), dates (2023-01-15,
12.05.2023), times, prices and plain numbers stay. The number of redactions per document goes to
the `pii_redactions` column. Does not: detect names, street addresses or IDs (no NER model).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

from pipelines.data.steps import Batch, Step, register_step

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,63}[A-Za-z0-9_%+-])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-]|\.[A-Za-z0-9])")

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.:])({_OCTET}(?:\.{_OCTET}){{3}})(?![\w-]|\.\d)")
# IPv6 candidate: hex groups with colons (optionally an embedded IPv4 tail, a zone id), validated below
_IPV6 = re.compile(r"(?<![\w:.])((?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|:|"
                   r"\d{1,3}(?:\.\d{1,3}){3})(?:%\w+)?)(?![\w:]|\.\w)")
# a version or release context right before a dotted quad ("v1.2.3.4", "version 10.0.0.1")
_VERSION_CONTEXT = re.compile(r"\b(?:v|version|release|build|ver\.?)\s*$", re.I)

# Phone numbers: international (+CC ...), North American ((555) 123-4567, 555-123-4567, 555.123.4567),
# or a trunk-prefixed national number (020 7946 0958, 030-12345678). Digits are counted afterwards.
_PHONE = re.compile(
    r"(?<![\w+.\-/])(?:"
    r"\+\d{1,3}[ .\-]?(?:\(0?\d{1,4}\)[ .\-]?)?\d{1,4}(?:[ .\-]?\d{2,4}){1,4}"
    r"|\(\d{3}\)[ .\-]?\d{3}[ .\-]\d{4}"
    r"|\d{3}([.\-])\d{3}\1\d{4}"
    r"|\d{3} \d{3} \d{4}"
    r"|0\d{2,4}[ \-/]\d{3,4}[ \-]?\d{3,4}"
    r")(?![\w\-]|[.,]\d)")
_DATE_LIKE = re.compile(r"^(?:19|20)\d\d[.\-/ ](?:0?[1-9]|1[0-2])[.\-/ ](?:0?[1-9]|[12]\d|3[01])$")


def _valid_phone(s: str) -> bool:
    digits = sum(ch.isdigit() for ch in s)
    if not 7 <= digits <= 15:
        return False
    if _DATE_LIKE.match(s):
        return False
    if not s.startswith("+") and digits < 10:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class PiiRedactConfig:
    """pii_redact: which kinds to redact and their placeholders."""

    emails: bool = True
    phones: bool = True
    ips: bool = True
    email_token: str = "<EMAIL>"
    phone_token: str = "<PHONE>"
    ip_token: str = "<IP_ADDRESS>"


# Every IPv4 address and phone number lies inside a run of these characters: one cheap scan finds
# the few places where the exact (slower) patterns have to look.
_NUM_RUN = re.compile(r"[+(0-9][0-9()+. /\-]{6,}")
_V6_HINT = re.compile(r":[0-9A-Fa-f]{1,4}:")


def _find(text: str, cfg: PiiRedactConfig) -> list[tuple[int, int, str]]:
    """Spans to redact as (start, end, placeholder), possibly overlapping, in priority order."""
    found: list[tuple[int, int, str]] = []
    n = len(text)
    if cfg.emails:
        at = text.find("@")
        while at >= 0:  # the e-mail pattern runs only around each "@" (it is slow on whole texts)
            nxt = at + 1
            for m in _EMAIL.finditer(text, max(0, at - 66), min(n, at + 256)):
                if m.start() > at:
                    break
                if at < m.end():
                    found.append((m.start(), m.end(), cfg.email_token))
                    nxt = m.end()
                    break
            at = text.find("@", nxt)
    if cfg.ips or cfg.phones:
        for run in _NUM_RUN.finditer(text):
            s, e = run.span()
            end = min(n, e + 2)  # the patterns' lookaheads read up to two characters past the run
            if cfg.ips and "." in run.group():
                for m in _IPV4.finditer(text, s, end):
                    if not _VERSION_CONTEXT.search(text, max(0, m.start() - 12), m.start()):
                        found.append((m.start(), m.end(), cfg.ip_token))
            if cfg.phones:
                for m in _PHONE.finditer(text, s, end):
                    if _valid_phone(m.group(0)):
                        found.append((m.start(), m.end(), cfg.phone_token))
    if cfg.ips and ("::" in text or _V6_HINT.search(text)):
        for m in _IPV6.finditer(text):
            cand = m.group(1)
            try:
                ipaddress.IPv6Address(cand.split("%", 1)[0])
            except ValueError:
                continue
            found.append((m.start(1), m.end(1), cfg.ip_token))
    return found


def redact_pii(text: str, config: PiiRedactConfig | None = None) -> tuple[str, int]:
    """-> (text with placeholders, number of redactions)."""
    found = _find(text, config or PiiRedactConfig())
    if not found:
        return text, 0
    pieces, last, n = [], 0, 0
    for start, end, token in sorted(found, key=lambda f: f[0]):  # stable: emails win ties
        if start < last:
            continue  # overlaps an earlier redaction
        pieces += [text[last:start], token]
        last, n = end, n + 1
    pieces.append(text[last:])
    return "".join(pieces), n


@register_step
class PiiRedact(Step):
    name = "pii_redact"
    Config = PiiRedactConfig
    columns = {"pii_redactions": 0}
    reasons = ()

    def __call__(self, batch: Batch) -> Batch:
        texts = list(batch["text"])
        drops = batch["drop"]
        counts = list(batch.get("pii_redactions") or [0] * len(texts))
        cfg = self.config
        for i, t in enumerate(texts):
            if drops[i]:
                continue
            new, k = redact_pii(t, cfg)
            if k:
                texts[i] = new
                counts[i] += k
        out = dict(batch)
        out["text"], out["pii_redactions"] = texts, counts
        return out
