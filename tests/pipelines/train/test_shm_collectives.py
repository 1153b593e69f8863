"""pipelines.train.shm_collectives: two real processes (gloo process group + DeepSpeed's comm layer); the
shared-memory all-reduce / all-gather give what gloo gives, the same bits on every rank, fall back for what
they do not serve, and a rank that dies mid-collective is an error in the survivor, not a hang."""

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


def _worker(rank: int, world: int, port: int, mode: str, q) -> None:
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
    except Exception as e:  # noqa: BLE001
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
