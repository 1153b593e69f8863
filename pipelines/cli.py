"""The `raygpt` command: parse -> config -> <stage>.run(cfg).

    raygpt --help
    raygpt <subcommand> --help

Each stage owns its subcommands in a module exposing `register(subparsers)`; this file only wires
them together, so a stage's options live next to its code. Handlers import heavy libraries (torch,
ray) lazily so `--help` stays fast. Errors that are the user's (bad config, missing file) print one
clear message and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# module -> registers these subcommands (in --help order)
SUBCOMMAND_MODULES = [
    "pipelines.core_cli",  # tokenizer, sample, export, import
    "pipelines.data.cli",  # prep
    "pipelines.train.cli",  # train
    "pipelines.generate.cli",  # generate, eval
    "pipelines.serve.cli",  # serve
    "pipelines.ops.cli",  # submit, jobs, schedule
    "pipelines.demo",  # demo
]


from pipelines.errors import USER_ERRORS, UserError  # noqa: E402,F401 - UserError re-exported for handlers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raygpt",
        description="raygpt: a GPT factory on Ray. Raw text in; a trained GPT and bulk generated content out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from gptcore import __version__

    parser.add_argument("--version", action="version", version=f"raygpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for mod_name in SUBCOMMAND_MODULES:
        if importlib.util.find_spec(mod_name) is None:
            continue
        importlib.import_module(mod_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except USER_ERRORS as e:
        print(f"raygpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"raygpt {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
