"""`raygpt serve` as a user runs it: a real process group, real Ray, real HTTP; start, refuse, stop.

    .venv/bin/python -m pytest tests/pipelines/serve/test_serve_lifecycle.py -q

The server runs as a subprocess in a process group of its own (as a shell job or a container's
PID 1 would), with its own local Ray (not the session's `ray_session`). Checks: nothing of Serve
listens on 0.0.0.0 / [::] by default and the API port is on 127.0.0.1 only; a second start on the
same port is a one-line error with exit code 2 before anything starts; SIGTERM to the whole
process group lets an in-flight stream finish, then leaves no process of the tree and no listener
on the port. Ray core's own gRPC servers (`*:port` in `ss`) listen on all interfaces in every Ray
process whatever Serve does (Ray 2.60 has no setting for it; Ray's token auth guards them): this
test leaves them to Ray.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from serve_testlib import free_port, wait_until

REPO = Path(__file__).resolve().parents[3]


def _raygpt(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _listeners() -> list[tuple[str, int, list[int]]]:
    """(local address, port, pids) of every listening TCP socket, from `ss -ltnpH`."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        cols = line.split()
        addr, _, port = cols[3].rpartition(":")
        rows.append((addr, int(port), [int(p) for p in re.findall(r"pid=(\d+)", line)]))
    return rows


def _tree(pid: int) -> dict[int, str]:
    import psutil

    procs = {}
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            procs[p.pid] = " ".join(p.cmdline()) or p.name()
        except psutil.Error:
            pass
    return procs


def _is_serve_process(cmd: str) -> bool:
    return bool(re.search(r"Serve|ProxyActor|haproxy|pipelines\.(cli|serve)", cmd))


def _health(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_port_taken_is_one_line_error_before_anything_starts(tiny_ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = _raygpt("serve", "--checkpoint", str(tiny_ckpt), "--port", str(port))
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    err = [line for line in out.splitlines() if "error" in line]
    assert len(err) == 1, out
    assert "--port" in err[0] and str(port) in err[0] and "already in use" in err[0]
    assert f"pid {os.getpid()}" in err[0]  # who holds it
    assert "another --port" in err[0]  # the fix
    assert "Ray" not in out  # refused before Ray started


@pytest.mark.slow
def test_serve_binds_loopback_and_sigterm_leaves_nothing(tiny_ckpt):
    import httpx
    import psutil

    port = free_port()
    proc = _raygpt("serve", "--checkpoint", str(tiny_ckpt), "--port", str(port), "drain_s=10")
    printed: list[str] = []  # the server's console, read as it comes (the ready line ends its start-up)
    reader = threading.Thread(target=lambda: printed.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_until(lambda: (_health(port) and any("ready at" in line for line in printed)) or proc.poll() is not None,
                   timeout=300, interval=1.0, what="raygpt serve to answer /health and say it is ready")
        assert proc.poll() is None, "".join(printed)
        tree = _tree(proc.pid)

        # nothing of Serve listens on all interfaces; the API port is on loopback only
        serve_pids = {p for p, cmd in tree.items() if _is_serve_process(cmd)}
        wild = [(a, p, cmd) for a, p, pids in _listeners() for pid in pids if pid in serve_pids
                for cmd in [tree[pid]] if a in ("0.0.0.0", "[::]")]
        assert not wild, wild
        assert {a for a, p, _ in _listeners() if p == port} == {"127.0.0.1"}
        assert not [cmd for cmd in tree.values() if "haproxy" in cmd]  # the default ingress is Serve's proxy

        # a second server on the same port: a clear error, exit code 2, the first one unharmed
        second = _raygpt("serve", "--checkpoint", str(tiny_ckpt), "--port", str(port))
        out2, _ = second.communicate(timeout=120)
        assert second.returncode == 2 and "already in use" in out2 and str(port) in out2, out2
        assert _health(port)

        # a stream in flight when SIGTERM reaches the whole process group still finishes
        body = {"prompt": "To be", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            assert first.startswith("data: {")
            os.killpg(proc.pid, signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest and rest[-1] == "data: [DONE]", rest[-3:]

        proc.wait(timeout=60)  # bounded by launch.STOP_DEADLINE_S (28 s)
        reader.join(timeout=10)
        out = "".join(printed)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [line for line in out.splitlines() if line.startswith("raygpt serve:")]
    assert any(f"http://127.0.0.1:{port}/v1" in line for line in lines), out
    assert "stopped in" in lines[-1], out

    # no process of the tree and no listener on the port are left
    def leftovers():
        alive = []
        for pid in tree:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(tree[pid])
            except psutil.NoSuchProcess:
                pass
        return alive

    wait_until(lambda: not leftovers(), timeout=10, what=f"the server's processes to exit: {leftovers()}")
    assert not [a for a, p, _ in _listeners() if p == port]
