"""Data-prep step protocol: the Step base class, Filter/Cleaner helpers, STEP_REGISTRY and build_step.

    from pipelines.data.steps import build_step
    step = build_step("gopher_quality", {"min_words": 50})
    batch = step({"text": [...], "drop": [""] * n, "doc_id": [...], "source": [...]})

A batch is a dict of equal-length Python lists. `text` and `drop` are always present; `drop[i] == ""`
means row i is alive, otherwise it holds "<step name>:<reason>". A step touches alive rows only,
never changes the number of rows (except splitters, `splits_rows = True`) and returns a new dict
(input lists are not mutated). The concrete steps live in pipelines/data/clean*.py and register
themselves here on import. Does not: read files, run Ray, deduplicate or tokenize (pipelines.data.*).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import string
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from pipelines.config import ConfigError, from_dict

Batch = dict[str, list]

# Modules whose import registers the built-in steps (imported at the bottom of this file).
BUILTIN_STEP_MODULES = ("pipelines.data.clean_decode", "pipelines.data.clean", "pipelines.data.clean_html",
                        "pipelines.data.clean_langid", "pipelines.data.clean_quality", "pipelines.data.clean_pii")

STEP_REGISTRY: dict[str, type[Step]] = {}


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: make `cls` buildable by name from a pipeline config."""
    if not getattr(cls, "name", ""):
        raise TypeError(f"step class {cls.__name__} needs a non-empty `name`")
    other = STEP_REGISTRY.get(cls.name)
    if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"step name {cls.name!r} is already registered by {other.__module__}.{other.__qualname__}")
    STEP_REGISTRY[cls.name] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class NoParams:
    """Config of a step that takes no parameters."""


class Step:
    """Base class of every data-prep step.

    Subclasses set `name`, a frozen dataclass `Config` (defaults that work offline, checked in
    __post_init__), and implement `__call__(batch) -> batch`. `columns` names the extra columns the
    step writes, with the value rows it did not touch get, so every batch has the same schema.
    `reasons` lists the drop reasons the step can emit (documentation and tests; dynamic reasons such
    as `lang_xx` are written with an `xx` placeholder).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoParams
    splits_rows: ClassVar[bool] = False
    columns: ClassVar[dict[str, Any]] = {}
    reasons: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any = None, **params: Any):
        if config is None:
            config = from_dict(self.Config, params, prefix=f"{self.name}.") if params else self.Config()
        elif isinstance(config, dict):
            config = from_dict(self.Config, {**config, **params}, prefix=f"{self.name}.")
        elif params:
            config = dataclasses.replace(config, **params)
        if not isinstance(config, self.Config):
            raise ConfigError(f"step {self.name!r}: config must be a {self.Config.__name__} or a dict, "
                              f"got {type(config).__name__}")
        self.config = config
        self.setup()

    def setup(self) -> None:
        """Precompute what __call__ needs (regexes, tables); called once after config is set."""

    def __call__(self, batch: Batch) -> Batch:  # pragma: no cover - abstract
        raise NotImplementedError

    def _reason(self, reason: str) -> str:
        return f"{self.name}:{reason}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.config == other.config  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self.config)))  # configs may hold lists


class Filter(Step):
    """A step that only marks rows dropped: implement `reason(text) -> str | None`."""

    def reason(self, text: str) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, batch: Batch) -> Batch:
        drops = list(batch["drop"])
        prefix = self.name + ":"
        reason = self.reason
        for i, t in enumerate(batch["text"]):
            if not drops[i]:
                r = reason(t)
                if r:
                    drops[i] = prefix + r
        out = dict(batch)
        out["drop"] = drops
        return out


class Cleaner(Step):
    """A step that rewrites text: implement `clean(text) -> str`; an all-blank result drops the row
    with reason `empty_reason`."""

    empty_reason: ClassVar[str] = "empty"

    def clean(self, text: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, batch: Batch) -> Batch:
        texts = list(batch["text"])
        drops = list(batch["drop"])
        clean = self.clean
        dropped = f"{self.name}:{self.empty_reason}"
        for i, t in enumerate(texts):
            if drops[i]:
                continue
            new = clean(t)
            if not new or new.isspace():
                drops[i] = dropped
            else:
                texts[i] = new
        out = dict(batch)
        out["text"] = texts
        out["drop"] = drops
        return out


def build_step(name: str, params: dict[str, Any] | None = None) -> Step:
    """Build the registered step `name` from its config section (unknown keys and bad values refused)."""
    if name not in STEP_REGISTRY:
        raise ConfigError(f"steps: unknown step name {name!r}; valid names: {sorted(STEP_REGISTRY)}")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"steps.{name}.params: expected a mapping of parameters, got {params!r}")
    cls = STEP_REGISTRY[name]
    try:
        return cls(dict(params or {}))
    except ConfigError:
        raise
    except ValueError as e:  # a Config.__post_init__ check
        raise ConfigError(f"steps.{name}.params: {e}") from None


def build_steps(specs: Iterable[dict[str, Any]]) -> list[Step]:
    """[{name: ..., params: {...}}, ...] -> steps, in order. Splitters must come before any filter."""
    steps: list[Step] = []
    for k, spec in enumerate(specs):
        if not isinstance(spec, dict) or "name" not in spec or set(spec) - {"name", "params"}:
            raise ConfigError(f"steps[{k}]: expected {{name: <step>, params: {{...}}}}, got {spec!r}")
        steps.append(build_step(spec["name"], spec.get("params")))
    seen_non_splitter = None
    for s in steps:
        if s.splits_rows and seen_non_splitter is not None:
            raise ConfigError(f"steps: splitter {s.name!r} must come before {seen_non_splitter!r} "
                              f"(splitters run before any filter or cleaner)")
        if not s.splits_rows and s.name != "decode":
            seen_non_splitter = seen_non_splitter or s.name
    return steps


# ----------------------------------------------------------------------------- batch helpers

def make_batch(texts: Iterable[str], **columns: list) -> Batch:
    """A batch from texts (tests, benchmarks): drop="", doc_id="d<i>", source="mem" unless given."""
    texts = list(texts)
    n = len(texts)
    batch: Batch = {"text": texts, "drop": [""] * n, "doc_id": [f"d{i}" for i in range(n)],
                    "source": ["mem"] * n}
    for k, v in columns.items():
        if len(v) != n:
            raise ValueError(f"column {k!r} has {len(v)} rows, text has {n}")
        batch[k] = list(v)
    return batch


def alive_count(batch: Batch) -> int:
    return sum(1 for d in batch["drop"] if not d)


def run_steps(steps: Iterable[Step | Callable[[Batch], Batch]], batch: Batch,
              ledger: dict[str, dict[str, Any]] | None = None) -> Batch:
    """Apply steps in order the way the pipeline does (dropped rows' text set to "" after each step),
    accumulating a per-step ledger {name: {rows_in, rows_out, drops: {reason: n}}} when given."""
    for step in steps:
        name = getattr(step, "name", type(step).__name__)
        before = batch["drop"]
        rows_in = sum(1 for d in before if not d)
        batch = step(batch)
        drops = batch["drop"]
        if ledger is not None and not getattr(step, "splits_rows", False):
            entry = ledger.setdefault(name, {"rows_in": 0, "rows_out": 0, "drops": {}})
            entry["rows_in"] += rows_in
            for old, new in zip(before, drops):
                if not old:
                    if new:
                        r = new.split(":", 1)[1] if new.startswith(name + ":") else new
                        entry["drops"][r] = entry["drops"].get(r, 0) + 1
                    else:
                        entry["rows_out"] += 1
        texts = batch["text"]
        if any(d and t for d, t in zip(drops, texts)):
            batch = dict(batch)
            batch["text"] = ["" if d else t for d, t in zip(drops, texts)]
    return batch


# ----------------------------------------------------------------------------- text utilities

PUNCTUATION = string.punctuation + "¡¿«»‹›“”„‘’‚–—…·•′″、。，！？：；（）［］【】《》〈〉「」『』"
_PUNCT_SET = frozenset(PUNCTUATION)
_WORD_RE = re.compile(r"\w+(?:['’]\w+)*")


def split_words(text: str) -> list[str]:
    """Whitespace tokens with surrounding punctuation removed; pure-punctuation tokens dropped."""
    out = []
    for w in text.split():
        w = w.strip(PUNCTUATION)
        if w:
            out.append(w)
    return out


def word_tokens(text: str) -> list[str]:
    """Runs of word characters (apostrophes inside words kept): a C-speed tokenizer for counting."""
    return _WORD_RE.findall(text)


def is_punctuation(token: str) -> bool:
    return all(c in _PUNCT_SET for c in token)


# Register the built-in steps (at the bottom: those modules import the names above; importing one of
# them first also works, it registers itself once this module is done).
for _mod in BUILTIN_STEP_MODULES:
    importlib.import_module(_mod)
del _mod
