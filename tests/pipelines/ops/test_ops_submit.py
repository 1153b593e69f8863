"""`raygpt submit` / `raygpt jobs` against a real Ray cluster with token authentication.

The session fixture starts the cluster with cluster/head-up.sh (`ray start --head`, token auth on,
dashboard on 127.0.0.1, its own temp dir and free ports, 2 CPUs) and stops exactly that cluster with
cluster/head-down.sh, leaving any other Ray on the machine alone.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipelines.ops import submit as sm

REPO = Path(__file__).resolve().parents[3]
FIX = sys.modules["raygpt_gen_test_fixtures"]


# ---- units ----------------------------------------------------------------------------------


def test_entrypoint_and_runtime_env():
    ep = sm.entrypoint("generate", ["--input", "/data/in put.jsonl", "temperature=0.5"])
    assert ep == "python -m jobs.generate --input '/data/in put.jsonl' temperature=0.5"
    with pytest.raises(sm.SubmitError, match="unknown stage"):
        sm.entrypoint("deploy", [])
    env = sm.runtime_env(REPO)
    assert env["working_dir"] == str(REPO) and "pip" not in env
    assert {".venv", "runs", ".git"} <= set(env["excludes"])
    pip_env = sm.runtime_env(REPO, pip="pyproject")
    pkgs = pip_env["pip"]["packages"]
    assert any(p.startswith("ray[") and "==2.60.0" in p for p in pkgs) and "torch==2.13.0" in pkgs
    for stage, module in sm.STAGES.items():
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), stage


def test_token_lookup_order(tmp_path, monkeypatch):
    f = tmp_path / "tok"
    f.write_text("from-file\n")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert sm.resolve_token() is None and sm.auth_headers(None) == {}
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(f))
    assert sm.resolve_token() == "from-file"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert sm.resolve_token() == "from-env"
    assert sm.resolve_token(str(f)) == "from-file"  # an explicit file wins
    assert sm.auth_headers("t") == {"Authorization": "Bearer t"}
    with pytest.raises(sm.SubmitError, match="does not exist"):
        sm.resolve_token(str(tmp_path / "missing"))


def cli(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          cwd=str(REPO), env=env, timeout=timeout)


def test_submit_needs_an_http_address():
    r = cli("submit", "generate", "--address", "127.0.0.1:6379", "--", "--help")
    assert r.returncode == 2 and "http://127.0.0.1:8265" in r.stderr and "Traceback" not in r.stderr


# ---- a real cluster with token auth ---------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def client_env(token_file: str | None = None) -> dict[str, str]:
    """Environment of a client process: no Ray auth settings inherited from the test process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(Path(token_file).parent) if token_file else env.get("HOME", "/tmp")
    return env


@pytest.fixture(scope="session")
def ray_cluster():
    # a short temp dir: Ray's socket paths must stay under 107 characters
    tmp = Path(tempfile.mkdtemp(prefix="rgc", dir="/tmp"))
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(16))
    token.chmod(0o600)
    gcs, dash, *extra = free_ports(9)
    flags = [f"--dashboard-agent-listen-port={extra[0]}", f"--dashboard-agent-grpc-port={extra[1]}",
             f"--metrics-export-port={extra[2]}", f"--runtime-env-agent-port={extra[3]}",
             f"--ray-client-server-port={extra[4]}", f"--node-manager-port={extra[5]}",
             f"--object-manager-port={extra[6]}"]
    temp_dir = tmp / "ray"
    up = subprocess.run([str(REPO / "cluster" / "head-up.sh"), "--port", str(gcs), "--dashboard-port", str(dash),
                         "--num-cpus", "2", "--temp-dir", str(temp_dir), "--token-file", str(token), "--", *flags],
                        capture_output=True, text=True, env=client_env(), timeout=120)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        addr = f"http://127.0.0.1:{dash}"
        yield {"address": addr, "token_file": str(token), "temp_dir": str(temp_dir)}
    finally:
        down = subprocess.run([str(REPO / "cluster" / "head-down.sh"), "--temp-dir", str(temp_dir), "--grace", "3"],
                              capture_output=True, text=True, timeout=60)
        left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, str(temp_dir) + "/session_")]
        for p in left:  # never leave this test's cluster behind, whatever head-down.sh did
            try:
                os.kill(int(p.name), 9)
            except OSError:
                pass
        assert not left, f"head-down.sh left {len(left)} process(es) running: {down.stdout} {down.stderr}"
        shutil.rmtree(tmp, ignore_errors=True)


def _cmdline_has(p: Path, needle: str) -> bool:
    try:
        return needle.encode() in (p / "cmdline").read_bytes()
    except OSError:
        return False


def _get(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        return urllib.request.urlopen(req, timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_cluster_requires_the_token(ray_cluster):
    addr, tok = ray_cluster["address"], Path(ray_cluster["token_file"]).read_text().strip()
    assert _get(f"{addr}/api/jobs/") == 401
    assert _get(f"{addr}/api/jobs/", "wrong") == 403
    assert _get(f"{addr}/api/jobs/", tok) == 200
    bad = tempfile.NamedTemporaryFile("w", suffix=".tok", delete=False)
    bad.write("wrong")
    bad.close()
    r = cli("jobs", "list", "--address", addr, "--token-file", bad.name, env=client_env())
    assert r.returncode == 2 and "token" in r.stderr.lower() and "Traceback" not in r.stderr


@pytest.mark.slow
def test_submit_a_tiny_generation_job(ray_cluster, tiny_checkpoint, tmp_path):
    inp = FIX.write_jsonl(tmp_path / "in.jsonl", FIX.articles(12))
    out = tmp_path / "out"
    env = client_env(ray_cluster["token_file"])
    env["RAY_AUTH_TOKEN_PATH"] = ray_cluster["token_file"]  # Ray's own variable is honoured
    r = cli("submit", "generate", "--address", ray_cluster["address"], "--submission-id", "raygpt-test-generate",
            "--", "--checkpoint", str(tiny_checkpoint), "--input", str(inp), "--output", str(out),
            "--task", "summarize", "max_new_tokens=4", "chunk_rows=5", "batch_size=4", "max_field_chars=60",
            "truncate=left", env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert '"chunks_generated": 3' in r.stdout  # the job's own logs were streamed
    assert "SUCCEEDED" in r.stderr
    rows = FIX.read_rows(out)
    assert sorted(x["id"] for x in rows) == [f"doc-{i:04d}" for i in range(12)]
    assert all(x["error"] is None and x["completion_tokens"] >= 1 for x in rows)

    listed = cli("jobs", "list", "--json", "--address", ray_cluster["address"], "--token-file",
                 ray_cluster["token_file"], env=client_env())
    assert listed.returncode == 0, listed.stderr
    jobs = {j["submission_id"]: j for j in json.loads(listed.stdout)}
    assert jobs["raygpt-test-generate"]["status"] == "SUCCEEDED" and jobs["raygpt-test-generate"]["stage"] == "generate"
    logs = cli("jobs", "logs", "raygpt-test-generate", "--address", ray_cluster["address"], "--token-file",
               ray_cluster["token_file"], env=client_env())
    assert logs.returncode == 0 and '"chunks_generated": 3' in logs.stdout


@pytest.mark.slow
def test_failed_job_exit_status_and_stop(ray_cluster):
    conn = ["--address", ray_cluster["address"], "--token-file", ray_cluster["token_file"]]
    c = sm.client(ray_cluster["address"], ray_cluster["token_file"])
    # a long job, submitted first so that it starts while the failing one runs
    jid = c.submit_job(entrypoint="python -c \"import time; print('sleeping', flush=True); time.sleep(300)\"")
    # a job that fails: the submit exits with 1, and the job's own error is in the streamed logs
    r = cli("submit", "nightly", *conn, "--", "--date", "not-a-date", "input_root=/x", "output_root=/y",
            env=client_env())
    assert r.returncode == 1, r.stdout + r.stderr
    assert "--date must be YYYY-MM-DD" in r.stdout + r.stderr and "FAILED" in r.stderr
    # stop the long one through `raygpt jobs stop`
    assert FIX.wait_for(lambda: c.get_job_status(jid).value == "RUNNING", 60, 0.2)
    s = cli("jobs", "stop", jid, "--wait", *conn, env=client_env())
    assert s.returncode == 0 and "STOPPED" in s.stdout, s.stdout + s.stderr
