"""Continuous batching for one Serve replica: a decode loop on the replica's event loop that requests join and leave.

    batcher = ContinuousBatcher(engine, max_batch_size=16)
    stream = batcher.submit("req-1", prompt_ids, SamplingParams(...), num_choices=1)   # inside the event loop
    async for ev in stream: ...                                # Event(kind="token"|"finish"|"error", ...)
    batcher.abort("req-1")                                     # client gone / timeout

One asyncio task owns the engine. Between two `engine.step()` calls it applies aborts, hands new
requests to `engine.add_request` (the engine prefills them into free slots of the running batch at
its next step) and yields to the event loop, so HTTP handlers run and enqueue more work; after each
step it routes every request's new tokens to that request's queue. A short request that arrives
mid-decode therefore decodes alongside the running ones and leaves as soon as its own tokens are done.

Why on the event loop and not a thread: a decode step of a small model is ~1 ms of which much is
Python; a second thread would fight the event loop for the GIL on every step (measured: 16
concurrent requests took ~1.5x as long as the engine alone; inline they match it). A step blocks
the loop only between two yields; torch releases the GIL inside kernels, so Serve's own threads
keep running.

Non-streaming requests (`stream=False`) are added to the engine with `deltas=False`: the engine
reports each completion once, whole, when it finishes (no per-token detokenisation or events while
it runs; the first token's time still comes along for the TTFT metric), and the loop wakes one
waiting coroutine per finished request instead of one per token.

`continuous=False` gives static batching instead: new requests wait until the whole running batch
has finished, then start together (after waiting up to `batch_wait_timeout_s` for company).

`ProcessBatcher` is the same batching over an engine in a child process
(pipelines.serve.engine_process; Serve's default, ServeConfig.engine_process): admission, slots,
aborts and event routing stay here on the event loop, the decode steps run on another core, and
the child's outputs arrive through an event-loop reader instead of a decode-loop task.

Does not: parse HTTP, enforce request limits or timeouts (pipelines.serve.app does), or run on more
than one engine.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("ray.serve")

YIELD_S = 0.001  # longest the decode loop runs steps without letting the event loop handle I/O


@dataclass
class Event:
    kind: str  # "token": new tokens of choice `index`; "finish": choice `index` is done; "error"
    request_id: str = ""
    index: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    error: BaseException | None = None
    t: float = 0.0  # perf_counter when the engine produced it
    first_t: float | None = None  # perf_counter of the choice's first token, when known (whole-completion events)


class RequestStream:
    """The events of one submitted request, consumed with `async for` (ends after every choice finished)."""

    def __init__(self, request_id: str, prompt: Any, params: Any, num_choices: int, num_seqs: int,
                 stream: bool = True, queue: asyncio.Queue | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.num_choices = num_choices  # distinct choice indices the engine reports (n)
        self.num_seqs = num_seqs  # batch slots it occupies (num_beams with beam search, else n)
        self.stream = stream  # False: events are delivered all at once when the request ends
        # events of several streams may share one queue (RequestGroup); Event.request_id tells them apart
        self.queue: asyncio.Queue[Event] = queue if queue is not None else asyncio.Queue()
        self.arrival = time.perf_counter()
        self.admitted_t: float | None = None  # handed to the engine (its prefill runs at the next step)
        self.engine_done_t: float | None = None  # the engine finished its last choice
        self.first_token_t: float | None = None
        self.last_token_t: float | None = None
        self.tokens = 0
        self.open = num_choices  # choices not finished yet (consumer side)
        self._engine_open = num_choices  # choices the engine has not finished (batcher side)
        self._backlog: list[Event] = []  # undelivered events of a non-streaming request

    @property
    def done(self) -> bool:
        return self.open <= 0

    def track(self, ev: Event) -> None:
        """Account an event taken from the queue (done, token counts, first/last token times)."""
        if ev.kind == "finish":
            self.open -= 1
        elif ev.kind == "error":
            self.open = 0
        elif ev.kind == "token" and ev.token_ids:
            if self.first_token_t is None:
                self.first_token_t = ev.first_t if ev.first_t is not None else ev.t
            self.last_token_t = ev.t
            self.tokens += len(ev.token_ids)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        if self.done:
            raise StopAsyncIteration
        ev = await self.queue.get()
        self.track(ev)
        return ev

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_t is None else self.first_token_t - self.arrival

    @property
    def queue_s(self) -> float | None:
        """Waiting for a free batch slot (arrival -> handed to the engine)."""
        return None if self.admitted_t is None else self.admitted_t - self.arrival

    @property
    def engine_s(self) -> float | None:
        """In the engine (handed over -> its last choice finished), shared steps included."""
        if self.admitted_t is None or self.engine_done_t is None:
            return None
        return self.engine_done_t - self.admitted_t

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_t is None or self.tokens < 2:
            return None
        return (self.last_token_t - self.first_token_t) / (self.tokens - 1)

    def _emit(self, ev: Event, last: bool = False) -> None:
        if self.stream:
            self.queue.put_nowait(ev)
            return
        self._backlog.append(ev)
        if last or ev.kind == "error":
            for e in self._backlog:
                self.queue.put_nowait(e)
            self._backlog.clear()


@dataclass
class BatchStats:
    steps: int = 0
    max_batch: int = 0  # most sequences decoded together in one step
    multi_steps: int = 0  # steps that decoded sequences of more than one request together
    max_requests_in_step: int = 0
    tokens: int = 0
    admitted: int = 0
    finished: int = 0
    errors: int = 0
    step_s: float = 0.0  # wall time inside engine.step()

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


class ContinuousBatcher:
    def __init__(self, engine: Any, max_batch_size: int = 16, continuous: bool = True,
                 batch_wait_timeout_s: float = 0.01,
                 on_step: Callable[[int, int, int], None] | None = None):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.continuous = continuous
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.on_step = on_step  # (sequences in the step, requests queued, requests running)
        self.stats = BatchStats()
        self._pending: collections.deque[RequestStream] = collections.deque()
        self._running: dict[str, RequestStream] = {}
        self._aborts: list[str] = []
        self._used = 0
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False

    # ---- public API (call from the event loop) ----------------------------------------------------

    def start(self) -> None:
        """Start the decode loop on the running event loop (submit() does it on first use)."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="raygpt-decode-loop")

    @property
    def alive(self) -> bool:
        """False once the decode loop has died (an engine bug it could not survive) or was closed."""
        return not self._closed and (self._task is None or not self._task.done())

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, request_id: str, prompt: Any, params: Any, num_choices: int = 1,
               num_seqs: int | None = None, queue: asyncio.Queue | None = None,
               stream: bool = True) -> RequestStream:
        """Queue a request; its events arrive on the returned stream (or on `queue`)."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        self.start()
        s = RequestStream(request_id, prompt, params, num_choices, num_seqs or num_choices, stream, queue)
        self._pending.append(s)
        self._kick()
        return s

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        self._kick()

    def _kick(self) -> None:
        """New work or an abort: wake the decode loop."""
        if self._wake is not None:
            self._wake.set()

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        self._fail_all(RuntimeError("server shutting down"))

    def _fail_all(self, err: BaseException) -> None:
        for s in list(self._running.values()) + list(self._pending):
            s._emit(Event("error", s.request_id, error=err, t=time.perf_counter()))
        self._running.clear()
        self._pending.clear()
        self._used = 0

    # ---- the loop ---------------------------------------------------------------------------------

    def _apply_aborts(self) -> None:
        aborts, self._aborts = self._aborts, []
        now = time.perf_counter()
        for rid in aborts:
            s = self._running.pop(rid, None)
            if s is not None:
                self._used -= s.num_seqs
                self.engine.abort(rid)
            else:
                s = next((p for p in self._pending if p.request_id == rid), None)
                if s is not None:
                    self._pending.remove(s)
            if s is not None:
                for i in range(s.num_choices):
                    s._emit(Event("finish", rid, i, finish_reason="abort", t=now), last=i == s.num_choices - 1)

    def _admit(self) -> None:
        if not self.continuous and self._running:
            return  # static batching: the running batch must drain first
        while self._pending and (self._used + self._pending[0].num_seqs <= self.max_batch_size or not self._running):
            s = self._pending.popleft()
            try:
                # a non-streaming request gets its completion once, whole: no per-token deltas
                self.engine.add_request(s.request_id, s.prompt, s.params, deltas=s.stream)
            except Exception as e:  # a prompt the engine refuses (too long, bad params): this request only
                self.stats.errors += 1
                s._emit(Event("error", s.request_id, error=e, t=time.perf_counter()))
                continue
            s.admitted_t = time.perf_counter()
            self._running[s.request_id] = s
            self._used += s.num_seqs
            self.stats.admitted += 1

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as e:  # an engine bug: fail the running requests, keep serving new ones
            logger.exception("raygpt engine step failed; failing %d running request(s)", len(self._running))
            for rid, s in self._running.items():
                try:
                    self.engine.abort(rid)
                except Exception:
                    pass
                s._emit(Event("error", rid, error=e, t=time.perf_counter()))
            self.stats.errors += len(self._running)
            self._running.clear()
            self._used = 0
            return
        now = time.perf_counter()
        self.stats.step_s += now - t0
        self._deliver(outputs, [(self.engine.last_step_rows, self.engine.last_step_requests)], now)

    def _deliver(self, outputs: list, steps: list[tuple[int, int]], now: float) -> None:
        """Route the outputs of `len(steps)` engine steps (steps[i]: the sequences and the distinct
        requests step i advanced) to their requests' streams, retire finished requests, update the
        stats and call the on_step hook once per step."""
        st = self.stats
        for o in outputs:
            s = self._running.get(o.request_id)
            if s is None:
                continue  # aborted meanwhile
            if o.new_token_ids or o.new_text:
                st.tokens += len(o.new_token_ids)
                s._emit(Event("token", o.request_id, o.index, list(o.new_token_ids), o.new_text or "",
                              logprobs=o.new_logprobs, t=now, first_t=o.first_token_time))
            if o.finished:
                s._engine_open -= 1
                last = s._engine_open <= 0
                s._emit(Event("finish", o.request_id, o.index, finish_reason=o.finish_reason, t=now), last=last)
                if last:
                    s.engine_done_t = now
                    del self._running[o.request_id]
                    self._used -= s.num_seqs
                    st.finished += 1
        for seqs, nreq in steps:
            st.steps += 1
            st.max_batch = max(st.max_batch, seqs)
            st.max_requests_in_step = max(st.max_requests_in_step, nreq)
            if nreq > 1:
                st.multi_steps += 1
        if self.on_step is not None and steps:
            # after the consumers this wakes: a finished request's answer goes out before its steps are
            # counted (a Ray metric call is ~10-30 us of Python and one message from an engine process
            # can carry tens of steps: ~0.3 ms of a 1-client request's latency before this)
            sizes, queued, running = [seqs for seqs, _ in steps], len(self._pending), len(self._running)
            try:
                asyncio.get_running_loop().call_soon(self._record_steps, sizes, queued, running)
            except RuntimeError:  # no event loop (a direct call): record now
                self._record_steps(sizes, queued, running)

    def _record_steps(self, sizes: list[int], queued: int, running: int) -> None:
        try:
            for seqs in sizes:
                self.on_step(seqs, queued, running)
        except Exception:
            pass

    async def _run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug here: fail everyone now (check_health then replaces the replica)
            logger.exception("raygpt decode loop died")
            for s in list(self._running.values()) + list(self._pending):
                s._emit(Event("error", s.request_id, error=e, t=time.perf_counter()))
            self._running.clear()
            self._pending.clear()
            raise

    async def _loop(self) -> None:
        wake = self._wake
        last_yield = time.perf_counter()
        while not self._closed:
            if not (self._pending or self._running or self._aborts):
                wake.clear()
                await wake.wait()
                continue
            if not self.continuous and not self._running and self._pending:
                # static batching: give the first request a moment to gather company
                waited = time.perf_counter() - self._pending[0].arrival
                room = self.max_batch_size - sum(s.num_seqs for s in self._pending)
                if waited < self.batch_wait_timeout_s and room > 0:
                    await asyncio.sleep(self.batch_wait_timeout_s - waited)
            self._apply_aborts()
            self._admit()
            if self._running:
                self._step()
            # let HTTP handlers and consumers run (new requests join at the next step); with sub-ms
            # steps, yield once per YIELD_S instead of after every step: a loop iteration polls I/O
            now = time.perf_counter()
            if now - last_yield >= YIELD_S or not self._running:
                await asyncio.sleep(0)
                last_yield = time.perf_counter()



class ProcessBatcher(ContinuousBatcher):
    """The same batching over an engine in a child process (pipelines.serve.engine_process.EngineProcess).

    No decode-loop task here: the child steps on its own core. submit()/abort() and every message
    from the child run `_pump`, which applies aborts, admits pending requests into free slots and
    sends both to the child in one message; the child's step outputs arrive through an event-loop
    reader and are routed exactly as the in-process loop routes them. If the child dies, every
    request in flight gets an error and `alive` turns False (Serve's health check then replaces
    the replica)."""

    def __init__(self, engine: Any, **kwargs: Any):
        super().__init__(engine, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead: BaseException | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self.engine.fileno(), self._on_readable)

    @property
    def alive(self) -> bool:
        # the child may die while no request is in flight (nothing reads its socket then): ask the OS too
        return not self._closed and self._dead is None and self.engine.alive

    def submit(self, *args: Any, **kwargs: Any) -> RequestStream:
        if self._dead is not None:
            raise RuntimeError(f"the engine process died ({self._dead}); this replica is being replaced")
        return super().submit(*args, **kwargs)

    def _kick(self) -> None:
        if self._loop is not None:
            self._pump()

    def close(self) -> None:
        """Stop: fail what is in flight and drop it from the child (whose owner closes it)."""
        if self._dead is None and not self._closed:
            for rid in self._running:
                self.engine.abort(rid)
            self._send()
        self._closed = True
        self._stop_reading()
        self._fail_all(RuntimeError("server shutting down"))

    # ---- driving the child ------------------------------------------------------------------------

    def _stop_reading(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self.engine.fileno())
            except (OSError, ValueError):
                pass

    def _died(self, err: BaseException) -> None:
        if self._dead is not None or self._closed:
            return
        self._dead = err
        logger.error("raygpt: the engine process died (%s); failing %d request(s)", err,
                     len(self._running) + len(self._pending))
        self._stop_reading()
        self._fail_all(RuntimeError(f"the engine process died ({err})"))

    def _pump(self) -> None:
        if self._closed or self._dead is not None:
            return
        self._apply_aborts()
        if not self.continuous and not self._running and self._pending:
            # static batching: give the first request a moment to gather company
            waited = time.perf_counter() - self._pending[0].arrival
            room = self.max_batch_size - sum(s.num_seqs for s in self._pending)
            if waited < self.batch_wait_timeout_s and room > 0:
                if self._timer is None:
                    self._timer = self._loop.call_later(self.batch_wait_timeout_s - waited, self._on_timer)
                self._send()
                return
        self._admit()
        self._send()

    def _on_timer(self) -> None:
        self._timer = None
        if not self._pending:
            return
        # the wait is over for the first pending request: admit whatever has gathered
        self._apply_aborts()
        self._admit()
        self._send()

    def _send(self) -> None:
        try:
            self.engine.flush()
        except (OSError, ValueError) as e:
            self._died(e)

    def _on_readable(self) -> None:
        try:
            msgs = self.engine.receive()
        except (EOFError, OSError) as e:
            self._died(e if str(e) else EOFError("its connection closed"))
            return
        now = time.perf_counter()
        for msg in msgs:
            kind = msg[0]
            if kind == "step":
                _, outputs, steps, step_s = msg
                self.stats.step_s += step_s
                self._deliver(outputs, steps, now)
            elif kind == "add_error":  # a prompt the engine refused: that request only
                _, rid, err = msg
                s = self._running.pop(rid, None)
                if s is not None:
                    self._used -= s.num_seqs
                    self.stats.admitted -= 1
                    self.stats.errors += 1
                    s._emit(Event("error", rid, error=err, t=now))
            elif kind == "step_error":  # an engine bug: the child dropped these requests
                _, err, rids = msg
                logger.error("raygpt engine step failed in the engine process; failing %d request(s)", len(rids))
                for rid in rids:
                    s = self._running.pop(rid, None)
                    if s is not None:
                        self._used -= s.num_seqs
                        self.stats.errors += 1
                        s._emit(Event("error", rid, error=err, t=now))
        self._pump()

class RequestGroup:
    """The engine requests of one HTTP request (one per prompt), read as one merged event stream."""

    def __init__(self, batcher: ContinuousBatcher, stream: bool = True):
        self.batcher = batcher
        self.stream = stream
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.streams: dict[str, RequestStream] = {}

    def submit(self, request_id: str, prompt: Any, params: Any, num_choices: int = 1,
               num_seqs: int | None = None) -> RequestStream:
        s = self.batcher.submit(request_id, prompt, params, num_choices, num_seqs, queue=self.queue,
                                stream=self.stream)
        self.streams[request_id] = s
        return s

    @property
    def done(self) -> bool:
        return all(s.done for s in self.streams.values())

    async def next(self) -> tuple[RequestStream, Event]:
        """The next event of any stream (call only while not done)."""
        ev = await self.queue.get()
        s = self.streams[ev.request_id]
        s.track(ev)
        return s, ev

    def next_nowait(self) -> tuple[RequestStream, Event]:
        """The next event if one is queued (asyncio.QueueEmpty otherwise)."""
        ev = self.queue.get_nowait()
        s = self.streams[ev.request_id]
        s.track(ev)
        return s, ev

    def abort_unfinished(self) -> None:
        for rid, s in self.streams.items():
            if not s.done:
                self.batcher.abort(rid)
