"""The nightly overlap guard: one owner at a time, stale locks detected and taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipelines.ops.lock import LockHeld, RunLock, inspect_lock, pid_alive


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(path, **owner):
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    d = {"host": socket.gethostname(), "pid": os.getpid(), "token": "other", "started_at": "x",
         "started_at_epoch": now, "heartbeat_at": "x", "heartbeat_at_epoch": now, "ttl_s": 3600, **owner}
    path.write_text(json.dumps(d))


def _try_create(p) -> bool:
    try:
        os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def test_second_acquire_is_refused_with_owner_details(tmp_path):
    path = tmp_path / "locks" / "dt=2024-05-01.lock"
    with RunLock(str(path), ttl_s=60) as lock:
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["token"] == lock.token
        with pytest.raises(LockHeld) as e:
            RunLock(str(path), ttl_s=60).acquire()
        msg = str(e.value)
        assert f"pid={os.getpid()}" in msg and socket.gethostname() in msg and "started" in msg
    assert not path.exists()  # released


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path):
    path = tmp_path / "l.lock"
    pid = dead_pid()
    assert not pid_alive(pid)
    write_lock(path, pid=pid)
    with RunLock(str(path), ttl_s=3600) as lock:
        assert lock.took_over is not None and "dead" in lock.took_over.reason
        assert json.loads(path.read_text())["token"] == lock.token


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
    first = json.loads(path.read_text())["heartbeat_at_epoch"]

    def eventually(cond, limit_s=10.0):  # the heartbeat thread runs when a loaded machine lets it
        deadline = time.time() + limit_s
        while not cond() and time.time() < deadline:
            time.sleep(0.05)
        return cond()

    assert eventually(lambda: json.loads(path.read_text())["heartbeat_at_epoch"] > first)
    # someone else takes it over, under the takeover mutex as RunLock's own takeover does (a refresh
    # racing with the takeover must not overwrite it)
    mutex = f"{path}.takeover"
    got = []
    assert eventually(lambda: bool(got) or (_try_create(mutex) and not got.append(1)))
    write_lock(path, token="thief")
    os.remove(mutex)
    assert eventually(lambda: lock.lost)
    lock.release()
    assert json.loads(path.read_text())["token"] == "thief"


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
