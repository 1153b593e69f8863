"""The continuous-batching loop on a real engine (no Ray): requests join mid-decode and leave when done.

Every test runs twice: with the engine on the event loop (ContinuousBatcher) and with the engine in a
child process (ProcessBatcher over pipelines.serve.engine_process.EngineProcess, as Serve runs it).

    .venv/bin/python -m pytest tests/pipelines/serve/test_serve_batching.py -q
"""

from __future__ import annotations

import asyncio

import pytest

from pipelines.serve.batching import ContinuousBatcher, ProcessBatcher


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    """The in-process engine: the inline batcher's, and the reference answers of both."""
    from gptcore.checkpoint import load_checkpoint
    from gptcore.engine import Engine

    ck = load_checkpoint(tiny_ckpt)
    return Engine(ck.model, ck.tokenizer, max_batch_size=8)


@pytest.fixture(scope="module")
def engine_proc(tiny_ckpt):
    from pipelines.serve.engine_process import EngineProcess

    proc = EngineProcess.start(str(tiny_ckpt), max_batch_size=8, threads=1)
    yield proc
    proc.close()


@pytest.fixture(params=["inline", "process"])
def make_batcher(request, engine):
    """make_batcher(**kw) -> a batcher over the in-process engine or over the engine process."""
    if request.param == "inline":
        return lambda **kw: ContinuousBatcher(engine, **kw)
    proc = request.getfixturevalue("engine_proc")
    return lambda **kw: ProcessBatcher(proc, **kw)


def _params(n_tokens: int, **kw):
    from gptcore.sampling import SamplingParams

    return SamplingParams(max_new_tokens=n_tokens, temperature=0.0, ignore_eos=True, **kw)


async def _consume(stream, finished: list, name: str) -> list[int]:
    ids: list[int] = []
    async for ev in stream:
        assert ev.kind != "error", ev.error
        if ev.kind == "token":
            ids.extend(ev.token_ids)
    finished.append(name)
    return ids


async def _join_mid_decode(engine, make_batcher, continuous: bool):
    tok = engine.tokenizer
    b = make_batcher(max_batch_size=8, continuous=continuous)
    b.start()
    try:
        finished: list[str] = []
        p_long, p_short = tok.encode("To be, or not to be"), tok.encode("The quick brown fox")
        long = b.submit("long", p_long, _params(200))
        t_long = asyncio.create_task(_consume(long, finished, "long"))
        for _ in range(20_000):  # bounded: wait until the long request is decoding
            if long.tokens >= 3:
                break
            await asyncio.sleep(0.001)
        assert 3 <= long.tokens < 200, "the long request should be mid-decode"
        short = b.submit("short", p_short, _params(4))
        short_ids = await _consume(short, finished, "short")
        long_ids = await t_long
        return b.stats, finished, p_long, long_ids, p_short, short_ids
    finally:
        b.close()


def test_short_request_joins_running_decode_and_finishes_first(engine, make_batcher):
    stats, finished, p_long, long_ids, p_short, short_ids = asyncio.run(
        _join_mid_decode(engine, make_batcher, continuous=True))
    assert finished == ["short", "long"]
    assert (len(long_ids), len(short_ids)) == (200, 4)
    # both were decoded in the same engine steps
    assert stats.max_requests_in_step == 2 and stats.max_batch >= 2 and stats.multi_steps >= 4
    # batching does not change what each request gets (greedy = the engine's own answer alone)
    ref = engine.generate([p_long, p_short], [_params(200), _params(4)])
    assert long_ids == ref[0].outputs[0].token_ids and short_ids == ref[1].outputs[0].token_ids


def test_static_batching_makes_the_newcomer_wait(engine, make_batcher):
    stats, finished, *_ = asyncio.run(_join_mid_decode(engine, make_batcher, continuous=False))
    assert finished == ["long", "short"]
    assert stats.max_requests_in_step == 1


def test_abort_and_bad_request_do_not_stop_the_loop(engine, make_batcher):
    async def main():
        b = make_batcher(max_batch_size=4)
        b.start()
        try:
            s = b.submit("a", engine.tokenizer.encode("hello"), _params(240))
            reasons = []
            async for ev in s:  # abort once decoding is under way (as a client disconnect does)
                if ev.kind == "token" and s.tokens == 2:
                    b.abort("a")
                elif ev.kind == "finish":
                    reasons.append(ev.finish_reason)
            assert reasons == ["abort"] and s.tokens < 240
            # a prompt longer than the context: an error event for that request only
            bad = b.submit("bad", [1] * 400, _params(4))
            evs = [ev async for ev in bad]
            assert evs[-1].kind == "error" and isinstance(evs[-1].error, ValueError)
            ok = b.submit("ok", engine.tokenizer.encode("hello"), _params(3, n=1))
            toks = [t for ev in [e async for e in ok] if ev.kind == "token" for t in ev.token_ids]
            assert len(toks) == 3 and b.alive
        finally:
            b.close()

    asyncio.run(main())


def test_non_streaming_request_arrives_whole_with_its_first_token_time(engine, make_batcher):
    """stream=False: one token event with the whole completion (no per-token events), yet TTFT and TPOT
    still measure when the first token was made, not when the request finished."""
    async def main():
        b = make_batcher(max_batch_size=4)
        b.start()
        try:
            prompt = engine.tokenizer.encode("Once upon a time")
            s = b.submit("whole", prompt, _params(40), stream=False)
            evs = [ev async for ev in s]
            return s, evs, prompt
        finally:
            b.close()

    s, evs, prompt = asyncio.run(main())
    assert [e.kind for e in evs] == ["token", "finish"] and evs[1].finish_reason == "length"
    ref = engine.generate([prompt], _params(40))[0].outputs[0]
    assert evs[0].token_ids == ref.token_ids and evs[0].text == ref.text and s.tokens == 40
    assert 0 < s.ttft_s < s.last_token_t - s.arrival  # the first of 40 tokens came before the last
    assert s.tpot_s > 0


def test_step_hook_counts_every_step_after_the_finished_request_resumes(engine, make_batcher):
    """on_step (the replica's Prometheus hook) sees each engine step once, with its batch size, and runs
    after the consumers its step outputs woke: a finished request's answer is not held up by metrics."""
    async def main():
        calls: list[tuple[int, bool]] = []  # (sequences in the step, whether the request's consumer was done)
        done = asyncio.Event()
        b = make_batcher(max_batch_size=4, on_step=lambda seqs, queued, running: calls.append((seqs, done.is_set())))
        b.start()
        try:
            s = b.submit("r", engine.tokenizer.encode("Once upon a time"), _params(12), stream=False)
            async for _ in s:
                pass
            done.set()
            for _ in range(20):  # let the deferred hook run
                await asyncio.sleep(0)
            return calls, b.stats.steps
        finally:
            b.close()

    calls, steps = asyncio.run(main())
    assert len(calls) == steps >= 12 and all(seqs == 1 for seqs, _ in calls)
    # the step that finished the request was counted after its consumer had its answer
    assert calls[-1][1] is True
