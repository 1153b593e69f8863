"""The nightly overlap guard: one owner at a time, stale locks detected and taken over, across real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines.errors import UserError
from pipelines.ops.lock import LockHeld, RunLock, inspect_lock, pid_alive, read_owner

REPO = Path(__file__).resolve().parents[3]

# A run in another process: holds the lock, reports, and once told it lost the lock, releases it and says so.
HOLDER = """
import sys, time
from pipelines.ops.lock import RunLock
lock = RunLock(sys.argv[1], ttl_s=float(sys.argv[2]), heartbeat_s=float(sys.argv[3]), note="holder").acquire()
print("held", flush=True)
while not lock.lost:
    time.sleep(0.05)
lock.release()
print("lost", flush=True)
"""


def holder(path: str, ttl_s: float, heartbeat_s: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-c", HOLDER, path, str(ttl_s), str(heartbeat_s)], stdout=subprocess.PIPE,
                         text=True, env=env)
    assert p.stdout.readline().strip() == "held"
    return p


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(path, **owner):
    """A lock file in the earlier JSON format (left by an older raygpt, or written here as a stand-in)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    d = {"host": socket.gethostname(), "pid": os.getpid(), "token": "other", "started_at": "x",
         "started_at_epoch": now, "heartbeat_at": "x", "heartbeat_at_epoch": now, "ttl_s": 3600, **owner}
    path.write_text(json.dumps(d))


def eventually(cond, limit_s=10.0):  # heartbeat threads run when a loaded machine lets them
    deadline = time.time() + limit_s
    while not cond() and time.time() < deadline:
        time.sleep(0.05)
    return cond()


def test_second_acquire_is_refused_with_owner_details(tmp_path):
    path = tmp_path / "locks" / "dt=2024-05-01.lock"
    with RunLock(str(path), ttl_s=60, note="the first run") as lock:
        owner = read_owner(str(path))
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["token"] == lock.token
        assert owner["note"] == "the first run" and owner["started_at"] and owner["command"]
        for ttl_s in (60, 30):  # a contender with another ttl_s still sees a live holder
            with pytest.raises(LockHeld) as e:
                RunLock(str(path), ttl_s=ttl_s).acquire()
            msg = str(e.value)
            assert f"pid={os.getpid()}" in msg and socket.gethostname() in msg and "started" in msg
    assert not path.exists() and not Path(f"{path}.owner").exists()  # released


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path):
    path = tmp_path / "l.lock"
    pid = dead_pid()
    assert not pid_alive(pid)
    write_lock(path, pid=pid)
    with RunLock(str(path), ttl_s=3600) as lock:
        assert lock.took_over is not None and "dead" in lock.took_over.reason
        assert read_owner(str(path))["token"] == lock.token


def test_lock_of_another_host_is_stale_only_after_ttl(tmp_path):
    path = tmp_path / "l.lock"
    write_lock(path, host="elsewhere", pid=1, heartbeat_at_epoch=time.time() - 30, ttl_s=3600)
    with pytest.raises(LockHeld):
        RunLock(str(path)).acquire()
    write_lock(path, host="elsewhere", pid=1, heartbeat_at_epoch=time.time() - 7200, ttl_s=3600)
    info = inspect_lock(json.loads(path.read_text()))
    assert info.stale and "ttl" in info.reason
    with RunLock(str(path)) as lock:
        assert lock.took_over is not None


def test_heartbeat_refreshes_and_never_deletes_a_lock_taken_over(tmp_path):
    path = tmp_path / "l.lock"
    lock = RunLock(str(path), ttl_s=60, heartbeat_s=0.05).acquire()
    first = read_owner(str(path))["heartbeat_at_epoch"]
    assert eventually(lambda: read_owner(str(path))["heartbeat_at_epoch"] > first)
    # someone else takes it over: a takeover swaps another marker in at the path
    write_lock(tmp_path / "thief.lock", token="thief", host="elsewhere")
    os.replace(tmp_path / "thief.lock", path)
    assert eventually(lambda: lock.lost)
    lock.release()
    assert read_owner(str(path))["token"] == "thief"


def test_only_one_of_many_contenders_takes_a_stale_lock(tmp_path):
    path = tmp_path / "l.lock"
    write_lock(path, pid=dead_pid())
    winners, losers = [], []
    barrier = threading.Barrier(8)

    def contend():
        lk = RunLock(str(path), ttl_s=3600)
        barrier.wait()
        try:
            lk.acquire()
            winners.append(lk)
        except LockHeld:
            losers.append(lk)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 7
    winners[0].release()


def test_a_holder_process_killed_with_sigkill_is_taken_over_at_once(tmp_path):
    path = str(tmp_path / "l.lock")
    p = holder(path, ttl_s=3600, heartbeat_s=60)
    try:
        with pytest.raises(LockHeld, match=f"pid={p.pid} "):
            RunLock(path, ttl_s=3600).acquire()
        assert read_owner(path)["note"] == "holder"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    with RunLock(path, ttl_s=3600) as lock:  # the pid is dead on this host: no need to wait out the lease
        assert lock.took_over is not None and "dead" in lock.took_over.reason
        assert lock.took_over.owner["pid"] == p.pid
        assert read_owner(path)["pid"] == os.getpid() and read_owner(path)["token"] == lock.token
    assert not os.path.exists(path)


def test_a_stopped_holder_process_is_taken_over_after_ttl_and_told_when_it_resumes(tmp_path):
    path = str(tmp_path / "l.lock")
    p = holder(path, ttl_s=2, heartbeat_s=0.3)
    try:
        with pytest.raises(LockHeld):  # refreshing: live
            RunLock(path, ttl_s=2, heartbeat_s=0.3).acquire()
        p.send_signal(signal.SIGSTOP)  # alive but silent, like a frozen host
        deadline = time.monotonic() + 60
        while True:  # LockHeld until the marker is ttl_s old; then a contender watches it ttl_s more and takes it
            try:
                lock = RunLock(path, ttl_s=2, heartbeat_s=0.3).acquire()
                break
            except LockHeld:
                assert time.monotonic() < deadline, "the silent holder's lease was never taken over"
                time.sleep(0.2)
        assert lock.took_over is not None and "ttl" in lock.took_over.reason
        assert lock.took_over.owner["pid"] == p.pid
        p.send_signal(signal.SIGCONT)
        out, _ = p.communicate(timeout=60)
        assert "lost" in out  # the resumed holder learnt it lost the lock, and its release left ours in place
        assert read_owner(path)["token"] == lock.token and read_owner(path)["pid"] == os.getpid()
        lock.release()
        assert not os.path.exists(path)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()


def test_settings_that_cannot_work_are_refused_with_the_fix(tmp_path):
    path = tmp_path / "l.lock"
    with pytest.raises(UserError, match="heartbeat_s must be > 0 and < ttl_s=10"):
        RunLock(str(path), ttl_s=10, heartbeat_s=10)
    with RunLock(str(path), ttl_s=60):
        os.utime(path, (time.time() - 600, time.time() - 600))  # silent for longer than its ttl_s
        with pytest.raises(UserError, match="same ttl_s") as e:  # another ttl_s: we cannot judge its lease
            RunLock(str(path), ttl_s=30).acquire()
        assert not isinstance(e.value, LockHeld)
