"""`raygpt prep`: argument parsing only; the work is in pipelines/data/pipeline.py.

    raygpt prep --config jobs/configs/prep-english-bpe.yaml [--overwrite] [pack.block_size=512 ...]

Trailing key=value pairs override the YAML (dotted keys reach nested sections). Relative paths in
the config are resolved from the current directory (run from the repo root). User errors (bad
config, no usable input, output made with another config) are raised as UserErrors; pipelines/cli.py
prints them in one line and exits 2.
Does not: import ray before the handler runs (keeps --help fast).
"""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Turn raw text into a token dataset for `raygpt train`: read (text, JSONL, Parquet, HTML; local paths,
globs or fsspec URLs), clean, deduplicate, decontaminate, train or load a tokenizer, pack into rows of
block_size + 1 tokens, split train/val, and write Parquet shards plus manifest.json and a data card.
Runs on Ray Data (a local Ray unless ray_address is set). A finished output with the same config is
reused; one made with another config is refused unless you pass --overwrite.

  raygpt prep --config jobs/configs/prep-shakespeare-char.yaml
  raygpt prep --config jobs/configs/prep-english-bpe.yaml output=runs/data/english pack.block_size=512
  raygpt prep --config jobs/configs/prep-sft-summaries.yaml --overwrite

Config keys (YAML, or key=value after the options; dots reach nested sections): output, inputs,
steps, tokenizer.kind / tokenizer.vocab_size, pack.block_size, pack.val_fraction, kind (pretrain|sft).
Relative paths are resolved from the current directory.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prep", help="prepare token datasets on Ray Data (read, clean, dedup, tokenize, pack)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    cfg = build_config(args)
    from pipelines.data.pipeline import run

    run(cfg)  # PrepError / DatasetNotReadyError are UserErrors: pipelines/cli.py prints them
    return 0
