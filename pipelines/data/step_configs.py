"""Configs of the stage-owned steps (exact_dedup, fuzzy_dedup, decontaminate): checked dataclasses only.

    from pipelines.data.step_configs import ExactDedupConfig, FuzzyDedupConfig, DecontamConfig
    steps: [{name: fuzzy_dedup, params: {threshold: 0.8}}]   # params -> FuzzyDedupConfig

A leaf module: the prep config (pipelines.data.config) validates step params against these classes and
the steps (pipelines.data.dedup, pipelines.data.decontam) run with them, so neither imports the other.
Does not: hash, read or decide anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipelines.config import ConfigError

MAX_DEDUP_PARTITIONS = 1024  # PrepConfig.dedup_partitions: at most this many shuffle partitions


@dataclass
class ExactDedupConfig:
    lowercase: bool = True
    collapse_whitespace: bool = True


@dataclass
class FuzzyDedupConfig:
    ngram_size: int = 5  # shingles are word n-grams
    num_perm: int = 128
    bands: int = 20
    rows: int = 6  # bands * rows <= num_perm; candidate threshold ~ (1/bands)^(1/rows)
    threshold: float = 0.8  # Jaccard at/above which two documents are near-duplicates
    verify: Literal["exact", "signature"] = "exact"  # exact Jaccard of the shingle sets, or MinHash estimate
    seed: int = 1
    max_bucket: int = 5000  # bigger buckets (boilerplate) only pair their smallest member with the rest

    def __post_init__(self) -> None:
        for k in ("ngram_size", "num_perm", "bands", "rows"):
            if getattr(self, k) < 1:
                raise ConfigError(f"fuzzy_dedup.{k}: must be >= 1, got {getattr(self, k)!r}")
        if self.bands * self.rows > self.num_perm:
            raise ConfigError(f"fuzzy_dedup: bands*rows must be <= num_perm, got {self.bands}*{self.rows} > "
                              f"{self.num_perm}; lower bands/rows or raise num_perm")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"fuzzy_dedup.threshold: must be in (0, 1], got {self.threshold!r}; e.g. 0.8")


@dataclass
class EvalSetSpec:
    path: str = ""  # path, glob or fsspec URL
    fields: list[str] = field(default_factory=lambda: ["text"])  # JSONL/Parquet/CSV fields; text files: whole file
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("decontaminate.eval_sets[].path: must be a path/glob/URL, got ''; "
                              "e.g. {path: ../shared/data/cnndm-frank/*.jsonl, fields: [article, summary]}")
        if not self.fields:
            raise ConfigError("decontaminate.eval_sets[].fields: must name at least one field, got []")


@dataclass
class DecontamConfig:
    eval_sets: list[EvalSetSpec] = field(default_factory=list)
    ngram_size: int = 13

    def __post_init__(self) -> None:
        if not self.eval_sets:
            raise ConfigError("decontaminate.eval_sets: must list at least one eval set, got []; e.g. "
                              "eval_sets: [{path: ../shared/data/cnndm-frank/*.jsonl, fields: [article, summary]}]")
        if self.ngram_size < 1:
            raise ConfigError(f"decontaminate.ngram_size: must be >= 1, got {self.ngram_size}; e.g. 13")
