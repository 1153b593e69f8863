"""The engine in a child process (pipelines.serve.engine_process) behind the batcher, no Ray: the same
answers as the engine itself, loud start-up errors, no orphan child, and a dead child fails its
requests instead of hanging them.

    .venv/bin/python -m pytest tests/pipelines/serve/test_serve_engine_process.py -q
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal

import pytest

from pipelines.serve.batching import ProcessBatcher
from pipelines.serve.engine_process import EngineProcess


def _params(n_tokens: int, **kw):
    from gptcore.sampling import SamplingParams

    return SamplingParams(max_new_tokens=n_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from gptcore.checkpoint import load_checkpoint
    from gptcore.engine import Engine

    ck = load_checkpoint(tiny_ckpt)
    return Engine(ck.model, ck.tokenizer, max_batch_size=8)


def test_sampled_requests_cross_the_pipe_intact(tiny_ckpt, engine):
    """Seeded sampling with n=2, logprobs, repetition penalty and a stop string, streaming and not,
    together in one batch: every choice equals the in-process engine's answer."""
    tok = engine.tokenizer
    reqs = [("a", tok.encode("To be, or not"), _params(30, temperature=0.9, top_k=20, seed=7, n=2, logprobs=True)),
            ("b", tok.encode("The quick brown"), _params(25, temperature=1.1, seed=3, repetition_penalty=1.3)),
            ("c", tok.encode("hello there"), _params(40, temperature=0.0, stop=["the"]))]
    ref = engine.generate([p for _, p, _ in reqs], [sp for *_, sp in reqs])

    async def main(proc):
        b = ProcessBatcher(proc, max_batch_size=8)
        b.start()
        try:
            streams = [b.submit(rid, p, sp, num_choices=sp.n, stream=rid != "b") for rid, p, sp in reqs]
            got = []
            for s in streams:
                ids, lps, reasons = {}, {}, {}
                async for ev in s:
                    assert ev.kind != "error", ev.error
                    if ev.kind == "token":
                        ids.setdefault(ev.index, []).extend(ev.token_ids)
                        lps.setdefault(ev.index, []).extend(ev.logprobs or [])
                    else:
                        reasons[ev.index] = ev.finish_reason
                got.append((ids, lps, reasons))
            return got, b.stats
        finally:
            b.close()

    proc = EngineProcess.start(str(tiny_ckpt), max_batch_size=8)
    try:
        got, stats = asyncio.run(main(proc))
    finally:
        proc.close()
    assert proc.proc.returncode == 0  # "close" ends the child cleanly
    for (ids, lps, reasons), r in zip(got, ref):
        for c in r.outputs:
            assert ids.get(c.index, []) == c.token_ids and reasons[c.index] == c.finish_reason
            if c.logprobs is not None:
                assert lps[c.index] == pytest.approx(c.logprobs, abs=1e-6)
    # counters come from the child's steps: 4 sequences (a's two choices, b, c) shared the first steps
    assert stats.max_batch == 4 and stats.max_requests_in_step == 3 and stats.steps >= 40
    assert stats.finished == 3 and stats.tokens > 0


def test_unloadable_checkpoint_is_a_loud_start_error(tiny_ckpt, tmp_path):
    bad = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, bad)
    with open(bad / "model.safetensors", "r+b") as f:  # flip bytes: the checksum check must catch it
        f.seek(100)
        f.write(b"\x00" * 8)
    with pytest.raises(RuntimeError, match="could not start: CheckpointError: .*model.safetensors was altered"):
        EngineProcess.start(str(bad))
    with pytest.raises(RuntimeError, match="could not start: CheckpointError: .*does not exist"):
        EngineProcess.start(str(tmp_path / "missing"))


def test_idle_dead_child_makes_the_batcher_not_alive(tiny_ckpt):
    """Serve's health check asks `alive`: a child killed while no request was running must show too."""
    proc = EngineProcess.start(str(tiny_ckpt))
    b = ProcessBatcher(proc)
    assert b.alive
    os.kill(proc.pid, signal.SIGKILL)
    proc.proc.wait(timeout=30)
    assert not b.alive
    proc.close()


def test_child_exits_when_the_parent_end_closes(tiny_ckpt):
    """A replica killed without a goodbye (SIGKILL) only closes its socket: the child must notice."""
    proc = EngineProcess.start(str(tiny_ckpt))
    proc.conn.close()
    assert proc.proc.wait(timeout=30) == 0


def test_dead_child_fails_requests_in_flight_and_the_batcher_reports_it(tiny_ckpt, engine):
    async def main(proc):
        b = ProcessBatcher(proc, max_batch_size=4)
        b.start()
        s = b.submit("long", engine.tokenizer.encode("hello"), _params(240, temperature=0.0))
        kinds = []
        async for ev in s:
            kinds.append(ev.kind)
            if ev.kind == "token" and s.tokens == 2:
                os.kill(proc.pid, signal.SIGKILL)  # as the OOM killer would
        assert kinds[-1] == "error" and "engine process died" in str(ev.error)
        assert not b.alive
        with pytest.raises(RuntimeError, match="engine process died"):
            b.submit("next", engine.tokenizer.encode("hello"), _params(3))
        b.close()

    proc = EngineProcess.start(str(tiny_ckpt), max_batch_size=4)
    try:
        asyncio.run(asyncio.wait_for(main(proc), timeout=60))
    finally:
        proc.close()
