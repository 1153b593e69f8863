"""Data preparation: raw text -> cleaned, deduplicated, tokenized, packed Parquet shards + manifest.

    from pipelines.data import run, PrepConfig
    raygpt prep --config jobs/configs/prep-english-bpe.yaml
"""

from pipelines.data.config import PrepConfig, PrepError


def run(cfg: PrepConfig):
    """Run the prep pipeline (see pipelines.data.pipeline.run); imported lazily to keep imports light."""
    from pipelines.data.pipeline import run as _run

    return _run(cfg)


__all__ = ["PrepConfig", "PrepError", "run"]
