"""Batch generation on Ray Data with exactly-once output shards (`raygpt generate`), plus summary
evaluation (`raygpt eval summaries`). `run(cfg)` is the stage's single entry point."""

from pipelines.generate.config import GenerateConfig


def run(cfg: GenerateConfig) -> dict:
    from pipelines.generate.pipeline import run as _run

    return _run(cfg)


__all__ = ["GenerateConfig", "run"]
