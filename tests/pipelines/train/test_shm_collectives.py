"""pipelines.train.shm_collectives: two real processes (gloo process group + DeepSpeed's comm layer); the
shared-memory all-reduce / all-gather give what gloo gives, the same bits on every rank, fall back for what
they do not serve; a rank that dies mid-collective is an error in the survivor, not a hang; a rank that is
alive but stopped (SIGSTOP) is a timeout error naming it once shm_collectives_timeout_s have passed; and a
DeepSpeed version the module was not written against keeps gloo, with a warning."""

from __future__ import annotations

import os
import platform
import socket

import pytest

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not os.path.isdir("/dev/shm"),
                                reason="shared-memory collectives run on x86-64 Linux only")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_group(rank: int, world: int, port: int) -> None:
    """This process joins a gloo group of `world` ranks, and DeepSpeed's comm layer wraps it (CPU)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    import torch
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed.comm as dc

    from pipelines.train.deepspeed import _skip_shm_build

    _skip_shm_build()
    dc.init_distributed("gloo", auto_mpi_discovery=False, dist_init_required=False)


def _worker(rank: int, world: int, port: int, mode: str, q) -> None:
    _process_group(rank, world, port)
    import deepspeed.comm as dc
    import torch
    import torch.distributed as tdist

    from pipelines.train.shm_collectives import install

    try:
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(3000, 7, generator=g)  # bigger than nothing, smaller than the 1 MB first segment
        big = torch.randn(700_000, generator=g)  # 2.8 MB: the segments grow
        want_x, want_big = x.clone(), big.clone()
        tdist.all_reduce(want_x)  # gloo's answer
        tdist.all_reduce(want_big)
        assert install() is True
        dc.all_reduce(x)
        dc.all_reduce(big)
        part = torch.full((5,), float(rank))
        out = torch.empty(5 * world)
        dc.all_gather_into_tensor(out, part)
        mx = torch.tensor([float(rank)])
        dc.all_reduce(mx, op=dc.ReduceOp.MAX)  # not served from shared memory: goes to gloo
        if mode == "die":
            if rank == 1:
                os._exit(0)
            try:
                dc.all_reduce(torch.ones(4))
                q.put((rank, "no error"))
            except RuntimeError as e:
                q.put((rank, str(e)))
            return
        every = [None] * world
        tdist.all_gather_object(every, x)
        q.put((rank, {
            "x_close": torch.allclose(x, want_x, atol=1e-5), "big_close": torch.allclose(big, want_big, atol=1e-5),
            "same_bits": all(torch.equal(e, x) for e in every),
            "gather": out.tolist() == [float(r) for r in range(world) for _ in range(5)],
            "max": mx.item() == world - 1}))
    except Exception as e:
        q.put((rank, f"error: {type(e).__name__}: {e}"))


def _spawn(mode: str, world: int = 2):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _port()
    ps = [ctx.Process(target=_worker, args=(r, world, port, mode, q)) for r in range(world)]
    for p in ps:
        p.start()
    out = {}
    n_expected = world if mode != "die" else 1
    for _ in range(n_expected):
        r, v = q.get(timeout=120)
        out[r] = v
    for p in ps:
        p.join(timeout=60)
    return out


def test_shared_memory_collectives_match_gloo():
    out = _spawn("ok")
    for rank, v in out.items():
        assert isinstance(v, dict), v
        assert v == {"x_close": True, "big_close": True, "same_bits": True, "gather": True, "max": True}, (rank, v)


def test_a_dead_rank_is_an_error_not_a_hang():
    out = _spawn("die")
    assert "died during a shared-memory collective" in out[0], out


def _stuck_worker(rank: int, world: int, port: int, timeout_s: float, conn, go) -> None:
    """After a first collective the test SIGSTOPs rank 1; rank 0's next one must time out naming it.
    Before that, a DeepSpeed version this module was not written against keeps gloo (and warns). Results go
    through a pipe per rank (a send is done when it returns: a multiprocessing.Queue's feeder thread could be
    stopped holding the queue's lock)."""
    import time
    import warnings

    _process_group(rank, world, port)
    import deepspeed.comm as dc
    import torch

    from pipelines.train import shm_collectives as shm

    out: dict = {}
    try:
        orig = dc.all_reduce
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pinned, shm.DEEPSPEED_VERSIONS = shm.DEEPSPEED_VERSIONS, ("0.0.1",)
            out["other_version"] = shm.install()
            shm.DEEPSPEED_VERSIONS = pinned
        out["untouched"] = dc.all_reduce is orig
        out["warned"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        out["installed"] = shm.install(timeout_s=timeout_s)
        first = torch.ones(4)
        dc.all_reduce(first)  # both ranks: the segments exist from here on
        out["first"] = first.tolist()
        if rank == 1:
            conn.send((rank, {**out, "pid": os.getpid()}))
            time.sleep(600)  # stopped here by the test: a live peer that never arrives
            return
        go.wait(120)  # the test has stopped rank 1
        t0 = time.monotonic()
        try:
            dc.all_reduce(torch.ones(4))
            out["error"] = None
        except shm.ShmCollectiveError as e:
            out["error"] = str(e)
            out["user_error"] = isinstance(e, shm.UserError)
        out["waited_s"] = time.monotonic() - t0
        conn.send((rank, out))
    except Exception as e:
        conn.send((rank, f"error: {type(e).__name__}: {e}"))


def test_a_stopped_rank_is_a_timeout_error_naming_it():
    import multiprocessing as mp
    import signal

    timeout_s = 3.0
    ctx = mp.get_context("spawn")
    pipes, go = [ctx.Pipe(duplex=False) for _ in range(2)], ctx.Event()  # (receive end, send end)
    port = _port()
    ps = [ctx.Process(target=_stuck_worker, args=(r, 2, port, timeout_s, pipes[r][1], go)) for r in range(2)]
    for p in ps:
        p.start()

    def result(rank: int):
        assert pipes[rank][0].poll(180), f"rank {rank} reported nothing in 180 s"
        r, v = pipes[rank][0].recv()
        out[r] = v
        return v

    out: dict = {}
    try:
        assert isinstance(result(1), dict), out  # rank 0 waits for `go`
        os.kill(ps[1].pid, signal.SIGSTOP)
        go.set()
        result(0)
    finally:
        for p in ps:
            if p.is_alive():
                p.kill()  # SIGKILL ends a stopped process too
            p.join(timeout=30)
    r0, r1 = out[0], out[1]
    assert isinstance(r0, dict) and isinstance(r1, dict), out
    for v in (r0, r1):
        assert v["other_version"] is False and v["untouched"], v
        assert v["installed"] is True and v["first"] == [2.0] * 4, v
    assert any("0.0.1" in w and "gloo" in w for w in r0["warned"]), r0["warned"]  # rank 0 says why
    err = r0["error"]
    assert err and f"rank 1 (pid {r1['pid']})" in err and "all_reduce" in err and "timed out" in err, err
    assert f"shm_collectives_timeout_s={timeout_s:g}" in err and r0["user_error"], err
    assert r0["waited_s"] >= timeout_s, r0  # it waited the configured time, then raised (no hang)
    assert not ps[1].is_alive() and ps[1].exitcode == -signal.SIGKILL


def test_deepspeed_version_guard():
    from importlib.metadata import version

    from pipelines.train import shm_collectives as shm

    assert shm.deepspeed_problem(version("deepspeed")) is None, "the pinned DeepSpeed must be a supported one"
    why = shm.deepspeed_problem("0.20.0")
    assert "0.20.0" in why and "gloo" in why and "shm_collectives=false" in why
