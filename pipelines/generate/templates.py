"""Prompt templates for batch generation: one default per task, overridable in the run config.

    from pipelines.generate.templates import resolve_template, render
    tpl = resolve_template("summarize", None, columns=["id", "article", "summary"])  # "{article}\n\nTL;DR:"
    render(tpl, {"article": "..."}, max_field_chars=4000)

A template is a Python format string whose fields name input columns (`{article}`, `{title}`).
Each task lists candidate templates; the first one whose fields are all present in the input wins,
so the same task works on inputs that call the text `article`, `document` or `text`.
Does not: tokenize, truncate by tokens (the engine's `truncate` does), or know any model.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from typing import Any

from pipelines.errors import ConfigError

TASKS = ("summarize", "article", "complete")

# task -> candidate templates, in order of preference. "TL;DR:" is the GPT-2 paper's zero-shot
# summarization cue; "Title: ..." asks a news-trained LM to write the body.
DEFAULT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "summarize": ("{article}\n\nTL;DR:", "{document}\n\nTL;DR:", "{text}\n\nTL;DR:"),
    "article": ("Title: {title}\n\n", "{title}\n\n", "{prompt}"),
    "complete": ("{prompt}", "{text}"),
}


class TemplateError(ConfigError):
    """A template is malformed or names a column the input does not have."""


def fields(template: str) -> list[str]:
    """Column names a template uses, in order of first appearance (`{a} {b} {a}` -> [a, b])."""
    out: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise TemplateError(f"template {template!r} is not a valid format string ({e}); "
                            f"write fields as {{column}} and literal braces as {{{{ and }}}}") from None
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if name == "" or not name.isidentifier():
            raise TemplateError(f"template {template!r} has field {{{name}}}: fields must be column names "
                                f"like {{article}} (no positional {{}} or attribute access)")
        if spec or conv:
            raise TemplateError(f"template {template!r}: field {{{name}}} may not carry a format spec or "
                                f"conversion; write plain {{{name}}}")
        if name not in out:
            out.append(name)
    return out


def resolve_template(task: str, template: str | None, columns: Iterable[str]) -> str:
    """The template to use for `task` given the input's columns (explicit `template` wins)."""
    cols = list(columns)
    if template:
        missing = [f for f in fields(template) if f not in cols]
        if missing:
            raise TemplateError(f"template {template!r} uses column(s) {missing} that the input does not have; "
                                f"input columns are {cols}")
        return template
    if task not in DEFAULT_TEMPLATES:
        raise TemplateError(f"task must be one of {list(TASKS)}, got {task!r}")
    for cand in DEFAULT_TEMPLATES[task]:
        if all(f in cols for f in fields(cand)):
            return cand
    needs = [fields(c) for c in DEFAULT_TEMPLATES[task]]
    raise TemplateError(f"task {task!r} needs an input column among {[n[0] for n in needs]}, but the input "
                        f"has {cols}; rename a column or set template=\"...{{your_column}}...\"")


def render(template: str, row: Mapping[str, Any], max_field_chars: int = 0) -> str:
    """Fill `template` from one input row. None becomes ""; `max_field_chars` > 0 cuts long fields
    (keeping their start) so that the task cue at the end of the template survives."""
    values = {}
    for name in fields(template):
        v = row.get(name)
        s = "" if v is None else str(v)
        if max_field_chars and len(s) > max_field_chars:
            s = s[:max_field_chars]
        values[name] = s
    return template.format(**values)
