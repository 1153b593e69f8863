"""Overlap guard for scheduled runs: one owner per lock path, named in a readable record; stale locks are taken over.

    with RunLock("/data/out/_locks/dt=2024-05-01.lock", ttl_s=6 * 3600, note="nightly dt=2024-05-01"):
        ...  # one run per date at a time; another raises LockHeld naming this one (read_owner(path) shows it)

Local/NFS paths: filelock.SoftFileLease(lease_duration=ttl_s), an O_EXCL marker its heartbeat thread refreshes every
heartbeat_s. A dead owner on this host is taken over at once. A live but silent one (other host, hung, stopped) only
once the contender itself has watched the marker go unrefreshed for ttl_s on its monotonic clock (clock skew cannot
expire a live claim): a marker refreshed within ttl_s (its mtime) raises LockHeld at once; an older one makes the run
wait up to ttl_s more, and LockHeld if the holder refreshes meanwhile. The holder writes `<lock>.owner` (host, pid,
token, started_at, command, note), valid while its token is the marker's. A lock file in the earlier JSON format is
judged by its pid and heartbeat, then broken through filelock's malformed-marker path.
Object stores (s3://; filelock is local only): exclusive create `fs.open(path, "xb")` (S3: PUT If-None-Match: *) of a
JSON record, a heartbeat thread here. Takeover of a record judged stale (dead pid here, or heartbeat older than ttl_s by
the wall clock) and each refresh are PUT If-Match: the ETag read, so two contenders never both win and a refresh never
overwrites a takeover. Limits: release is read-check-delete (s3fs's rm sends no If-Match); a backend without ETags
falls back to delete-then-create and read-check-write. Both race only with the takeover of a holder silent for ttl_s.
Does not: fence a stale owner that comes back to life (its `lost` turns True: it is told, not stopped); the generate
stage's exactly-once commit makes that harmless.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from filelock import LeaseSettingsMismatch, SoftFileLease, Timeout

from pipelines.errors import UserError
from pipelines.runtime import atomic_write_json

LOCKED_EXIT_CODE = 75  # EX_TEMPFAIL: "another run holds the lock; try again later"


class LockHeld(UserError, RuntimeError):
    """Another live run holds the lock."""

    def __init__(self, path: str, owner: dict[str, Any]):
        self.path, self.owner = path, owner
        age = time.time() - float(owner.get("started_at_epoch") or time.time())
        command = f", command {owner['command']!r}" if owner.get("command") else ""
        super().__init__(
            f"another run holds {path}: host={owner.get('host')} pid={owner.get('pid')} started "
            f"{owner.get('started_at')} ({age:.0f}s ago){command}, last heartbeat {owner.get('heartbeat_at')}; it is "
            f"live, so this run exits. If it is not (e.g. a frozen host), delete the lock file, or run again once "
            f"its heartbeat is older than ttl_s={owner.get('ttl_s')}s: that run takes it over (on a local/NFS path "
            f"after watching it ttl_s more for a refresh)")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:  # a zombie (exited, not yet reaped by its parent) is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _parse(raw: bytes | None) -> dict[str, Any] | None:
    """A JSON owner record, {} for anything else (a filelock marker, a torn write), None for no file."""
    try:
        d = None if raw is None else json.loads(raw.decode() or "{}")
        return d if isinstance(d, dict) or d is None else {}
    except (ValueError, UnicodeDecodeError):
        return {}


def _load(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return _parse(f.read()) or {}
    except FileNotFoundError:
        return {}


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


def read_owner(path: str) -> dict[str, Any] | None:
    """Who holds the local lock at `path` (None: nobody): filelock's marker (host, pid, token, ttl_s) with the holder's
    `.owner` record (started_at, command, note) when its token matches, heartbeat_at = the marker's mtime. A lock file
    in the earlier JSON format is returned as recorded; an unreadable one as host '?' with its mtime."""
    try:
        with open(path, "rb") as f:
            raw, mtime = f.read(4096), os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None
    if legacy := _parse(raw):
        return legacy
    owner: dict[str, Any] = {"host": "?", "pid": None, "heartbeat_at": _iso(mtime), "heartbeat_at_epoch": mtime}
    if (marker := SoftFileLease(path).owner) is not None:
        owner.update(host=marker.hostname, pid=marker.pid, token=marker.token, ttl_s=marker.lease_duration)
        if (record := _load(f"{path}.owner")).get("token") == marker.token:
            owner.update({k: v for k, v in record.items() if not k.startswith("heartbeat")})
    return owner


class RunLock:
    """Context manager: acquire (or raise LockHeld), heartbeat while held, release on exit."""

    def __init__(self, path: str, ttl_s: float = 6 * 3600, note: str = "", heartbeat_s: float | None = None,
                 storage_options: dict[str, Any] | None = None):
        self.path = str(path).removeprefix("file://")
        self.ttl_s, self.note, self.started_at = float(ttl_s), note, time.time()
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s is not None else min(60.0, self.ttl_s / 4)
        if not 0 < self.heartbeat_s < self.ttl_s:
            raise UserError(f"RunLock heartbeat_s must be > 0 and < ttl_s={self.ttl_s:g}, got {heartbeat_s!r} "
                            f"({self.path}); leave it unset for min(60, ttl_s / 4)")
        self.token = uuid.uuid4().hex  # local paths: filelock's claim token once acquired
        self.took_over: LockInfo | None = None
        self.lost = False  # True once the heartbeat finds the lock taken over by another run
        self._stop, self._thread = threading.Event(), None
        self._fs: Any = None
        self._etag: str | None = None
        if "://" in self.path:
            import fsspec

            self._fs, self._fpath = fsspec.core.url_to_fs(self.path, **(storage_options or {}))
        else:  # thread_local=False: a lease acquired in one thread may be released from another
            self._lease = SoftFileLease(self.path, lease_duration=self.ttl_s, heartbeat_interval=self.heartbeat_s,
                                        on_compromise=lambda _: setattr(self, "lost", True), thread_local=False,
                                        blocking=False)

    def _record(self, **extra: Any) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "ttl_s": self.ttl_s,
                "started_at": _iso(self.started_at), "started_at_epoch": self.started_at, "note": self.note,
                "command": " ".join(sys.argv), **extra}

    def acquire(self) -> RunLock:
        if self._fs is not None:
            self._acquire_store()
            self._thread = threading.Thread(target=self._beat_store, name="runlock-heartbeat", daemon=True)
            self._thread.start()
            return self
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        previous, judged, deadline = read_owner(self.path), None, 0.0
        while True:
            mismatch = None
            try:
                self._lease.acquire()  # one attempt (blocking=False); filelock takes a dead owner's marker here
                break
            except Timeout:
                pass
            except LeaseSettingsMismatch as e:
                mismatch = e
            if (holder := read_owner(self.path)) is None:
                continue  # released between our attempts: try again
            info = inspect_lock(holder)
            if not info.stale or (judged is not None and time.monotonic() > deadline):
                raise LockHeld(self.path, holder)  # refreshed within ttl_s (or while we waited): live
            if mismatch is not None:
                raise UserError(f"lock {self.path}: {mismatch}; pass the same ttl_s (the nightly job's lock_ttl_s) "
                                f"to every run of this path, or delete the lock file if its holder is gone") from None
            if judged is None:  # silent for ttl_s by the wall clock: filelock confirms on its own clock
                judged, deadline = info, time.monotonic() + max(self.ttl_s, 2.0) + 1.0
            time.sleep(0.2)
        self.token = self._lease.token or self.token
        if judged is None and previous is not None and (info := inspect_lock(previous)).stale:
            judged = info  # filelock took a dead owner's marker in the first attempt
        self.took_over = judged
        atomic_write_json(f"{self.path}.owner", self._record())
        return self

    def release(self) -> None:
        if self._fs is not None:
            self._stop.set()
            if self._thread:
                self._thread.join(timeout=5)
            if (_parse(self._read_store()[0]) or {}).get("token") == self.token:  # never delete a successor's
                with suppress(FileNotFoundError):
                    self._fs.rm(self._fpath)
        elif self._lease.is_locked:
            if _load(f"{self.path}.owner").get("token") == self.token:
                os.remove(f"{self.path}.owner")
            self._lease.release()  # filelock leaves a successor's marker in place

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # object stores: the record, its consistent read, conditional overwrite, create/takeover, heartbeat
    def _content(self) -> bytes:
        return json.dumps(self._record(heartbeat_at=_iso(time.time()), heartbeat_at_epoch=time.time())).encode()

    def _read_store(self, tries: int = 5) -> tuple[bytes | None, str | None]:
        """The record and its ETag, consistently: s3fs reads with GET If-Match: the ETag of its HEAD."""
        try:
            with self._fs.open(self._fpath, "rb") as f:
                return f.read(), (getattr(f, "details", None) or {}).get("ETag")
        except FileNotFoundError:
            return None, None
        except OSError as e:  # s3fs's FileExpired (EBUSY): replaced between HEAD and GET, so read again
            if e.errno == errno.EBUSY and tries > 1:
                return self._read_store(tries - 1)
            raise

    def _put_if(self, etag: str) -> bool:
        """Overwrite the record only while it is the version `etag` names (S3: PUT If-Match); False if it is not."""
        try:
            out = self._fs.pipe_file(self._fpath, self._content(), IfMatch=etag)
        except OSError as e:
            if e.errno == errno.EINVAL or "Precondition" in str(e):  # s3fs's 412 PreconditionFailed
                return False
            raise
        self._etag = (out or {}).get("ETag") or self._read_store()[1]
        return True

    def _acquire_store(self) -> None:
        for _ in range(50):
            try:
                with self._fs.open(self._fpath, "xb") as f:
                    f.write(self._content())
            except FileExistsError:
                pass
            except (ValueError, NotImplementedError) as e:  # a backend without exclusive create
                raise UserError(f"lock path {self.path}: its filesystem ({type(self._fs).__name__}) cannot create a "
                                f"file exclusively (open mode 'xb': {e}); put the output root (and so its _locks/) "
                                f"on a local/NFS path or on S3") from None
            raw, etag = self._read_store()
            if (owner := _parse(raw)) is None:
                continue  # released between our attempts: try again
            if owner.get("token") == self.token:  # read back, in case a backend ignores the "x"
                self._etag = etag
                return
            owner = owner or {"host": "?", "ttl_s": self.ttl_s}  # unreadable: no run wrote it (a PUT is whole)
            if not (info := inspect_lock(owner)).stale:
                raise LockHeld(self.path, owner)
            if etag is not None and not self._put_if(etag):
                continue  # someone replaced the record we judged: look again
            self.took_over = info
            if etag is not None:
                return
            self._fs.rm(self._fpath)  # no ETag, so no conditional overwrite: best effort delete, then create
        raise LockHeld(self.path, _parse(self._read_store()[0]) or {})

    def _beat_store(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self._etag is not None:
                    ours = self._put_if(self._etag)
                elif ours := (_parse(self._read_store()[0]) or {}).get("token") == self.token:
                    self._fs.pipe_file(self._fpath, self._content())  # no ETags: best effort read, check, write
            except OSError:
                continue  # transient: beat next time
            if not ours:
                self.lost = True
                return
