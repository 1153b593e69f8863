"""GenerateConfig: everything one batch-generation run needs, validated at construction.

    from pipelines.config import load_config
    cfg = load_config(GenerateConfig, "jobs/configs/generate-summarize.yaml",
                      ["checkpoint=runs/ckpt", "input=data.jsonl", "output=out/", "sampling.max_new_tokens=64"])

`testing:` (GenerateTesting) holds test hooks; it is not for users and does not change what is generated.
Does not: read data or load models (pipelines.generate.pipeline.run does).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pipelines.config import to_dict
from pipelines.errors import ConfigError
from pipelines.generate.templates import TASKS, TemplateError, fields

# keys that do not change what is generated: a resume may change them freely
RUNTIME_KEYS = ("batch_size", "concurrency", "num_cpus", "num_gpus", "device", "torch_threads",
                "max_restarts", "max_task_retries", "ray_address", "testing", "overwrite",
                "progress", "input", "output", "limit", "driver_max_bytes")


@dataclass
class GenerateTesting:
    """Test hooks of batch generation: NOT FOR USERS (kill/resume tests and demos only; no stability promise).

        raygpt generate ... testing.pid_dir=/tmp/pids testing.debug_delay_s=0.5
    """
    pid_dir: str | None = None  # each actor writes `actor-<pid>.pid` (pid, batches done) here
    debug_delay_s: float = 0.0  # each actor sleeps this long after each batch

    def __post_init__(self) -> None:
        if not self.debug_delay_s >= 0:
            raise ConfigError(f"testing.debug_delay_s must be >= 0, got {self.debug_delay_s!r}; use 0 for no delay")


@dataclass
class GenerateConfig:
    checkpoint: str = ""  # raygpt checkpoint directory (local path, or any fsspec URL: copied once per node)
    input: str = ""  # file, directory or glob; any fsspec URL (s3://, gs://, file://, plain path)
    output: str = ""  # output directory (fsspec URL): data/part-*.parquet + manifest.json (written last)
    task: str = "complete"  # summarize | article | complete: picks the default prompt template
    input_format: Literal["auto", "parquet", "jsonl", "csv"] = "auto"  # auto: from file extensions
    id_column: str = "auto"  # "auto": column `id` if present, else a hash of the row; "": always hash
    template: str | None = None  # prompt template, e.g. "{article}\n\nTL;DR:" (None: the task default)
    max_field_chars: int = 0  # cut each template field to this many characters (0: no cut)
    keep_columns: list[str] = field(default_factory=list)  # input columns copied to the output
    param_columns: list[str] | None = None  # per-row sampling columns; None: every column named like a
    #                                         SamplingParams field (temperature, top_p, n, seed, ...)
    sampling: dict[str, Any] = field(default_factory=dict)  # default SamplingParams for every row
    seed: int = 0  # base seed; each row gets seed = hash(seed, id) unless a `seed` column gives one
    chunk_rows: int = 256  # ids per committed output shard (the unit of resume)
    batch_size: int = 16  # rows per actor call = per engine batch (rows arrive sorted by prompt length)
    concurrency: int = 1  # actors in the pool (each loads the checkpoint once)
    driver_max_bytes: int = 64 << 20  # inputs up to this size are read, prepared and ordered on the driver
    #                                   (no Ray tasks before the actors start); bigger ones go through Ray
    #                                   Data read/map_batches tasks and a distributed sort. 0: always Ray Data
    num_cpus: float = 1.0  # CPUs reserved per actor
    num_gpus: float = 0.0  # GPUs per actor (fractions allowed)
    device: str = "auto"  # auto: cuda when the actor got a GPU, else cpu
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    torch_threads: int = 0  # torch.set_num_threads in each actor (0: leave torch's default)
    max_restarts: int = 3  # actor restarts after a crash (Ray re-runs its unfinished batches)
    max_task_retries: int = 3  # retries of one batch on a restarted actor
    quality: Literal["off", "flag", "drop"] = "flag"  # empty / repetitive outputs: keep with a reason, or drop
    limit: int = 0  # only the first N ids (in id order); 0: all. For smoke runs
    overwrite: bool = False  # allow an output that was started with a different config (deletes its shards)
    ray_address: str | None = None  # None: the job's cluster, or a new local Ray; "local"; "auto"; ray://...
    progress: bool = False  # Ray Data progress bars
    testing: GenerateTesting = field(default_factory=GenerateTesting)  # test hooks, not for users

    def __post_init__(self) -> None:
        errors: list[str] = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                errors.append(msg)

        for name in ("checkpoint", "input", "output"):
            v = getattr(self, name)
            need(isinstance(v, str) and v.strip() != "",
                 f"{name} is required (got {v!r}); pass --{name} URI or {name}=URI")
        need(self.task in TASKS, f"task must be one of {list(TASKS)}, got {self.task!r}")
        for name, lo in (("chunk_rows", 1), ("batch_size", 1), ("concurrency", 1)):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= lo, f"{name} must be an integer >= {lo}, got {v!r}")
        for name in ("max_field_chars", "torch_threads", "limit", "driver_max_bytes"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 0, f"{name} must be an integer >= 0, got {v!r}; use 0 to disable")
        for name in ("max_restarts", "max_task_retries"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= -1, f"{name} must be an integer >= -1 (-1: unlimited), got {v!r}")
        need(self.num_cpus >= 0, f"num_cpus must be >= 0, got {self.num_cpus!r}")
        need(self.num_gpus >= 0, f"num_gpus must be >= 0, got {self.num_gpus!r}; use 0 on CPU-only clusters")
        need(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
             f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        need(self.device == "auto" or not self.device.startswith("cuda") or self.num_gpus > 0,
             f"device={self.device!r} needs num_gpus > 0 (got {self.num_gpus}); set num_gpus=1")
        if self.template is not None:
            try:
                fields(self.template)
            except TemplateError as e:
                errors.append(f"template: {e}")
        if not isinstance(self.sampling, dict):
            errors.append(f"sampling must be a mapping of SamplingParams fields, got {self.sampling!r}")
        else:
            errors.extend(validate_sampling(self.sampling, where="sampling"))
        if errors:
            raise ConfigError("invalid GenerateConfig:\n  - " + "\n  - ".join(errors))

    def generation_key(self) -> dict[str, Any]:
        """The settings that decide WHAT is generated (a resume must not change them)."""
        d = to_dict(self)
        return {k: v for k, v in d.items() if k not in RUNTIME_KEYS}


def sampling_fields() -> list[str]:
    # gptcore.sampling imports torch: imported here so that `raygpt --help` (which imports this
    # package through pipelines.generate.cli) and config checks without sampling stay light
    from gptcore.sampling import SamplingParams

    return [f.name for f in dataclasses.fields(SamplingParams)]


def validate_sampling(d: dict[str, Any], where: str = "sampling") -> list[str]:
    """Problems with a dict of SamplingParams defaults (unknown keys, invalid values)."""
    from gptcore.sampling import SamplingParams  # torch: see sampling_fields

    known = sampling_fields()
    unknown = sorted(set(d) - set(known))
    if unknown:
        return [f"{where}: unknown key(s) {unknown}; valid keys are {known}"]
    try:
        SamplingParams.from_dict(dict(d))
    except (ValueError, TypeError) as e:
        return [f"{where}: {e}"]
    return []
