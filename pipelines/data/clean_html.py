"""html_extract step: HTML documents -> main text (trafilatura), plain text passes through.

    batch = build_step("html_extract", {"favor": "balanced"})(batch)

Per row, a cheap look at the first 8 KB decides whether the text is HTML; only those rows pay for
trafilatura. When trafilatura finds no main text, a simple lxml pass keeps the visible text of the
page minus scripts, styles and navigation. Does not: fetch URLs, decode bytes (the decode step).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from pipelines.data.steps import Batch, Step, register_step

_DOCTYPE = re.compile(r"<!doctype\s+html|<html[\s>]|<body[\s>]|<head[\s>]", re.I)
_TAG = re.compile(r"</?(?:div|p|span|a|br|table|tr|td|li|ul|ol|meta|link|script|style|h[1-6]|img|section|"
                  r"article|nav|header|footer|form|input|strong|em|b|i)\b[^<>]{0,500}>", re.I)
_DROP_TAGS = ("script", "style", "noscript", "template", "svg", "iframe", "nav", "header", "footer",
              "aside", "form", "button", "select", "head", "menu")
_BLOCK_TAGS = frozenset(("p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section",
                         "article", "blockquote", "pre", "table", "ul", "ol", "dd", "dt", "main", "td",
                         "th", "hr", "figcaption", "address"))
_BLANKS = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")
_SPACES = re.compile(r"[ \t\u00a0]+")


def looks_like_html(text: str, min_tags: int = 5) -> bool:
    """True when the head of `text` is an HTML document or a fragment with several tags."""
    head = text[:8192]
    if "<" not in head:
        return False
    if _DOCTYPE.search(head):
        return True
    n = 0
    for _ in _TAG.finditer(head):
        n += 1
        if n >= min_tags:
            return True
    return False


def simple_html_text(html: str) -> str:
    """Visible text of a page without scripts, styles, navigation, header/footer; "" if unparsable."""
    try:
        import lxml.html

        root = lxml.html.fromstring(html)
    except Exception:  # lxml raises on empty/odd documents; treat as no text
        return ""
    for el in list(root.iter(*_DROP_TAGS)):
        parent = el.getparent()
        if parent is not None:
            el.drop_tree()
    parts: list[str] = []

    def walk(el):
        tag = el.tag if isinstance(el.tag, str) else ""
        if tag in _BLOCK_TAGS:
            parts.append("\n")
        if el.text and tag:
            parts.append(el.text)
        for child in el:
            walk(child)
        if tag in _BLOCK_TAGS:
            parts.append("\n")
        if el.tail:
            parts.append(el.tail)

    try:
        walk(root)
    except RecursionError:  # absurdly deep trees: fall back to flat text
        parts = [root.text_content()]
    text = _SPACES.sub(" ", "".join(parts))
    text = _BLANKS.sub("\n\n", text)
    return "\n".join(line.strip() for line in text.split("\n")).strip()


@dataclasses.dataclass(frozen=True)
class HtmlExtractConfig:
    """html_extract: detect: "auto" (per row: HTML-looking rows only) or "always" (every row is HTML).
    favor: trafilatura's precision/recall trade-off. fast: skip trafilatura's fallback extractors
    (jusText/readability): on the trafilatura eval pages this is faster AND keeps/drops slightly
    better (see tests/pipelines/data/test_clean_real_data.py). include_tables / include_comments
    as in trafilatura. fallback: when trafilatura returns nothing, keep the visible text of the page.
    include_title: prepend the page <title>."""

    detect: Literal["auto", "always"] = "auto"
    favor: Literal["balanced", "precision", "recall"] = "balanced"
    fast: bool = True
    include_tables: bool = True
    include_comments: bool = False
    fallback: bool = True
    include_title: bool = False
    min_tags: int = 5

    def __post_init__(self):
        if self.min_tags < 1:
            raise ValueError(f"html_extract.min_tags must be >= 1, got {self.min_tags}")


@register_step
class HtmlExtract(Step):
    name = "html_extract"
    Config = HtmlExtractConfig
    columns = {"is_html": False}
    reasons = ("empty_after_extraction",)

    def extract(self, html: str) -> str:
        import trafilatura

        cfg = self.config
        try:
            text = trafilatura.extract(
                html, output_format="txt", fast=cfg.fast, favor_precision=cfg.favor == "precision",
                favor_recall=cfg.favor == "recall", include_comments=cfg.include_comments,
                include_tables=cfg.include_tables, include_images=False, include_links=False,
                with_metadata=False, deduplicate=False)
        except Exception:  # trafilatura/lxml on malformed input: use the fallback below
            text = None
        if not text and cfg.fallback:
            text = simple_html_text(html)
        if text and cfg.include_title:
            m = re.search(r"<title[^>]*>([^<]{1,300})</title>", html[:65536], re.I)
            if m:
                import html as html_lib

                title = html_lib.unescape(m.group(1)).strip()
                if title and not text.startswith(title):
                    text = f"{title}\n\n{text}"
        return text or ""

    def __call__(self, batch: Batch) -> Batch:
        texts = list(batch["text"])
        drops = list(batch["drop"])
        is_html = list(batch.get("is_html") or [False] * len(texts))
        always = self.config.detect == "always"
        for i, t in enumerate(texts):
            if drops[i] or not (always or looks_like_html(t, self.config.min_tags)):
                continue
            is_html[i] = True
            new = self.extract(t)
            if not new.strip():
                drops[i] = f"{self.name}:empty_after_extraction"
            else:
                texts[i] = new
        out = dict(batch)
        out["text"], out["drop"], out["is_html"] = texts, drops, is_html
        return out
