"""Overlap guard for scheduled runs: a lock file that names its owner, with stale-lock takeover.

    from pipelines.ops.lock import RunLock, LockHeld
    with RunLock("/data/out/_locks/dt=2024-05-01.lock", ttl_s=6 * 3600):
        ...  # only one run per date at a time

The lock file holds JSON {host, pid, token, started_at, heartbeat_at, ttl_s, note}. It is created with
O_CREAT|O_EXCL (atomic on POSIX filesystems, NFS v3+ included), and refreshed by a heartbeat thread.
A lock is stale when its owner is a dead pid on this host, or its heartbeat is older than ttl_s (owner
on another host, or hung). Takeover: under a short second lock (`<lock>.takeover`, O_EXCL) a contender
re-reads the lock, deletes it only if it is still stale, then competes for the O_EXCL create like
everyone else, so exactly one contender ends up owning it.
Object-store URLs (s3://...) are created with an exclusive create, `fs.open(path, "xb")` (s3fs: a PUT with
If-None-Match: *, refused with FileExistsError when the object exists), which is atomic on S3; the token is read
back as well, in case a backend ignores the "x". Their stale takeover and heartbeat stay best effort (no
conditional delete/overwrite through fsspec). storage_options reach fsspec (e.g. an endpoint_url).
Why not filelock.SoftFileLease: its marker format and expiry (a contender must itself watch the marker go
unrefreshed for lease_duration on its monotonic clock; identity by inode) differ from this lock's JSON owner
record and heartbeat age, which jobs/nightly_generate.py, its operators and tests/pipelines/ops/test_ops_lock.py
rely on; and it covers local/NFS paths only.
Does not: fence a stale owner that comes back to life (its heartbeat notices the takeover and stops
refreshing, but it is not killed); the generate stage's exactly-once commit makes that harmless.
"""

from __future__ import annotations

from pipelines.errors import UserError

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

LOCKED_EXIT_CODE = 75  # EX_TEMPFAIL: "another run holds the lock; try again later"


class LockHeld(UserError, RuntimeError):
    """Another live run holds the lock."""

    def __init__(self, path: str, owner: dict[str, Any]):
        self.path = path
        self.owner = owner
        age = time.time() - float(owner.get("started_at_epoch", time.time()))
        super().__init__(
            f"another run holds {path}: host={owner.get('host')} pid={owner.get('pid')} started "
            f"{owner.get('started_at')} ({age:.0f}s ago), last heartbeat {owner.get('heartbeat_at')}; it is "
            f"live, so this run exits. If it is not (e.g. a frozen host), delete the lock file or wait "
            f"until its heartbeat is older than ttl_s={owner.get('ttl_s')}s")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    # a zombie (exited, not yet reaped by its parent) is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


@dataclass
class LockInfo:
    stale: bool
    reason: str
    owner: dict[str, Any]


def inspect_lock(owner: dict[str, Any], now: float | None = None, host: str | None = None) -> LockInfo:
    """Is the lock described by `owner` stale? (dead pid on this host, or heartbeat older than ttl)"""
    now = time.time() if now is None else now
    host = host or socket.gethostname()
    beat = float(owner.get("heartbeat_at_epoch", owner.get("started_at_epoch", 0)))
    ttl = float(owner.get("ttl_s", 0) or 0)
    if owner.get("host") == host and isinstance(owner.get("pid"), int) and not pid_alive(owner["pid"]):
        return LockInfo(True, f"owner pid {owner['pid']} on this host ({host}) is dead", owner)
    if ttl and now - beat > ttl:
        return LockInfo(True, f"heartbeat {now - beat:.0f}s old > ttl_s={ttl:.0f}", owner)
    return LockInfo(False, "owner alive", owner)


class RunLock:
    """Context manager: acquire (or raise LockHeld), heartbeat while held, release on exit."""

    def __init__(self, path: str, ttl_s: float = 6 * 3600, note: str = "", heartbeat_s: float | None = None,
                 storage_options: dict[str, Any] | None = None):
        self.path = str(path)
        self.ttl_s = float(ttl_s)
        self.note = note
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(1.0, min(60.0, self.ttl_s / 4))
        self.token = uuid.uuid4().hex
        self.took_over: LockInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = False
        self.started_at = time.time()
        self._fs, self._fpath = None, None
        if "://" in self.path and not self.path.startswith("file://"):
            import fsspec

            self._fs, self._fpath = fsspec.core.url_to_fs(self.path, **(storage_options or {}))
        elif self.path.startswith("file://"):
            self.path = self.path[len("file://"):]

    # ---- file primitives ---------------------------------------------------------------------

    def _content(self) -> bytes:
        now = time.time()
        return json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
            "started_at": _iso(self.started_at), "started_at_epoch": self.started_at,
            "heartbeat_at": _iso(now), "heartbeat_at_epoch": now, "ttl_s": self.ttl_s, "note": self.note,
        }, indent=2).encode()

    def _read_raw(self, path: str | None = None) -> bytes | None:
        try:
            if self._fs is not None:
                with self._fs.open(path or self._fpath, "rb") as f:
                    return f.read()
            with open(path or self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    @staticmethod
    def _parse(raw: bytes | None) -> dict[str, Any] | None:
        if raw is None:
            return None
        try:
            d = json.loads(raw.decode() or "{}")
            return d if isinstance(d, dict) else {}
        except (ValueError, UnicodeDecodeError):
            return {}  # torn/garbage lock: judged by its mtime

    def _read(self) -> dict[str, Any] | None:
        return self._parse(self._read_raw())

    def _create_exclusive(self) -> bool:
        if self._fs is not None:  # object stores: the exclusive create is the atomic primitive
            try:
                with self._fs.open(self._fpath, "xb") as f:
                    f.write(self._content())
            except FileExistsError:
                return False
            except (ValueError, NotImplementedError) as e:  # a backend without exclusive create
                raise UserError(f"lock path {self.path}: its filesystem ({type(self._fs).__name__}) cannot create a file "
                                f"exclusively (open mode 'xb': {e}); put the output root (and so its _locks/) on a "
                                f"local/NFS path or on S3") from None
            return (self._read() or {}).get("token") == self.token
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._content())
            f.flush()
            os.fsync(f.fileno())
        return True

    def _mtime(self) -> float:
        try:
            if self._fs is not None:
                m = self._fs.info(self._fpath).get("mtime") or self._fs.info(self._fpath).get("LastModified")
                return m.timestamp() if hasattr(m, "timestamp") else float(m or 0)
            return os.path.getmtime(self.path)
        except Exception:
            return 0.0

    def _remove_stale(self, judged: bytes) -> bool:
        """Delete the lock we judged stale; True if THIS process did it. Local files: under a short
        takeover mutex (`<lock>.takeover`, O_EXCL), re-read and re-judged there, so a fresh lock that a
        faster contender created meanwhile is never removed."""
        if self._fs is not None:  # object stores: best effort
            try:
                self._fs.rm(self._fpath)
                return True
            except (FileNotFoundError, OSError):
                return False
        mutex = self._take_mutex()
        if mutex is None:
            time.sleep(0.05)
            return False
        try:
            raw = self._read_raw()
            if raw is None:
                return False  # already gone: the caller retries the exclusive create
            owner = self._parse(raw) or {"heartbeat_at_epoch": self._mtime(), "ttl_s": self.ttl_s}
            if raw != judged and not inspect_lock(owner).stale:
                return False  # replaced by a live owner meanwhile: the caller sees it held
            os.remove(self.path)
            return True
        finally:
            self._drop_mutex(mutex)

    def _take_mutex(self) -> str | None:
        """The short `<lock>.takeover` mutex (O_EXCL) that serialises takeovers and heartbeat refreshes of a
        local lock file; None if someone else holds it. One left by a process that died holding it
        expires after 30 s."""
        mutex = f"{self.path}.takeover"
        try:
            os.close(os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return mutex
        except FileExistsError:
            try:
                if time.time() - os.path.getmtime(mutex) > 30:
                    os.remove(mutex)
            except OSError:
                pass
            return None

    @staticmethod
    def _drop_mutex(mutex: str) -> None:
        try:
            os.remove(mutex)
        except OSError:
            pass

    # ---- public ------------------------------------------------------------------------------

    def acquire(self) -> "RunLock":
        for _ in range(50):
            if self._create_exclusive():
                self._start_heartbeat()
                return self
            raw = self._read_raw()
            owner = self._parse(raw)
            if owner is None:
                continue  # released between our attempts: try again
            if not owner:  # unreadable: fall back to the file's age
                owner = {"heartbeat_at_epoch": self._mtime(), "ttl_s": self.ttl_s, "host": "?", "pid": None}
            info = inspect_lock(owner)
            if not info.stale:
                raise LockHeld(self.path, owner)
            if self._remove_stale(raw):
                self.took_over = info
        raise LockHeld(self.path, self._read() or {})

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        d = self._read()
        if d and d.get("token") == self.token:  # never delete a lock someone took over from us
            try:
                if self._fs is not None:
                    self._fs.rm(self._fpath)
                else:
                    os.remove(self.path)
            except FileNotFoundError:
                pass

    @property
    def lost(self) -> bool:
        """True once another process took the lock over (our heartbeat saw a foreign token)."""
        return self._lost

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                if self._fs is not None:  # object stores: best effort (read, check, write)
                    d = self._read()
                    if not d or d.get("token") != self.token:
                        self._lost = True
                        return
                    try:
                        with self._fs.open(self._fpath, "wb") as f:
                            f.write(self._content())
                    except OSError:
                        pass
                    continue
                # local files: check-then-replace under the takeover mutex, so a takeover that lands
                # between our read and our replace is never overwritten by this refresh
                mutex = self._take_mutex()
                if mutex is None:
                    continue  # a takeover (or another refresh) is in progress: beat next time
                try:
                    d = self._read()
                    if not d or d.get("token") != self.token:
                        self._lost = True
                        return
                    tmp = f"{self.path}.hb-{self.token[:8]}"
                    with open(tmp, "wb") as f:
                        f.write(self._content())
                    os.replace(tmp, self.path)
                except OSError:
                    pass
                finally:
                    self._drop_mutex(mutex)

        self._thread = threading.Thread(target=beat, name="runlock-heartbeat", daemon=True)
        self._thread.start()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
