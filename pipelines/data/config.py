"""PrepConfig: the one validated config of the data-prep stage (raw text -> token shards + manifest).

    cfg = load_config(PrepConfig, "jobs/configs/prep-english-bpe.yaml", ["pack.block_size=512"])
    raygpt prep --config jobs/configs/prep-english-bpe.yaml pack.block_size=512

Every field is checked in __post_init__; errors name the field, the constraint, the value and the fix.
The `steps` list is the visible, ordered pipeline between reading and tokenizing: cleaning/filter steps
come from pipelines.data.steps.STEP_REGISTRY, plus the stage-owned steps exact_dedup, fuzzy_dedup and
decontaminate. Does not: run anything (pipelines.data.pipeline.run does).
"""

from __future__ import annotations

import dataclasses
import re
import string
from dataclasses import dataclass, field
from typing import Any, Literal

from pipelines.config import ConfigError, from_dict, to_dict
from pipelines.data.step_configs import MAX_DEDUP_PARTITIONS, DecontamConfig, ExactDedupConfig, FuzzyDedupConfig
from pipelines.data.steps import STEP_REGISTRY, build_step
from pipelines.errors import UserError

OWN_STEP_CONFIGS = {"exact_dedup": ExactDedupConfig, "fuzzy_dedup": FuzzyDedupConfig, "decontaminate": DecontamConfig}

FORMATS = ("auto", "text", "jsonl", "parquet", "csv")
TEXT_MODES = ("file", "line", "paragraph")
# Steps implemented by this stage itself (global or eval-set aware); all other names go to
# pipelines.data.steps.build_step.
OWN_STEPS = ("exact_dedup", "fuzzy_dedup", "decontaminate")
# Fields that only say where/how to run; they do not change the dataset and are left out of the
# config recorded in the manifest (so the same data written to two places gets the same manifest).
RUNTIME_FIELDS = ("output", "overwrite", "ray_address", "progress", "work_dir", "num_cpus", "dedup_partitions")


class PrepError(UserError, RuntimeError):
    """A user-facing prep failure (no usable input, output exists with another config...)."""


def _fail(field_name: str, constraint: str, value: Any, fix: str) -> None:
    raise ConfigError(f"{field_name}: must be {constraint}, got {value!r}; {fix}")


@dataclass
class InputSpec:
    """One input: a local path, a glob, or any fsspec URL (s3://, gs://, memory://, hf://)."""

    path: str = ""
    # auto: by extension after stripping .gz/.zst (.txt/.md/.text/none -> text, .jsonl/.ndjson/.json -> jsonl,
    # .parquet/.pq -> parquet, .csv/.tsv -> csv)
    format: Literal["auto", "text", "jsonl", "parquet", "csv"] = "auto"
    # plain text only: one document per file, per line, or per blank-line-separated paragraph
    text_mode: Literal["file", "line", "paragraph"] = "file"
    text_field: str = "text"  # jsonl / parquet / csv column holding the document text
    fields: list[str] = field(default_factory=list)  # extra record fields kept as columns (SFT templates use them)
    encoding: Literal["utf-8", "raw"] = "utf-8"  # raw: keep undecoded bytes in `raw` for a `decode` step
    storage_options: dict = field(default_factory=dict)  # passed to fsspec (e.g. endpoint_url, anon)
    max_files: int = 0  # 0 = all matched files

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            _fail("inputs[].path", "a non-empty path, glob or URL", self.path,
                  "e.g. path: ../shared/data/wikitext-2/*.txt")
        if self.max_files < 0:
            _fail("inputs[].max_files", ">= 0 (0 = all)", self.max_files, "use 0 for all files")
        if not self.text_field:
            _fail("inputs[].text_field", "a column name", self.text_field, "e.g. text_field: text")


@dataclass
class ReadSpec:
    batch_rows: int = 2048  # documents per batch handed to the steps
    batch_mb: float = 8.0  # ... or this many MB of text, whichever comes first
    max_doc_mb: float = 16.0  # longer documents/lines are dropped as read:doc_too_long (never held whole)
    range_mb: float = 8.0  # uncompressed local line/jsonl/paragraph files are split into ranges of this size

    def __post_init__(self) -> None:
        if self.batch_rows < 1:
            _fail("read.batch_rows", ">= 1", self.batch_rows, "e.g. 2048")
        for name in ("batch_mb", "max_doc_mb", "range_mb"):
            if getattr(self, name) <= 0:
                _fail(f"read.{name}", "> 0", getattr(self, name), "e.g. 8")


@dataclass
class StepSpec:
    name: str = ""
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            _fail("steps[].name", "a step name", self.name, "e.g. {name: exact_dedup}")
        if self.params is None:
            self.params = {}


@dataclass
class TokenizerSpec:
    # bpe: train a byte-level BPE; char: character vocabulary; load: read `path` (a tokenizer.json)
    kind: Literal["bpe", "char", "load"] = "bpe"
    path: str = ""
    vocab_size: int = 8192
    min_frequency: int = 2
    # training sample: the first `sample_mb` of cleaned documents in input order (deterministic); 0 = all
    sample_mb: float = 20.0
    special_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>"])

    def __post_init__(self) -> None:
        if self.kind == "load" and not self.path:
            _fail("tokenizer.path", "a tokenizer.json path when tokenizer.kind is 'load'", self.path,
                  "set tokenizer.path or use tokenizer.kind=bpe")
        if self.kind != "load" and self.path:
            _fail("tokenizer.path", "empty unless tokenizer.kind is 'load'", self.path,
                  "set tokenizer.kind=load to use an existing tokenizer")
        if self.kind == "bpe" and not 256 <= self.vocab_size <= 1_000_000:
            _fail("tokenizer.vocab_size", "between 256 and 1000000 for BPE", self.vocab_size, "e.g. 8192")
        if self.min_frequency < 1:
            _fail("tokenizer.min_frequency", ">= 1", self.min_frequency, "e.g. 2")
        if self.sample_mb < 0:
            _fail("tokenizer.sample_mb", ">= 0 (0 = all data)", self.sample_mb, "e.g. 20")


@dataclass
class PackSpec:
    block_size: int = 256  # rows hold block_size + 1 tokens (inputs + shifted targets)
    val_fraction: float = 0.05  # share sent to val: of the documents (split_by=document) or of each one's text
    split_seed: int = 0  # changes which documents land in val (split_by=document)
    # document: a document goes to val when a keyed hash of its text falls below val_fraction;
    # position: the last val_fraction of every document's characters goes to val, the rest to train
    # (nanoGPT's 90/10 split of one long text; pretraining only)
    split_by: Literal["document", "position"] = "document"

    def __post_init__(self) -> None:
        if not 1 <= self.block_size <= 1_048_576:
            _fail("pack.block_size", "between 1 and 1048576", self.block_size, "e.g. 256")
        if not 0.0 <= self.val_fraction < 1.0:
            _fail("pack.val_fraction", "in [0, 1)", self.val_fraction, "e.g. 0.05")


@dataclass
class SFTSpec:
    """Prompt/completion rendering for kind=sft. `{field}` placeholders name input record fields."""

    prompt_template: str = "{article}\n\nTL;DR: "
    completion_template: str = "{summary}<|endoftext|>"
    # pad: one example per row, padded with EOS (loss_mask 0) or truncated to block_size + 1;
    # pack: examples concatenated and cut into windows like pretraining (loss_mask kept per token)
    mode: Literal["pad", "pack"] = "pad"
    # too long examples: "prompt" keeps the prompt's start and its template tail (e.g. "\n\nTL;DR: ")
    # and cuts the middle; "drop" drops them (counted as tokenize:too_long)
    truncate: Literal["prompt", "drop"] = "prompt"
    min_prompt_tokens: int = 16  # with truncate=prompt: an example keeps at least this much prompt, else dropped

    def __post_init__(self) -> None:
        for name in ("prompt_template", "completion_template"):
            tpl = getattr(self, name)
            try:
                tpl.format_map(_AnyField())
            except (ValueError, IndexError) as e:
                _fail(f"sft.{name}", "a str.format template with {field} placeholders", tpl, f"fix it ({e})")
        if not template_fields(self.completion_template):
            _fail("sft.completion_template", "a template naming at least one {field}", self.completion_template,
                  "e.g. '{summary}<|endoftext|>'")
        if self.min_prompt_tokens < 0:
            _fail("sft.min_prompt_tokens", ">= 0", self.min_prompt_tokens, "e.g. 16")


class _AnyField(dict):
    def __missing__(self, key: str) -> str:
        return ""


def template_fields(tpl: str) -> list[str]:
    """Names of the {field} placeholders in a str.format template, in order."""
    return [f for _, f, _, _ in string.Formatter().parse(tpl) if f]


@dataclass
class WriteSpec:
    shard_mb: float = 64.0  # target uncompressed shard size (rows per shard = shard_mb / row bytes)
    compression: Literal["zstd", "snappy", "none"] = "zstd"
    row_group_rows: int = 1024
    data_card: bool = True

    def __post_init__(self) -> None:
        if self.shard_mb <= 0:
            _fail("write.shard_mb", "> 0", self.shard_mb, "e.g. 64")
        if self.row_group_rows < 1:
            _fail("write.row_group_rows", ">= 1", self.row_group_rows, "e.g. 1024")


@dataclass
class PrepConfig:
    output: str = ""  # dataset directory (local path or fsspec URL); manifest.json is written there last
    inputs: list[InputSpec] = field(default_factory=list)
    name: str = "dataset"
    kind: Literal["pretrain", "sft"] = "pretrain"
    steps: list[StepSpec] = field(default_factory=list)
    read: ReadSpec = field(default_factory=ReadSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    pack: PackSpec = field(default_factory=PackSpec)
    sft: SFTSpec = field(default_factory=SFTSpec)
    write: WriteSpec = field(default_factory=WriteSpec)
    overwrite: bool = False  # replace a complete output (otherwise it is reused as is)
    ray_address: str = ""  # "" = start (or join the already initialised) local Ray
    num_cpus: int = 0  # for a locally started Ray; 0 = all cores
    progress: bool = True  # Ray Data progress bars
    work_dir: str = ""  # intermediate files (dedup); default <output>/_work, removed at the end
    # dedup shuffle partitions (a barrier task holds one); 0 = auto: ~8 MB of key rows each, 1..1024.
    # Bounds the barrier's task memory; the output does not depend on it
    dedup_partitions: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.output, str) or not self.output.strip():
            _fail("output", "a dataset directory", self.output, "e.g. output: runs/data/english-bpe")
        if not self.inputs:
            _fail("inputs", "a non-empty list of {path: ...} entries", self.inputs,
                  "e.g. inputs: [{path: ../shared/data/tinyshakespeare/input.txt}]")
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name or ""):
            _fail("name", "letters, digits, '_', '-', '.'", self.name, "e.g. name: english-bpe")
        if self.num_cpus < 0:
            _fail("num_cpus", ">= 0 (0 = all cores)", self.num_cpus, "e.g. 0")
        if isinstance(self.dedup_partitions, bool) or not isinstance(self.dedup_partitions, int) or \
                not 0 <= self.dedup_partitions <= MAX_DEDUP_PARTITIONS:
            _fail("dedup_partitions", f"an integer from 0 (auto) to {MAX_DEDUP_PARTITIONS}", self.dedup_partitions,
                  "use 0 to size it from the input, or e.g. dedup_partitions=64")
        seen_global = []
        for i, st in enumerate(self.steps):
            validate_step(st, i)
            if st.name in ("exact_dedup", "fuzzy_dedup"):
                if st.name in seen_global:
                    _fail(f"steps[{i}].name", "listed once", st.name, "remove the repeated step")
                seen_global.append(st.name)
        if self.kind == "sft":
            needed = set(template_fields(self.sft.prompt_template) + template_fields(self.sft.completion_template))
            for j, inp in enumerate(self.inputs):
                missing = sorted(needed - set(inp.fields))
                if missing:
                    _fail(f"inputs[{j}].fields", f"a list containing the template fields {sorted(needed)}",
                          inp.fields, f"add {missing} (kind=sft renders records through sft.*_template)")
        if self.kind == "sft" and self.pack.split_by == "position":
            _fail("pack.split_by", "'document' for kind=sft (an example is never cut in two)", self.pack.split_by,
                  "use pack.split_by=document")
        if any(inp.encoding == "raw" for inp in self.inputs) and not any(s.name == "decode" for s in self.steps):
            _fail("steps", "to contain a 'decode' step when an input has encoding=raw",
                  [s.name for s in self.steps], "add {name: decode} first or use encoding: utf-8")


def validate_step(st: StepSpec, index: int) -> None:
    """Check a step's name and params now, so a typo fails before Ray starts."""
    cls = OWN_STEP_CONFIGS.get(st.name)
    if cls is None:
        if st.name not in STEP_REGISTRY:
            known = sorted(set(STEP_REGISTRY) | set(OWN_STEPS))
            raise ConfigError(f"steps[{index}].name: unknown step {st.name!r}; known steps: {known}")
        try:
            build_step(st.name, dict(st.params))
        except ConfigError as e:
            raise ConfigError(f"steps[{index}] ({st.name}): {e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"steps[{index}] ({st.name}): bad params {st.params!r}: {e}") from None
        return
    try:
        from_dict(cls, dict(st.params), prefix=f"steps[{index}].params.")
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"steps[{index}] ({st.name}): {e}") from None


def content_config(cfg: PrepConfig) -> dict:
    """The config as recorded in the manifest: everything that shapes the data, nothing about where/how."""
    d = to_dict(cfg)
    for k in RUNTIME_FIELDS:
        d.pop(k, None)
    if d.get("pack", {}).get("split_by") == "document":  # the default: datasets made before it keep their hash
        d["pack"].pop("split_by")
    for inp in d.get("inputs", []):
        # storage options can hold credentials: record only which keys were set
        inp["storage_options"] = sorted(inp.get("storage_options") or {})
    return d


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
