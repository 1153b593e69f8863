"""What every raygpt command shows on the console: one logging setup, quiet libraries, progress fit for the terminal.

    from pipelines import console
    console.add_options(parser)                  # -q/--quiet, --log-level LEVEL (a shared parent parser)
    console.setup(level="INFO", quiet=False)     # once, in the CLI, before a handler starts Ray
    log = console.get_logger("prep")             # "[prep 12:01:02] ..." on stderr
    with console.progress(600, "train", unit="step") as bar:
        bar.update(1); bar.set_postfix_str("loss 3.21")

Status lines go through `logging` (stderr); results a user pipes (`raygpt sample`, JSON summaries) stay
on stdout, printed by the handlers. Progress: a tqdm bar when the driver's stderr is a terminal; off a
terminal (a log file, CI, `make demo > log`) one status line every RAYGPT_PROGRESS_INTERVAL seconds
(default 15), never a redraw per step; nothing with -q. Ray workers learn the driver's choice and log level
from environment variables that `setup` sets before Ray starts (a local Ray's workers inherit the
driver's environment); a worker's bar is a `ray.experimental.tqdm_ray` bar that the driver draws. The
libraries' own INFO chatter (Ray core, Ray Data, Ray Train, Serve, DeepSpeed) is turned down at its
source by logger levels, in the driver and in the workers; their warnings and errors, and everything
workers print, still reach the driver. `--log-level DEBUG` turns it back on.
Does not: start Ray, print results, or filter what Ray forwards from workers.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from typing import Any

from pipelines._ray_compat import token_auth_logger_name, train_report_logger_name

LOGGER = "raygpt"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ENV_LEVEL = "RAYGPT_LOG_LEVEL"  # our log level, for workers
ENV_PROGRESS = "RAYGPT_PROGRESS"  # "bar" | "status" | "off", decided by the driver
ENV_INTERVAL = "RAYGPT_PROGRESS_INTERVAL"  # seconds between status lines off a terminal
DEFAULT_INTERVAL = 15.0

# libraries whose INFO output is chatter for a user: (logger, environment variable its workers read)
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "DeepSpeed", "deepspeed",
                   "torch.distributed", "httpx", "urllib3", "filelock", "matplotlib")
LIBRARY_ENV = ("RAY_LOGGER_LEVEL", "RAY_DATA_LOG_LEVEL")


class _Formatter(logging.Formatter):
    """`[demo 12:01:02] msg` for INFO, `[demo 12:01:02] WARNING: msg` above; the tag is the logger's
    name below "raygpt" (or "raygpt"); other libraries' records keep their logger name."""

    def format(self, record: logging.LogRecord) -> str:
        name = record.name
        tag = name.split(".", 1)[1] if name.startswith(LOGGER + ".") else name
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        msg = f"[{tag} {time.strftime('%H:%M:%S', time.localtime(record.created))}] {level}{record.getMessage()}"
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return msg


def add_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add -q/--quiet and --log-level to `parser` (used as a parent parser of every subcommand)."""
    g = parser.add_argument_group("console")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="only warnings and errors; no progress")
    g.add_argument("--log-level", type=str.upper, choices=LEVELS, default=argparse.SUPPRESS, metavar="LEVEL",
                   help="DEBUG, INFO (default), WARNING or ERROR; DEBUG also shows Ray's and DeepSpeed's own logs")
    return parser


def parent_parser() -> argparse.ArgumentParser:
    """A parser holding only the console options, for `add_parser(..., parents=[...])`."""
    return add_options(argparse.ArgumentParser(add_help=False))


def library_level(level: int | str) -> int:
    """The level for Ray, DeepSpeed and the like: INFO when we debug, else WARNING."""
    return logging.INFO if _level(level) <= logging.DEBUG else logging.WARNING


def library_level_name() -> str:
    """library_level of this process's RAYGPT_LOG_LEVEL, as a name ("WARNING"), for Ray Train's LoggingConfig."""
    return logging.getLevelName(library_level(os.environ.get(ENV_LEVEL) or "INFO"))


def _level(level: int | str | None) -> int:
    if isinstance(level, int):
        return level
    name = str(level or "INFO").upper()
    return logging.getLevelName(name) if name in LEVELS else logging.INFO


def setup(level: str | int | None = None, quiet: bool = False, stream=None) -> int:
    """Configure logging for this process and, through the environment, for the Ray workers it starts.

    Idempotent (a second call replaces the first's handler). Returns the effective level."""
    lvl = logging.WARNING if quiet and level is None else _level(level)
    if quiet:
        lvl = max(lvl, logging.WARNING)
    stream = stream if stream is not None else sys.stderr
    mode = "off" if quiet or lvl > logging.INFO else ("bar" if _isatty(stream) else "status")
    os.environ[ENV_LEVEL] = logging.getLevelName(lvl)
    os.environ[ENV_PROGRESS] = mode
    lib = library_level(lvl)
    for var in LIBRARY_ENV:  # a value the user set wins
        os.environ.setdefault(var, logging.getLevelName(lib).lower() if var == "RAY_LOGGER_LEVEL"
                              else logging.getLevelName(lib))
    _install_handler(lvl, stream)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(lib)
    auth = logging.getLogger(token_auth_logger_name())
    if not any(isinstance(f, _TokenAuthOn) for f in auth.filters):
        auth.addFilter(_TokenAuthOn())
    logging.captureWarnings(True)
    return lvl


class _TokenAuthOn(logging.Filter):
    """Drops Ray's note that a new local Ray has token auth on (the safe default, worded as a WARNING on every
    command); its warning that auth is OFF passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled")


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is when a record is written (a test's capture, a redirect or a
    Ray worker's log file may replace the object after the handler was made; the old one may be closed)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _install_handler(level: int, stream) -> None:
    log = logging.getLogger(LOGGER)
    for h in list(log.handlers):
        if getattr(h, "_raygpt", False):
            log.removeHandler(h)
    h = _StderrHandler() if stream is sys.stderr else logging.StreamHandler(stream)
    h._raygpt = True  # type: ignore[attr-defined]
    h.setFormatter(_Formatter())
    log.addHandler(h)
    log.setLevel(level)
    log.propagate = False


def get_logger(name: str | None = None) -> logging.Logger:
    """The `raygpt[.name]` logger; in a process nobody set up (a Ray worker, a library user) it gets a
    stderr handler at RAYGPT_LOG_LEVEL (default INFO) so that status lines are not lost."""
    root = logging.getLogger(LOGGER)
    if not any(getattr(h, "_raygpt", False) for h in root.handlers):
        _install_handler(_level(os.environ.get(ENV_LEVEL)), sys.stderr)
    return logging.getLogger(f"{LOGGER}.{name}") if name else root


def worker_setup() -> None:
    """In a Ray worker: our logger at the driver's level, the libraries' at theirs (DeepSpeed included)."""
    lvl = _level(os.environ.get(ENV_LEVEL))
    get_logger()
    # Ray Train logs each report (one line per checkpoint: "Reporting training result N: ...") under a logger
    # named by its file path, outside "ray.train"
    for name in (*LIBRARY_LOGGERS, train_report_logger_name()):
        logging.getLogger(name).setLevel(library_level(lvl))


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_mode() -> str:
    """"bar", "status" or "off": the driver's choice (inherited by workers), else this stderr's TTY-ness."""
    mode = os.environ.get(ENV_PROGRESS)
    if mode in ("bar", "status", "off"):
        return mode
    return "bar" if _isatty(sys.stderr) else "status"


def _fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s} s" if s < 120 else (f"{s // 60} min {s % 60:02d} s" if s < 3600 else f"{s // 3600} h {s // 60 % 60:02d} min")


class Progress:
    """A tqdm-like bar: update(n), set_postfix_str(s), set_description(s), close(); a context manager.

    mode "bar": tqdm on stderr (in a Ray worker: tqdm_ray, drawn by the driver); "status": a log line
    every `interval` seconds and one at the end if any was written; "off": nothing."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", initial: int = 0,
                 mode: str | None = None, interval: float | None = None, logger: logging.Logger | None = None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.mode = mode or progress_mode()
        self.interval = interval if interval is not None else float(os.environ.get(ENV_INTERVAL, DEFAULT_INTERVAL))
        self.log = logger or get_logger()
        self.postfix = ""
        self.t0 = self.last = time.monotonic()
        self.n0 = initial
        self.lines = 0
        self.bar: Any = None
        if self.mode == "bar":
            self.bar = _make_bar(total, desc, unit, initial)
            if self.bar is None:
                self.mode = "status"

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "status":
            now = time.monotonic()
            if now - self.last >= self.interval:
                self.last = now
                self._status()

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s
        if self.bar is not None:
            self.bar.set_description(f"{self.desc} {s}" if s else self.desc)

    set_description = set_postfix_str

    def status_line(self) -> str:
        done = self.n - self.n0
        el = time.monotonic() - self.t0
        parts = [f"{self.desc}: {self.unit} {self.n}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if done > 0 and el > 0:
            per = el / done
            parts.append(f"{per:.2f} s/{self.unit}" if per >= 1 else f"{1 / per:.1f} {self.unit}/s")
            if self.total and self.n < self.total:
                parts.append(f"eta {_fmt_s(per * (self.total - self.n))}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _status(self) -> None:
        self.lines += 1
        self.log.info("%s", self.status_line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "status" and self.lines:
            self.lines = -1  # the final line once
            self.log.info("%s, %s elapsed", self.status_line(), _fmt_s(time.monotonic() - self.t0))
        self.mode = "off"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _make_bar(total, desc, unit, initial):
    try:
        if _isatty(sys.stderr):
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, dynamic_ncols=True)
        # a Ray worker of a driver on a terminal: the driver draws the bar
        from ray.experimental.tqdm_ray import tqdm as tqdm_ray

        bar = tqdm_ray(total=total, desc=desc, unit=unit)
        if initial:
            bar.update(initial)
        return bar
    except Exception:
        return None


def progress(total: int | None, desc: str, **kw: Any) -> Progress:
    """A progress reporter suited to where this process's output goes (see Progress)."""
    return Progress(total, desc, **kw)
