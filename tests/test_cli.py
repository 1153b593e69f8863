"""The `raygpt` CLI: every (nested) subcommand's --help works, and the core flow runs end to end.

    .venv/bin/python -m pytest tests/test_cli.py -q

Subcommands are discovered from the real parser, so ones that later stages register are covered
without editing this file. Commands run in subprocesses exactly as a user runs them
(`python -m pipelines.cli` with the venv's interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


def raygpt(*args: str, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout, input=input)


def _subcommand_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append(prefix + (name,))
                paths += _subcommand_paths(sub, prefix + (name,))
    return paths


def test_every_subcommand_help():
    from pipelines.cli import build_parser

    paths = _subcommand_paths(build_parser())
    names = {" ".join(p) for p in paths}
    assert {"tokenizer", "tokenizer train", "init", "sample", "export", "import"} <= names, names

    def run(path):
        return path, raygpt(*path, "--help", timeout=120)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, [()] + paths))
    for path, r in results:
        cmd = " ".join(("raygpt",) + path + ("--help",))
        assert r.returncode == 0, f"{cmd} exited {r.returncode}: {r.stderr[-2000:]}"
        assert r.stdout.startswith("usage: raygpt"), f"{cmd} printed no usage: {r.stdout[:200]!r}"
        assert len(r.stdout.splitlines()) >= 3, f"{cmd} help is too short: {r.stdout!r}"


def test_sample_exposes_every_sampling_param():
    import dataclasses

    from gptcore.sampling import SamplingParams
    from pipelines.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["sample"]
    dests = {a.dest for a in sub._actions}
    alias = {"stop_token_ids": "stop_token_id"}
    missing = [f.name for f in dataclasses.fields(SamplingParams) if alias.get(f.name, f.name) not in dests]
    assert not missing, f"raygpt sample lacks options for SamplingParams fields {missing}"


def test_user_errors_are_one_line_exit_2(tmp_path):
    r = raygpt("sample", tmp_path / "nope", "--prompt", "x")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert "does not exist" in r.stderr
    r = raygpt("sample", tmp_path, "--prompt", "x", "--top-p", "0")  # parameters are checked before loading
    assert r.returncode == 2 and "top_p" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = raygpt("tokenizer", "train", "--input", str(tmp_path / "none*.txt"), "--vocab-size", "300",
               "--out", tmp_path / "t.json")
    assert r.returncode == 2 and "matches no file" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_core_flow_end_to_end(tmp_path, shared_data):
    """tokenizer train -> init -> sample -> export -> transformers reload (same logits, same tokens)."""
    import torch
    import transformers

    corpus = next((p for p in sorted(shared_data.rglob("*.txt")) if 50_000 < p.stat().st_size), None)
    if corpus is None:
        pytest.skip("no text corpus in shared data")
    text = corpus.read_text(encoding="utf-8", errors="replace")[:200_000]
    small = tmp_path / "corpus.txt"
    small.write_text(text, encoding="utf-8")

    tok = tmp_path / "tokenizer.json"
    r = raygpt("tokenizer", "train", "--input", small, "--vocab-size", "512", "--kind", "bpe", "--out", tok)
    assert r.returncode == 0, r.stderr
    assert json.loads(tok.read_text())  # one JSON file

    ckpt = tmp_path / "ckpt"
    r = raygpt("init", ckpt, "--preset", "debug", "--tokenizer", tok, "--seed", "3", "--set", "block_size=128")
    assert r.returncode == 0, r.stderr
    r = raygpt("init", ckpt, "--preset", "debug", "--tokenizer", tok)
    assert r.returncode == 2 and "already exists" in r.stderr

    r = raygpt("sample", ckpt, "--prompt", "Hello", "--prompt", "The", "--max-new-tokens", "8",
               "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == ["Hello", "The"]
    assert all(len(x["token_ids"]) == 8 or x["finish_reason"] == "stop" for x in lines)
    r = raygpt("sample", ckpt, "--prompt", "Hello", "--max-new-tokens", "8", "--temperature", "0.9",
               "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.1", "--copy-bias", "1.5", "--seed", "5",
               "--n", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--- prompt 0 completion") == 2 and r.stdout.count("\nHello") == 2

    out = tmp_path / "hf"
    r = raygpt("export", "--format", "hf", ckpt, out)
    assert r.returncode == 0, r.stderr
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    from gptcore.checkpoint import load_checkpoint

    ours = load_checkpoint(ckpt)
    ids = ours.tokenizer.encode("Hello")
    assert hf_tok("Hello")["input_ids"] == ids
    x = torch.tensor([ours.tokenizer.encode(text[:300])[:100]])
    with torch.no_grad():
        assert torch.allclose(ours.model(x)[0], hf(x).logits, atol=1e-4, rtol=0)
    greedy = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=ours.tokenizer.eos_id)
    first = lines[0]
    if first["finish_reason"] == "length":
        assert greedy[0, len(ids):].tolist() == first["token_ids"]

    back = tmp_path / "back"
    r = raygpt("import", "--format", "hf", out, back)
    assert r.returncode == 0, r.stderr
    again = load_checkpoint(back)
    with torch.no_grad():
        assert torch.equal(again.model(x)[0], ours.model(x)[0])


# ---- help texts for users, console options on every command, console behaviour ----------------------

SOURCE_PATH = re.compile(r"\b(?:pipelines|gptcore|tests|bench)/[\w/]*\.py\b|\b[\w/]+/[\w]+\.py\b")


def _all_parsers():
    from pipelines.cli import build_parser

    parser = build_parser()
    out = [((), parser)]

    def walk(p, prefix):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out.append((prefix + (name,), sub))
                    walk(sub, prefix + (name,))

    walk(parser, ())
    return out


def test_help_texts_are_for_users():
    for path, p in _all_parsers():
        text = p.format_help()
        cmd = " ".join(("raygpt",) + path)
        assert "Does not:" not in text, f"`{cmd} --help` carries a developer note: {text[:400]}"
        assert "argument parsing only" not in text, f"`{cmd} --help` talks to developers"
        assert not SOURCE_PATH.search(text), f"`{cmd} --help` names a source file: {SOURCE_PATH.search(text)[0]}"
        assert p.description, f"`{cmd} --help` has no description of what the command does"


def test_every_command_takes_quiet_and_log_level():
    for path, p in _all_parsers():
        opts = {s for a in p._actions for s in a.option_strings}
        assert {"-q", "--quiet", "--log-level"} <= opts, f"raygpt {' '.join(path)} lacks the console options"
    from pipelines.cli import build_parser

    a = build_parser().parse_args(["prep", "--config", "x.yaml", "-q"])
    b = build_parser().parse_args(["--log-level", "debug", "train", "--config", "x.yaml"])
    assert a.quiet and not hasattr(a, "log_level") and b.log_level == "DEBUG"


def test_status_lines_off_a_terminal_are_periodic(monkeypatch):
    import io
    import logging

    from pipelines import console

    buf = io.StringIO()  # not a TTY: status mode
    console.setup("INFO", stream=buf)
    try:
        assert os.environ[console.ENV_PROGRESS] == "status"
        with console.progress(600, "train", unit="step", interval=3600) as bar:
            for _ in range(600):
                bar.update(1)  # 600 updates inside one interval: no line at all
        assert buf.getvalue() == ""
        with console.progress(600, "train", unit="step", interval=0) as bar:
            bar.set_postfix_str("loss 3.21")
            bar.update(120)
        lines = buf.getvalue().splitlines()
        assert re.match(r"\[raygpt \d\d:\d\d:\d\d\] train: step 120/600 \(20%\), .*loss 3\.21$", lines[0]), lines
        assert len(lines) == 2 and "elapsed" in lines[1], lines  # one update, one final line
        # -q: no progress and no INFO lines; warnings still show
        buf.truncate(0), buf.seek(0)
        console.setup(None, quiet=True, stream=buf)
        with console.progress(10, "x", interval=0) as bar:
            bar.update(5)
        console.get_logger("demo").info("hidden")
        console.get_logger("demo").warning("shown")
        assert buf.getvalue().splitlines() == [buf.getvalue().splitlines()[0]]
        assert "WARNING: shown" in buf.getvalue() and "[demo " in buf.getvalue()
        assert logging.getLogger("ray").level == logging.WARNING
    finally:
        console.setup("INFO")


def test_quiet_and_log_level_on_a_real_command(tmp_path):
    tok = tmp_path / "t.json"
    src = tmp_path / "a.txt"
    src.write_text("hello world\n" * 50)
    r = raygpt("tokenizer", "train", "--input", src, "--kind", "char", "--out", tok)
    assert r.returncode == 0 and re.search(r"\[raygpt \d\d:\d\d:\d\d\] wrote ", r.stderr), r.stderr
    r = raygpt("tokenizer", "train", "--input", src, "--kind", "char", "--out", tok, "--overwrite", "-q")
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", (r.stdout, r.stderr)
    r = raygpt("--log-level", "nope", "tokenizer", "train", "--input", src, "--out", tok)
    assert r.returncode == 2 and "--log-level" in r.stderr


def test_console_drops_rays_token_auth_on_note_but_not_its_auth_off_warning(monkeypatch):
    """Every new local Ray logs a WARNING that token auth is on (the safe default): noise on every command.
    The console setup filters that one note; Ray's warning that auth is OFF still reaches the user."""
    import logging

    from pipelines import _ray_compat as rc
    from pipelines import console

    for var in (console.ENV_LEVEL, console.ENV_PROGRESS, *console.LIBRARY_ENV):
        monkeypatch.delenv(var, raising=False)
    console.setup("INFO")
    auth = logging.getLogger(rc.token_auth_logger_name())

    def rec(msg: str) -> logging.LogRecord:
        return logging.LogRecord(auth.name, logging.WARNING, __file__, 1, msg, None, None)

    assert not auth.filter(rec("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=..."))
    assert auth.filter(rec("Token authentication is disabled for this Ray cluster. Anyone with network ..."))
    console.setup("INFO")  # idempotent: one filter, not two
    assert sum(isinstance(f, console._TokenAuthOn) for f in auth.filters) == 1
