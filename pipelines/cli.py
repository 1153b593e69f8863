"""The `raygpt` command: parse -> config -> <stage>.run(cfg).

    raygpt --help
    raygpt <subcommand> --help

Each stage owns its subcommands in a module exposing `register(subparsers)`; this file only wires
them together, so a stage's options live next to its code, and adds the console options (-q,
--log-level; pipelines/console.py) to every parser. Handlers import heavy libraries (torch, ray)
lazily so `--help` stays fast. Errors that are the user's (USER_ERRORS: bad config, missing file)
are caught here once: one clear message, exit 2, no traceback; handlers raise them and never print
them. Help texts are written for users; developer notes stay in module docstrings (never
`description=__doc__`).
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

DESCRIPTION = """\
raygpt: a GPT factory on Ray. Raw text in; a trained GPT and bulk generated content out.

  raygpt demo                                        # the whole pipeline on a built-in corpus (~10 min on 2 cores)
  raygpt prep --config jobs/configs/prep-shakespeare-char.yaml     # text -> token dataset (Ray Data)
  raygpt train --config jobs/configs/train-shakespeare-char.yaml   # dataset -> checkpoint (Ray Train + DeepSpeed)
  raygpt sample runs/train/shakespeare-char/checkpoints/latest --prompt 'ROMEO:'
  raygpt generate --checkpoint CKPT --input in.jsonl --output runs/gen --task summarize
  raygpt serve --checkpoint CKPT --port 8000        # OpenAI-compatible HTTP API (Ray Serve)

Every command takes -q/--quiet and --log-level LEVEL; `raygpt <command> --help` shows its options.
"""


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below `parser` (nested subcommands included), each once."""
    out: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                out += [sub, *_subparsers(sub)]
    return out


def build_parser() -> argparse.ArgumentParser:
    from pipelines import console

    parser = argparse.ArgumentParser(prog="raygpt", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from gptcore import __version__

    parser.add_argument("--version", action="version", version=f"raygpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for mod_name in SUBCOMMAND_MODULES:
        if importlib.util.find_spec(mod_name) is None:
            continue
        importlib.import_module(mod_name).register(sub)
    # -q/--quiet and --log-level on every (sub)command, before or after its name
    for p in [parser, *_subparsers(parser)]:
        console.add_options(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipelines import console

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    console.setup(getattr(args, "log_level", None), quiet=getattr(args, "quiet", False))
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
