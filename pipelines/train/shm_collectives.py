"""Shared-memory collectives for CPU workers on one machine, under DeepSpeed (instead of gloo over TCP).

    from pipelines.train import shm_collectives
    shm_collectives.install(timeout_s=300)   # every rank, after deepspeed.initialize: True when it took over
    shm_collectives.uninstall()              # DeepSpeed's own functions back (tests; a second install does it too)

The one seam: pipelines.train.deepspeed.build_engine calls install() (TrainConfig.shm_collectives,
shm_collectives_timeout_s); nothing else patches deepspeed.comm. What DeepSpeed's ZeRO and its
data-parallel all-reduce call most (`deepspeed.comm.all_reduce` with SUM and
`deepspeed.comm.all_gather_into_tensor`, blocking, over the whole world) is served from /dev/shm: every
rank copies its tensor into its own shared segment, a barrier, every rank reads all segments in rank order
(so every rank computes the same sum, bit for bit), another barrier. gloo over this kind of machine's
loopback takes 3-6 ms for a 3.2 MB all-reduce; the 2-worker ZeRO-2 step of the nanoGPT recipe ran 1.21x
faster (time-sliced A/B, BENCHMARKS.md "Training" (b)).

Safety:
- Version guard: written against deepspeed.comm of DeepSpeed DEEPSPEED_VERSIONS (its module-level
  all_reduce / all_gather_into_tensor, looked up by callers at call time). On another version every rank
  keeps gloo and rank 0 warns (RuntimeWarning); likewise when a rank is on another host (hostname + boot
  id), /dev/shm is not writable, or libc has no POSIX semaphores.
- Memory ordering: the barrier is built on POSIX named semaphores (sem_post / sem_timedwait through
  ctypes, one per rank, in /dev/shm): at a barrier each rank posts every other rank's semaphore once and
  takes its own world-1 times. POSIX lists sem_post and sem_wait/sem_timedwait among the functions that
  synchronise memory (XBD 4.12; glibc: a release fetch-add and an acquire compare-exchange on the
  semaphore word), so what a rank wrote to its segment before posting is visible to every rank that
  returned from its wait, on any CPU architecture; no argument from a CPU's store order is needed. The
  per-rank epoch flags beside the semaphores are plain stores used only to name a missing rank in errors.
- Every wait is bounded: spin on sem_trywait briefly, then sem_timedwait in slices of at most 1 s. A peer
  whose process is gone (or a zombie) raises ShmCollectiveError "rank R (pid P) died during a
  shared-memory collective" within a slice; a live peer that does not arrive (stopped, hung) raises
  ShmCollectiveError naming the rank(s), the collective and the timeout once timeout_s have passed.
Everything else (async calls, other ops, sub-groups, GPU tensors, no room in /dev/shm) goes to DeepSpeed's
own implementation. Does not: work across machines, or time out the gloo calls it makes while setting up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import time
import uuid
import warnings
from pathlib import Path

from pipelines.errors import UserError

SHM = Path("/dev/shm")
DEEPSPEED_VERSIONS = ("0.19.8",)  # the deepspeed.comm this module was written and tested against
DEFAULT_TIMEOUT_S = 300.0
_FLAG_STRIDE = 8  # int64s per rank flag (64 bytes: one cache line each)
_SPINS = 200  # sem_trywait tries before blocking (a peer a few microseconds behind costs no syscall)
_SLICE_S = 1.0  # longest single blocking wait: how soon a dead peer is noticed


class ShmCollectiveError(UserError, RuntimeError):
    """A shared-memory collective cannot complete: a peer died or did not arrive within the timeout."""


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _libc():
    """libc with the POSIX semaphore functions typed, or None (glibc < 2.34 keeps them in libpthread)."""
    for name in ("c", "pthread"):
        path = ctypes.util.find_library(name)
        if not path:
            continue
        lib = ctypes.CDLL(path, use_errno=True)
        if not all(hasattr(lib, f) for f in ("sem_open", "sem_post", "sem_trywait", "sem_timedwait",
                                             "sem_close", "sem_unlink")):
            continue
        lib.sem_open.restype = ctypes.c_void_p
        lib.sem_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_uint]
        for f in ("sem_post", "sem_trywait", "sem_close"):
            getattr(lib, f).argtypes = [ctypes.c_void_p]
        lib.sem_timedwait.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Timespec)]
        lib.sem_unlink.argtypes = [ctypes.c_char_p]
        return lib
    return None


def _sem_open(lib, name: bytes, create: bool) -> int:
    h = lib.sem_open(name, (os.O_CREAT | os.O_EXCL) if create else 0, 0o600, 0)
    if not h:  # SEM_FAILED is NULL in glibc
        raise ShmCollectiveError(f"sem_open({name.decode()}) failed: {os.strerror(ctypes.get_errno())}")
    return h


class ShmCollectives:
    def __init__(self, rank: int, world: int, tag: str, pids: list[int], timeout_s: float = DEFAULT_TIMEOUT_S,
                 lib=None):
        import torch
        import torch.distributed as tdist

        self.rank, self.world, self.tag, self.pids, self.timeout_s = rank, world, tag, pids, float(timeout_s)
        self.cap, self.segs, self.epoch, self.calls = 0, [], 0, 0
        self.lib = lib = lib or _libc()
        flags = SHM / f"{tag}-flags"
        if rank == 0:
            with open(flags, "wb") as f:
                f.truncate(8 * _FLAG_STRIDE * world)
        names = [f"/{tag}-s{r}".encode() for r in range(world)]  # /dev/shm/sem.<tag>-s<r>
        own = _sem_open(lib, names[rank], create=True)
        tdist.barrier()
        self.sems = [own if r == rank else _sem_open(lib, names[r], create=False) for r in range(world)]
        self.flags = torch.from_file(str(flags), shared=True, size=_FLAG_STRIDE * world, dtype=torch.int64)
        tdist.barrier()
        # every rank has them open: nothing is left behind in /dev/shm if a rank dies later
        lib.sem_unlink(names[rank])
        if rank == 0:
            flags.unlink()

    def close(self) -> None:
        for h in self.sems:
            self.lib.sem_close(h)
        self.sems = []

    # ---- the barrier ------------------------------------------------------------------------

    def _barrier(self, op: str) -> None:
        """Every rank arrives before any leaves; memory written before it is visible to all after it."""
        self.epoch += 1
        self.flags[self.rank * _FLAG_STRIDE] = self.epoch  # diagnostics only: who has arrived
        for r in range(self.world):
            if r != self.rank:
                self.lib.sem_post(self.sems[r])
        mine = self.sems[self.rank]
        for _ in range(self.world - 1):
            self._take(mine, op)

    def _take(self, sem: int, op: str) -> None:
        lib = self.lib
        for _ in range(_SPINS):
            if lib.sem_trywait(sem) == 0:
                return
        start = time.monotonic()
        deadline = start + self.timeout_s
        ts = _Timespec()
        while True:
            now = time.monotonic()
            wait = min(_SLICE_S, max(0.0, deadline - now))
            t = time.time() + wait
            ts.tv_sec, ts.tv_nsec = int(t), int((t - int(t)) * 1e9)
            if lib.sem_timedwait(sem, ctypes.byref(ts)) == 0:
                return
            # ETIMEDOUT or EINTR: is a peer gone, or has the whole timeout passed?
            self._check_peers(op)
            if time.monotonic() >= deadline:
                raise self._timeout_error(op, time.monotonic() - start)

    def _check_peers(self, op: str) -> None:
        for r in range(self.world):
            if r != self.rank and not _alive(self.pids[r]):
                raise ShmCollectiveError(f"rank {r} (pid {self.pids[r]}) died during a shared-memory collective "
                                         f"({op}, call {self.calls}); rank {self.rank} stops waiting for it")

    def _timeout_error(self, op: str, waited: float) -> ShmCollectiveError:
        late = [r for r in range(self.world) if r != self.rank and int(self.flags[r * _FLAG_STRIDE]) < self.epoch]
        who = ", ".join(f"rank {r} (pid {self.pids[r]})" for r in late) or "a peer"
        return ShmCollectiveError(
            f"shared-memory {op} timed out: {who} did not reach the collective (call {self.calls}) within "
            f"shm_collectives_timeout_s={self.timeout_s:g} s; rank {self.rank} waited {waited:.1f} s. The peer "
            f"is alive but stuck (stopped, hung, or far slower); raise shm_collectives_timeout_s, or set "
            f"shm_collectives=false to use gloo")

    # ---- segments and collectives -----------------------------------------------------------

    def _ensure(self, nbytes: int) -> bool:
        """Segments of at least nbytes per rank (collective: every rank calls it with the same size)."""
        import torch
        import torch.distributed as tdist

        if nbytes <= self.cap:
            return True
        cap = max(nbytes, 2 * self.cap, 1 << 20)
        st = os.statvfs(SHM)
        # agree on whether there is room (a container's /dev/shm is often 64 MB): all ranks or none
        ok = torch.tensor([int(st.f_bavail * st.f_frsize > cap * self.world * 1.25)])
        tdist.all_reduce(ok, op=tdist.ReduceOp.MIN)
        if not ok.item():
            return False
        mine = SHM / f"{self.tag}-r{self.rank}-{cap}"
        with open(mine, "wb") as f:
            f.truncate(cap)
        tdist.barrier()
        self.segs = [torch.from_file(str(SHM / f"{self.tag}-r{r}-{cap}"), shared=True, size=cap, dtype=torch.uint8)
                     for r in range(self.world)]
        tdist.barrier()
        mine.unlink()
        self.cap = cap
        return True

    def _view(self, r: int, dtype, n: int):
        import torch

        return self.segs[r][: n * torch.empty((), dtype=dtype).element_size()].view(dtype)

    def all_reduce_sum(self, t) -> bool:
        n = t.numel()
        if not self._ensure(n * t.element_size()):
            return False
        self.calls += 1
        self._view(self.rank, t.dtype, n).copy_(t.reshape(-1))
        self._barrier("all_reduce")
        acc = self._view(0, t.dtype, n).clone()
        for r in range(1, self.world):
            acc += self._view(r, t.dtype, n)
        self._barrier("all_reduce")  # nobody overwrites its segment before everyone has read it
        t.copy_(acc.view_as(t))
        return True

    def all_gather_into_tensor(self, out, inp) -> bool:
        n = inp.numel()
        if out.numel() != n * self.world or out.dtype != inp.dtype or not self._ensure(n * inp.element_size()):
            return False
        self.calls += 1
        self._view(self.rank, inp.dtype, n).copy_(inp.reshape(-1))
        self._barrier("all_gather_into_tensor")
        flat = out.view(-1)
        for r in range(self.world):
            flat[r * n:(r + 1) * n].copy_(self._view(r, inp.dtype, n))
        self._barrier("all_gather_into_tensor")
        return True


def _alive(pid: int) -> bool:
    # a dead process stays a zombie until its parent reaps it; os.kill(pid, 0) would still succeed
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _host_id() -> str:
    boot = Path("/proc/sys/kernel/random/boot_id")
    return f"{socket.gethostname()}/{boot.read_text().strip() if boot.is_file() else ''}"


def deepspeed_problem(version: str) -> str | None:
    """Why this DeepSpeed version may not be patched (None: it is one this module was written against)."""
    if version in DEEPSPEED_VERSIONS:
        return None
    return (f"shm_collectives was written against DeepSpeed {', '.join(DEEPSPEED_VERSIONS)} (the functions of "
            f"deepspeed.comm it replaces), found {version}; using gloo. Check pipelines/train/shm_collectives.py "
            f"against this version and add it to DEEPSPEED_VERSIONS, or set shm_collectives=false")


def _decide(every: list[dict]) -> tuple[bool, str | None]:
    """(use shared memory?, why not: a warning, or None when there is nothing to warn about). The same
    answer on every rank: it is computed from what all ranks reported."""
    if any(e["host"] != every[0]["host"] for e in every):
        return False, None  # across machines: gloo, as designed
    for e in every:
        if e["deepspeed"]:
            return False, e["deepspeed"]
        if not e["shm"]:
            return False, f"{SHM} is not writable on rank {e['rank']}; shm_collectives uses gloo"
        if not e["sem"]:
            return False, f"libc on rank {e['rank']} has no POSIX named semaphores; shm_collectives uses gloo"
    return True, None


_installed: dict = {}  # the live install: {"shm": ShmCollectives, "all_reduce": orig, "all_gather_into_tensor": orig}


def uninstall() -> None:
    """Put DeepSpeed's own all_reduce / all_gather_into_tensor back (no-op when not installed)."""
    if not _installed:
        return
    import deepspeed.comm as dc

    dc.all_reduce = _installed["all_reduce"]
    dc.all_gather_into_tensor = _installed["all_gather_into_tensor"]
    _installed["shm"].close()
    _installed.clear()


def install(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Route DeepSpeed's blocking SUM all-reduces and all-gathers over the whole world through shared
    memory when every rank is on this host (collective: call it in every rank). Returns whether it did."""
    import deepspeed
    import torch.distributed as tdist

    uninstall()
    rank, world = tdist.get_rank(), tdist.get_world_size()
    if world < 2:
        return False
    lib = _libc()
    me = {"rank": rank, "host": _host_id(), "pid": os.getpid(), "deepspeed": deepspeed_problem(deepspeed.__version__),
          "shm": SHM.is_dir() and os.access(SHM, os.W_OK), "sem": lib is not None,
          "tag": f"raygpt-{uuid.uuid4().hex[:12]}"}
    every: list = [None] * world
    tdist.all_gather_object(every, me)
    use, why = _decide(every)
    if not use:
        if why and rank == 0:
            warnings.warn(why, RuntimeWarning, stacklevel=2)
        return False
    shm = ShmCollectives(rank, world, every[0]["tag"], [e["pid"] for e in every], timeout_s=timeout_s, lib=lib)
    _patch(shm, world)
    return True


def _patch(shm: ShmCollectives, world: int) -> None:
    import deepspeed.comm as dc

    orig_all_reduce, orig_all_gather = dc.all_reduce, dc.all_gather_into_tensor

    def whole_world(group) -> bool:
        return group is None or dc.get_world_size(group) == world

    def all_reduce(tensor, op=dc.ReduceOp.SUM, group=None, async_op=False, **kw):
        if (op == dc.ReduceOp.SUM and not async_op and whole_world(group) and tensor.device.type == "cpu"
                and shm.all_reduce_sum(tensor)):
            return None
        return orig_all_reduce(tensor, op=op, group=group, async_op=async_op, **kw)

    def all_gather_into_tensor(output_tensor, tensor, group=None, async_op=False, **kw):
        if (not async_op and whole_world(group) and tensor.device.type == "cpu"
                and shm.all_gather_into_tensor(output_tensor, tensor)):
            return None
        return orig_all_gather(output_tensor, tensor, group=group, async_op=async_op, **kw)

    _installed.update(shm=shm, all_reduce=orig_all_reduce, all_gather_into_tensor=orig_all_gather)
    dc.all_reduce = all_reduce
    dc.all_gather_into_tensor = all_gather_into_tensor
