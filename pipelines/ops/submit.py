"""Submit raygpt stages to a Ray cluster as Ray Jobs (JobSubmissionClient), follow and manage them.

    raygpt submit generate --address http://127.0.0.1:8265 -- --checkpoint /data/ckpt --input s3://b/in/ --output s3://b/out/
    raygpt jobs list|logs JOB_ID [--follow]|stop JOB_ID --address http://127.0.0.1:8265

The job's runtime env uploads this project as working_dir (minus .venv, runs, .git, caches) and runs
`python -m jobs.<stage> ARGS` there. Dependencies: `--pip none` (default) assumes the cluster image
already has raygpt's requirements (the normal case: same image as the driver); `--pip pyproject`
installs pyproject's dependencies pinned by constraints.txt into a per-job virtualenv.
Token authentication (RAY_AUTH_MODE=token on the cluster): the token comes from --token-file, else
$RAY_AUTH_TOKEN, else the file in $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (Ray's own order) and
is sent as `Authorization: Bearer <token>` on every request, log streaming included.
Does not: start clusters (cluster/head-up.sh does) or retry failed jobs (re-submit: stages resume).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.errors import UserError

REPO = Path(__file__).resolve().parents[2]
STAGES = {  # stage -> entrypoint module (run as `python -m MODULE` from the uploaded working_dir)
    "prep": "jobs.prep",
    "train": "jobs.train",
    "generate": "jobs.generate",
    "nightly": "jobs.nightly_generate",
}
EXCLUDES = [".venv", "venv", "runs", ".git", "*.egg-info", "__pycache__", ".pytest_cache", "*.pyc",
            "bench/results", ".mypy_cache", ".ruff_cache"]
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(UserError, RuntimeError):
    """A submission problem the user can fix (bad address, missing token, unknown stage)."""


def resolve_token(token_file: str | None = None) -> str | None:
    """The cluster token, searched in Ray's order (explicit file first)."""
    if token_file:
        p = Path(token_file).expanduser()
        if not p.is_file():
            raise SubmitError(f"--token-file {token_file!r} does not exist")
        return p.read_text().strip() or None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        p = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not p.is_file():
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={str(p)!r} does not exist")
        return p.read_text().strip() or None
    p = Path("~/.ray/auth_token").expanduser()
    if p.is_file():
        return p.read_text().strip() or None
    return None


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str, token_file: str | None = None):
    """A JobSubmissionClient for `address`, with the bearer token when one is configured."""
    from ray.job_submission import JobSubmissionClient

    if not re.match(r"^https?://", address or ""):
        raise SubmitError(f"--address must be the dashboard URL, like http://127.0.0.1:8265; got {address!r}")
    try:
        return JobSubmissionClient(address, headers=auth_headers(resolve_token(token_file)))
    except SubmitError:
        raise
    except Exception as e:
        msg = str(e)
        if "401" in msg or "403" in msg or "Authentication" in msg or "Unauthorized" in msg:
            raise SubmitError(f"the cluster at {address} refused our credentials ({msg.splitlines()[0]}); it runs "
                              f"with token auth: pass --token-file, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH") from None
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: {msg.splitlines()[0] if msg else e!r}; "
                          f"is the cluster up (cluster/head-up.sh) and the address/port right?") from None


def pinned_requirements(repo: Path = REPO) -> list[str]:
    """pyproject's dependencies, each pinned to its constraints.txt version when it has one."""
    import tomllib

    deps = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    cons = repo / "constraints.txt"
    if cons.is_file():
        for line in cons.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, ver = line.split("==", 1)
                pins[_norm(name)] = ver.strip()
    out = []
    for d in deps:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?", d)
        name, extras = m.group(1), m.group(2) or ""
        ver = pins.get(_norm(name))
        out.append(f"{name}{extras}=={ver}" if ver else d.split(";")[0].strip())
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_env(repo: Path = REPO, pip: str = "none", env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    env: dict[str, Any] = {"working_dir": str(repo), "excludes": list(EXCLUDES)}
    if pip == "pyproject":
        # Ray installs these into a virtualenv cached per requirement set; torch must stay the CPU wheel
        # unless the cluster image already has a CUDA torch (then use --pip none).
        env["pip"] = {"packages": pinned_requirements(repo), "pip_check": False,
                      "pip_install_options": ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]}
    elif pip != "none":
        raise SubmitError(f"--pip must be none or pyproject, got {pip!r}")
    ev = {"TOKENIZERS_PARALLELISM": "false", **(env_vars or {})}
    env["env_vars"] = ev
    return env


def entrypoint(stage: str, args: list[str], python: str = "python") -> str:
    if stage not in STAGES:
        raise SubmitError(f"unknown stage {stage!r}; choose one of {sorted(STAGES)}")
    return " ".join([shlex.quote(python), "-m", STAGES[stage], *(shlex.quote(a) for a in args)])


def submit(address: str, stage: str, args: list[str], *, token_file: str | None = None, pip: str = "none",
           python: str = "python", entrypoint_num_cpus: float | None = None,
           entrypoint_num_gpus: float | None = None, entrypoint_memory: int | None = None,
           entrypoint_resources: dict[str, float] | None = None, submission_id: str | None = None,
           env_vars: dict[str, str] | None = None, repo: Path = REPO) -> tuple[Any, str]:
    """Submit `python -m jobs.<stage> ARGS`; returns (client, job id)."""
    c = client(address, token_file)
    job_id = c.submit_job(
        entrypoint=entrypoint(stage, args, python),
        runtime_env=runtime_env(repo, pip, env_vars),
        submission_id=submission_id,
        metadata={"raygpt_stage": stage},
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus,
        entrypoint_memory=entrypoint_memory,
        entrypoint_resources=entrypoint_resources,
    )
    return c, job_id


def follow(c, job_id: str, out=None, poll_s: float = 1.0) -> str:
    """Stream the job's logs to `out` until it ends; returns its final status name."""
    out = out or sys.stdout

    async def tail() -> None:
        async for lines in c.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # the log stream broke (dashboard restart, proxy): fall back to polling
        print(f"[raygpt submit] log stream ended early ({type(e).__name__}: {e}); polling the status", file=sys.stderr)
    return wait(c, job_id, timeout_s=float("inf"), poll_s=poll_s)


def wait(c, job_id: str, timeout_s: float = 600, poll_s: float = 0.5) -> str:
    """Block until the job ends (no log streaming); returns its final status name."""
    t0 = time.time()
    while True:
        st = c.get_job_status(job_id)
        name = getattr(st, "value", str(st))
        if name in TERMINAL:
            return name
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"job {job_id} still {name} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def list_jobs(c) -> list[dict[str, Any]]:
    rows = []
    for j in c.list_jobs():
        rows.append({
            "submission_id": j.submission_id, "status": getattr(j.status, "value", str(j.status)),
            "stage": (j.metadata or {}).get("raygpt_stage", ""), "entrypoint": j.entrypoint,
            "start_time": j.start_time, "end_time": j.end_time, "message": j.message,
        })
    rows.sort(key=lambda r: r["start_time"] or 0)
    return rows
