"""`raygpt prep`: argument parsing only; the work is in pipelines/data/pipeline.py.

    raygpt prep --config jobs/configs/prep-english-bpe.yaml [--overwrite] [pack.block_size=512 ...]

Trailing key=value pairs override the YAML (dotted keys reach nested sections). Relative paths in
the config are resolved from the current directory (run from the repo root). User errors (bad
config, no usable input, output made with another config) print one line and exit 2.
Does not: import ray before the handler runs (keeps --help fast).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prep", help="prepare token datasets on Ray Data (read, clean, dedup, tokenize, pack)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file of PrepConfig keys (see jobs/configs/prep-*.yaml)")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if a complete output exists")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. output=runs/data/x pack.block_size=512 tokenizer.vocab_size=4096")
    p.set_defaults(func=_prep)


def build_config(args: argparse.Namespace):
    from pipelines.config import load_config
    from pipelines.data.config import PrepConfig

    overrides = list(args.overrides or [])
    if args.overwrite:
        overrides.append("overwrite=true")
    return load_config(PrepConfig, args.config, overrides)


def _prep(args: argparse.Namespace) -> int:
    from pipelines.cli import UserError
    from pipelines.data.config import PrepError
    from pipelines.data.manifest import DatasetNotReadyError

    cfg = build_config(args)
    from pipelines.data.pipeline import run

    try:
        run(cfg)
    except (PrepError, DatasetNotReadyError) as e:
        raise UserError(str(e)) from None
    return 0
