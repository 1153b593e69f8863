"""README.md's command blocks run as written: every command, config file, config key and path resolves.

    .venv/bin/python -m pytest tests/test_readme.py -q

Every ```bash / ```sh block is read line by line (`\\` continuations joined, comments dropped). A
`raygpt ...` line is parsed by the real argparse parser; its --config is loaded with its key=value
overrides through the stage's own config loader; every path it reads must exist in the repository,
under ../shared/data (skipped without it), or be written by an earlier command of the README (a prep
output, a training run, `make demo`'s runs/demo, ...). `make X` must be a Makefile target and a script
path must be an executable file. The recipes are not run here (minutes of training each); the
tests of each stage run the same code paths with tiny settings.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared" / "data").resolve()


def command_lines(text: str) -> list[str]:
    """The commands of every ```bash / ```sh block, continuations joined, in order."""
    out = []
    for block in re.findall(r"^```(?:bash|sh)\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                out.append(line.strip())
    return out


README_COMMANDS = command_lines((REPO / "README.md").read_text())


def _shakespeare_pair_agrees() -> bool:
    import yaml

    prep = yaml.safe_load((REPO / "jobs/configs/prep-shakespeare-char.yaml").read_text())
    train = yaml.safe_load((REPO / "jobs/configs/train-shakespeare-char.yaml").read_text())
    return prep.get("output") == train.get("data")


# issue 15: prep-shakespeare-char writes runs/data/shakespeare-char, train-shakespeare-char reads
# runs/data/shakespeare-char-64; the data stage's fix makes them agree, and then this mark is inert
PENDING_SHAKESPEARE = pytest.mark.xfail(not _shakespeare_pair_agrees(), strict=True,
                                        reason="prep/train shakespeare-char configs disagree (fixed in the data stage)")


class World:
    """What the README's commands have produced so far (paths), to check that later ones can read it."""

    def __init__(self) -> None:
        self.produced: list[Path] = []
        self.prep_outputs: list[Path] = []

    def add(self, p: str | Path | None) -> None:
        if p:
            self.produced.append(Path(p))

    def resolves(self, p: str | Path) -> bool:
        path = Path(p)
        full = path if path.is_absolute() else (REPO / path)
        if any(ch in str(p) for ch in "*?["):
            return bool(list(full.parent.glob(full.name))) or self._produced(path)
        if str(full.resolve()).startswith(str(SHARED)):
            if not SHARED.is_dir():
                pytest.skip(f"{SHARED} (shared data) is absent")
            return full.exists()
        return full.exists() or self._produced(path)

    def _produced(self, path: Path) -> bool:
        return any(path == q or q in path.parents for q in self.produced)


def _parser():
    from pipelines.cli import build_parser

    return build_parser()


def _parse(argv: list[str]) -> argparse.Namespace:
    try:
        return _parser().parse_args(argv)
    except SystemExit as e:  # argparse's error exit
        raise AssertionError(f"`raygpt {shlex.join(argv)}` does not parse (exit {e.code})") from None


def _check_raygpt(argv: list[str], world: World) -> None:
    args = _parse(argv)
    assert getattr(args, "func", None), f"`raygpt {shlex.join(argv)}` names no runnable command"
    cmd = args.command
    if getattr(args, "config", None) and cmd not in ("schedule",):
        assert (REPO / args.config).is_file(), f"`raygpt {shlex.join(argv)}`: --config {args.config} does not exist"
    check = CHECKS.get(cmd)
    if check:
        check(args, world)


def _need(world: World, p: str, what: str) -> None:
    assert world.resolves(p), f"{what} {p!r} neither exists nor is written by an earlier README command"


def _prep(args, world):
    from pipelines.data.cli import build_config

    cfg = build_config(args)
    for inp in cfg.inputs:
        _need(world, inp.path, "prep input")
    world.add(cfg.output)
    world.prep_outputs.append(Path(cfg.output))


def _train(args, world):
    import json

    from pipelines.config import load_config
    from pipelines.train.config import TrainConfig

    if args.resume:
        _need(world, args.resume, "--resume")
        base = None
        saved = REPO / args.resume / "config.json"
        if not args.config and saved.is_file():
            base = json.loads(saved.read_text())["config"]
        if not args.config and base is None:
            return  # the run is made by an earlier README command; its config was checked there
    cfg = load_config(TrainConfig, args.config, args.overrides, base=base if args.resume else None)
    _need(world, cfg.data, "training data")
    if cfg.init_path:
        _need(world, cfg.init_path, "init_path")
    world.add(cfg.run_dir)
    world.trains = getattr(world, "trains", []) + [cfg]


def _sample(args, world):
    _need(world, args.ckpt, "checkpoint")


def _export(args, world):
    _need(world, args.ckpt, "checkpoint")
    world.add(args.out)


def _import(args, world):
    _need(world, args.src, "Hugging Face directory")
    world.add(args.ckpt)


def _serve(args, world):
    from pipelines.serve.config import load_serve_config

    overrides = list(args.overrides or []) + ([f"checkpoint={args.checkpoint}"] if args.checkpoint else [])
    cfg = load_serve_config(args.config, overrides)
    _need(world, cfg.checkpoint, "checkpoint")


def _generate(args, world):
    from pipelines.generate.cli import build_config

    cfg = build_config(args)
    _need(world, cfg.checkpoint, "checkpoint")
    _need(world, cfg.input, "input")
    world.add(cfg.output)


def _eval(args, world):
    if args.generated:
        _need(world, args.generated, "--generated")
    _need(world, args.references, "--references")


def _demo(args, world):
    from pipelines.config import load_config
    from pipelines.demo import DemoConfig

    overrides = list(args.overrides or []) + ([f"corpus={args.corpus}"] if args.corpus else [])
    cfg = load_config(DemoConfig, args.config, overrides)
    world.add(cfg.out)


def _tokenizer(args, world):
    for p in args.input:
        _need(world, p, "--input")
    world.add(args.out)


def _init(args, world):
    _need(world, args.tokenizer, "--tokenizer")
    world.add(args.ckpt)


def _submit(args, world):
    from pipelines.ops.cli import _own_and_job_args, _submit_options

    job = _own_and_job_args(_submit_options, args, args.rest, f"raygpt submit {args.stage}")
    assert args.address, "raygpt submit needs --address"
    _check_raygpt([args.stage, *job], world)  # the job's own arguments, as the stage parses them


def _schedule(args, world):
    from pipelines.ops.schedule import CronExpr

    CronExpr.parse(args.at)
    if getattr(args, "output", None):
        world.add(args.output)


CHECKS = {"prep": _prep, "train": _train, "sample": _sample, "export": _export, "import": _import,
          "serve": _serve, "generate": _generate, "eval": _eval, "demo": _demo, "tokenizer": _tokenizer,
          "init": _init, "submit": _submit, "schedule": _schedule}


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), flags=re.M))


def _check_line(line: str, world: World) -> None:
    argv = shlex.split(line, comments=True)
    if not argv:
        return
    if argv[0] == "raygpt":
        _check_raygpt(argv[1:], world)
    elif argv[0] == "make":
        for target in argv[1:]:
            assert target in _makefile_targets(), f"`{line}`: the Makefile has no target {target!r}"
            if target == "demo":
                world.add("runs/demo")
    elif "/" in argv[0]:
        assert os.access(REPO / argv[0], os.X_OK), f"`{line}`: {argv[0]} is not an executable file"
    else:
        raise AssertionError(f"README command `{line}` is neither raygpt, make nor a repository script")


def test_readme_has_command_blocks():
    assert sum(line.startswith("raygpt ") for line in README_COMMANDS) >= 10, README_COMMANDS


@PENDING_SHAKESPEARE
def test_every_readme_command_resolves(monkeypatch):
    monkeypatch.chdir(REPO)  # the README's relative paths are from the repository root
    world = World()
    for line in README_COMMANDS:
        _check_line(line, world)


@PENDING_SHAKESPEARE
def test_readme_shakespeare_prep_feeds_its_train_config(monkeypatch):
    """`raygpt prep` then `raygpt train` with the shakespeare-char configs: train reads what prep writes."""
    monkeypatch.chdir(REPO)
    world = World()
    for line in README_COMMANDS:
        _check_line(line, world)
    prep = {p.as_posix() for p in world.prep_outputs}
    for cfg in getattr(world, "trains", []):
        if "shakespeare-char" in cfg.data:
            assert Path(cfg.data).as_posix() in prep, (
                f"train data {cfg.data!r} is not what the README's prep writes ({sorted(prep)})")


def test_checker_catches_a_wrong_recipe(monkeypatch):
    """The checks above are not vacuous: bad keys, missing configs and unknown paths fail."""
    monkeypatch.chdir(REPO)
    from pipelines.errors import UserError

    with pytest.raises(AssertionError, match="does not parse"):
        _check_line("raygpt trian --config jobs/configs/train-debug.yaml", World())
    with pytest.raises(AssertionError, match="does not exist"):
        _check_line("raygpt prep --config jobs/configs/nope.yaml", World())
    with pytest.raises(UserError, match="unknown config key"):
        _check_line("raygpt demo pretrain_step=5", World())
    with pytest.raises(AssertionError, match="neither exists nor is written"):
        _check_line("raygpt sample runs/never/made --prompt x", World())
