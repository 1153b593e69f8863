"""Nightly batch generation for one date partition: <input_root>/dt=DATE/ -> <output_root>/dt=DATE/.

    python jobs/nightly_generate.py --date 2024-05-01 [--config jobs/configs/nightly.yaml] [key=value ...]
    python jobs/nightly_generate.py --date yesterday generate.sampling.max_new_tokens=64
    raygpt submit nightly --address http://HOST:8265 -- --date yesterday

Idempotent per date: a finished partition (its manifest.json exists) is a no-op; an interrupted one
resumes (pipelines.generate commits shards exactly once). An overlap guard keeps two runs of the same
date apart: a lock file <output_root>/_locks/dt=DATE.lock names its owner (host, pid) and start time,
heartbeats while held, and is taken over when stale: at once when its pid is dead on this host; when its
heartbeat is older than lock_ttl_s, after this run has watched it for lock_ttl_s more without a refresh
(local/NFS output roots; on S3 at once). A second live run exits at once with code 75 (EX_TEMPFAIL) and says who holds the lock.
Exit codes: 0 done (or already done), 1 failed, 2 bad config/input, 75 another run holds the lock.
Does not: pick dates by itself beyond today/yesterday (UTC), or backfill ranges (loop over --date).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import fsspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.config import ConfigError, load_config
from pipelines.errors import USER_ERRORS
from pipelines.generate import GenerateConfig, run
from pipelines.ops.lock import LOCKED_EXIT_CODE, LockHeld, RunLock


@dataclass
class NightlyConfig:
    input_root: str = ""  # holds dt=YYYY-MM-DD/ partitions (any fsspec URL)
    output_root: str = ""  # receives dt=YYYY-MM-DD/ outputs and the _locks/ directory
    # a lock whose heartbeat (every min(60 s, ttl/4)) is older than this is stale; a new pod (new host) then
    # waits up to this long again before taking it over, so keep it short
    lock_ttl_s: float = 900
    generate: dict[str, Any] = field(default_factory=dict)  # GenerateConfig keys (checkpoint, task, sampling, ...)

    def __post_init__(self) -> None:
        errors = []
        for name in ("input_root", "output_root"):
            if not str(getattr(self, name)).strip():
                errors.append(f"{name} is required (got {getattr(self, name)!r}); set it in the config or "
                              f"pass {name}=URI")
        if not self.lock_ttl_s > 0:
            errors.append(f"lock_ttl_s must be > 0 seconds, got {self.lock_ttl_s!r}")
        bad = sorted(set(self.generate) & {"input", "output"})
        if bad:
            errors.append(f"generate.{bad[0]} is set per date by the nightly job; remove it (use input_root/"
                          f"output_root)")
        if errors:
            raise ConfigError("invalid NightlyConfig:\n  - " + "\n  - ".join(errors))


def resolve_date(text: str, today: date | None = None) -> str:
    today = today or datetime.now(UTC).date()
    if text == "today":
        return today.isoformat()
    if text == "yesterday":
        return (today - timedelta(days=1)).isoformat()
    try:
        return datetime.strptime(text, "%Y-%m-%d").date().isoformat()
    except ValueError:
        raise ConfigError(f"--date must be YYYY-MM-DD, today or yesterday (UTC); got {text!r}") from None


def partition_paths(cfg: NightlyConfig, day: str) -> tuple[str, str, str]:
    inp = f"{cfg.input_root.rstrip('/')}/dt={day}"
    out = f"{cfg.output_root.rstrip('/')}/dt={day}"
    lock = f"{cfg.output_root.rstrip('/')}/_locks/dt={day}.lock"
    return inp, out, lock


def _exists(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def run_nightly(cfg: NightlyConfig, day: str) -> dict[str, Any]:
    """Generate one date partition under the overlap guard; raises LockHeld if another run has it."""
    inp, out, lock_path = partition_paths(cfg, day)
    if _exists(f"{out}/manifest.json"):
        return {"date": day, "status": "already-complete", "output": out}
    if not _exists(inp):
        raise ConfigError(f"no input partition for {day}: {inp} does not exist (did the upstream export run?)")
    gen_cfg = load_config(GenerateConfig, base={**cfg.generate, "input": inp, "output": out})
    with RunLock(lock_path, ttl_s=cfg.lock_ttl_s, note=f"nightly generate dt={day}") as lock:
        if lock.took_over:
            print(f"[nightly] took over a stale lock ({lock.took_over.reason}; previous owner host="
                  f"{lock.took_over.owner.get('host')} pid={lock.took_over.owner.get('pid')})", file=sys.stderr)
        if _exists(f"{out}/manifest.json"):  # a run that finished while we waited for nothing
            return {"date": day, "status": "already-complete", "output": out}
        summary = run(gen_cfg)
        return {"date": day, "status": "generated", **summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nightly_generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--date", required=True, help="YYYY-MM-DD, today or yesterday (UTC)")
    p.add_argument("--config", default=None, help="NightlyConfig YAML (e.g. jobs/configs/nightly.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. generate.concurrency=2")
    args = p.parse_args(argv)
    try:
        cfg = load_config(NightlyConfig, args.config, args.overrides)
        day = resolve_date(args.date)
        result = run_nightly(cfg, day)
    except LockHeld as e:
        print(f"nightly_generate: {e}", file=sys.stderr)
        return LOCKED_EXIT_CODE
    except USER_ERRORS as e:  # the user's (config, input, cluster address): one line, exit 2, like the CLI
        print(f"nightly_generate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
