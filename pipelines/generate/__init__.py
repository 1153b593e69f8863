"""Batch generation on Ray Data with exactly-once output shards (`raygpt generate`), plus summary
evaluation (`raygpt eval summaries`). `run(cfg)` is the stage's single entry point.

    from pipelines.generate import GenerateConfig, run

Does not: import ray, torch or pyarrow at import time (the `raygpt` CLI imports this package to build
its --help); run() imports the pipeline when called.
"""

from typing import Any

from pipelines.generate.config import GenerateConfig, GenerateTesting


def run(cfg: GenerateConfig) -> dict[str, Any]:
    # function-level on purpose: pipelines.generate.pipeline imports ray and torch (see the docstring)
    from pipelines.generate.pipeline import run as _run

    return _run(cfg)


__all__ = ["GenerateConfig", "GenerateTesting", "run"]
