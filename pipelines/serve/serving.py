"""Serving logic of the OpenAI-compatible API, without Ray or an HTTP framework: request -> engine -> response.

    serving = Serving.load(cfg)                       # engine (own process or in-process) + batcher + tokenizer
    req = parse_request(CompletionRequest, await serving.read_json(chunks, content_length))
    job = serving.prepare(req, chat=False)            # limits, context window, SamplingParams (ApiError 4xx)
    body = await serving.run(job)                     # an OpenAI response dict; or `async for s in serving.sse(...)`

One Serving = one engine + one batcher (pipelines.serve.batching): requests join the running batch
between decode steps. It enforces body size (413), values (400), unknown model (404), context window
and limits (400) and the request timeout (408); client input never reaches a 500. Every error is an
ApiError (pipelines.serve.protocol) carrying OpenAI's error JSON. Runs on an asyncio loop: a Serve
replica's (pipelines/serve/app.py), or a test's. Does not: import Ray, speak HTTP, check API keys
(pipelines/serve/auth.py), or tokenize in batches across requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pipelines.serve.batching import ContinuousBatcher, ProcessBatcher, RequestGroup
from pipelines.serve.config import ServeConfig
from pipelines.serve.engine_process import EngineProcess
from pipelines.serve.protocol import ApiError, ModelCard

logger = logging.getLogger("ray.serve")


class NullMetrics:
    """The metrics interface of pipelines.serve.metrics.ServeMetrics, recording nothing (no Ray needed)."""

    def request(self, route: str, status: int, latency_s: float | None = None) -> None: ...
    def tokens(self, prompt: int, generated: int) -> None: ...
    def first_token(self, ttft_s: float) -> None: ...
    def per_token(self, tpot_s: float) -> None: ...
    def step(self, batch_size: int, queued: int, running: int) -> None: ...


class _Job:
    def __init__(self, req: Any, chat: bool, prompts: list[tuple[str, list[int]]], params: Any, logprobs: bool,
                 id: str, created: int):
        self.req, self.chat, self.prompts, self.params, self.logprobs = req, chat, prompts, params, logprobs
        self.id, self.created = id, created
        self.prompt_tokens = sum(len(ids) for _, ids in prompts)
        self.group: Any = None  # the RequestGroup once submitted (its streams carry the timings)

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}


class _Choice:
    __slots__ = ("finish_reason", "logprobs", "text", "token_ids")

    def __init__(self) -> None:
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None

    def add(self, ev: Any) -> None:
        self.text += ev.text
        self.token_ids.extend(ev.token_ids)
        if ev.logprobs:
            self.logprobs.extend(ev.logprobs)

    @classmethod
    def of(cls, ev: Any) -> _Choice:
        c = cls()
        c.add(ev)
        return c


def _rows(n: int, num_beams: int) -> int:
    """Decode rows (batch slots) a request occupies: its beams with beam search, else its n samples."""
    return num_beams if num_beams > 1 else n


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _sse_data(obj: Any) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n\n"


def _check_strings(obj: Any) -> None:
    """Refuse strings that are not valid Unicode text (lone surrogates from JSON \\ud800 escapes).
    Iterative, so a deeply nested body cannot exhaust the stack."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            try:
                o.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "the request holds a string that is not valid Unicode (a lone surrogate "
                                    "escape such as \\ud800)", code="invalid_encoding") from None
        elif isinstance(o, list):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())


class _StreamState:
    """Per-choice progress of one streamed response (what has been sent, what is still open)."""

    def __init__(self, job: _Job, model_name: str) -> None:
        n = job.params.n
        self.base = {"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
                     "created": job.created, "model": model_name}
        self.include_usage = bool(job.req.stream_options and job.req.stream_options.include_usage)
        self.open_choices = len(job.prompts) * n
        self.started = [[False] * n for _ in job.prompts]
        self.sent = [[0] * n for _ in job.prompts]  # characters streamed per choice (logprobs text_offset)
        self.completion_tokens = 0


class Serving:
    """The model behind the API: tokenizer, engine and batcher of one replica, and the request logic."""

    def __init__(self, cfg: ServeConfig, engine: Any, tokenizer: Any, batcher: Any, *, block_size: int,
                 vocab_size: int, checkpoint_id: str, metrics: Any = None):
        self.cfg, self.engine, self.tokenizer, self.batcher = cfg, engine, tokenizer, batcher
        self.block_size, self.vocab_size, self.checkpoint_id = block_size, vocab_size, checkpoint_id
        self.metrics = metrics if metrics is not None else NullMetrics()
        self.model_name = cfg.served_model_name
        self.created = int(time.time())
        lim = cfg.limits
        self.max_prompt_tokens = min(lim.max_prompt_tokens or block_size - 1, block_size - 1)

    @classmethod
    def load(cls, cfg: ServeConfig, metrics: Any = None) -> Serving:
        """Load cfg.checkpoint into an engine (in a child process with cfg.engine_process) and start its batcher."""
        import torch


        metrics = metrics if metrics is not None else NullMetrics()
        b = cfg.batching
        batching = dict(max_batch_size=b.max_batch_size, continuous=b.continuous,
                        batch_wait_timeout_s=b.batch_wait_timeout_s, on_step=metrics.step)
        if cfg.engine_process:
            from gptcore.checkpoint import read_tokenizer

            torch.set_num_threads(1)  # this process only tokenises; the child decodes
            engine = EngineProcess.start(cfg.checkpoint, dtype=cfg.dtype, max_batch_size=b.max_batch_size,
                                         threads=cfg.threads, device=cfg.device)
            # the child verified the checkpoint's checksums before answering
            return cls(cfg, engine, read_tokenizer(cfg.checkpoint), ProcessBatcher(engine, **batching),
                       block_size=engine.info["block_size"], vocab_size=engine.info["vocab_size"],
                       checkpoint_id=engine.info["checkpoint_id"], metrics=metrics)
        from gptcore.checkpoint import load_checkpoint
        from gptcore.engine import Engine

        torch.set_num_threads(cfg.threads)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
        ckpt = load_checkpoint(cfg.checkpoint, device=cfg.device, dtype=dtype)
        engine = Engine(ckpt.model.eval(), ckpt.tokenizer, device=cfg.device, dtype=dtype,
                        max_batch_size=b.max_batch_size)
        return cls(cfg, engine, ckpt.tokenizer, ContinuousBatcher(engine, **batching), block_size=ckpt.config.block_size,
                   vocab_size=ckpt.config.vocab_size, checkpoint_id=ckpt.id, metrics=metrics)

    @property
    def alive(self) -> bool:
        """Whether the decode loop runs (Serve's health check and /ready ask this)."""
        return self.batcher.alive

    def close(self) -> None:
        """Stop the batcher and the engine process (the in-process Engine has nothing to close)."""
        self.batcher.close()
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r} "
                                f"(see GET /v1/models)", param="model", code="model_not_found")

    async def read_json(self, chunks: AsyncIterator[bytes], content_length: str | None) -> Any:
        """The request body (its chunks and Content-Length header) as JSON: 413 above limits.max_body_bytes,
        400 for empty, non-UTF-8 or invalid JSON and for strings that are not valid Unicode."""
        limit = self.cfg.limits.max_body_bytes
        too_large = ApiError(413, f"request body is larger than the server limit of {limit} bytes "
                                  "(limits.max_body_bytes)", code="request_too_large")
        cl = content_length
        if cl is not None:
            try:
                if int(cl) > limit:
                    raise too_large
            except ValueError:
                raise ApiError(400, "invalid Content-Length header", code="invalid_request") from None
        body = bytearray()
        async for chunk in chunks:
            body += chunk
            if len(body) > limit:
                raise too_large
        if not body:
            raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"the request body is not valid UTF-8 (invalid byte at offset {e.start})",
                           code="invalid_encoding") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e.msg} (line {e.lineno} column {e.colno})",
                           code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
        _check_strings(data)
        return data

    # ---- turning a request into engine work ---------------------------------------------------------

    def prepare(self, req: Any, chat: bool) -> _Job:
        from gptcore.sampling import SamplingParams

        lim = self.cfg.limits
        if req.n > lim.max_n:
            raise ApiError(400, f"n must be <= {lim.max_n} (limits.max_n), got {req.n}", param="n", code="invalid_value")
        if req.num_beams > lim.max_num_beams:
            raise ApiError(400, f"num_beams must be <= {lim.max_num_beams} (limits.max_num_beams), got {req.num_beams}",
                           param="num_beams", code="invalid_value")
        if req.num_beams > 1 and req.n > req.num_beams:
            raise ApiError(400, f"n ({req.n}) must be <= num_beams ({req.num_beams}): beam search returns the n best "
                                "beams", param="n", code="invalid_value")
        seqs = _rows(req.n, req.num_beams)
        if seqs > self.cfg.batching.max_batch_size:
            raise ApiError(400, f"this request needs {seqs} decode rows (n={req.n}, num_beams={req.num_beams}) but "
                                f"the batch holds {self.cfg.batching.max_batch_size} (batching.max_batch_size)",
                           param="num_beams" if req.num_beams > 1 else "n", code="invalid_value")
        stop = list(req.stop)
        if len(stop) > lim.max_stop:
            raise ApiError(400, f"at most {lim.max_stop} stop sequences are allowed, got {len(stop)}", param="stop",
                           code="invalid_value")
        if any(s == "" for s in stop):
            raise ApiError(400, "stop sequences must not be empty strings", param="stop", code="invalid_value")

        if chat:
            from gptcore.chat import ChatTemplateError, render, stop_strings

            try:
                text = render(req.messages, self.cfg.chat_template)
            except ChatTemplateError as e:
                raise ApiError(400, str(e), param="messages", code="invalid_value") from None
            prompts = [(text, self.tokenizer.encode(text))]
            stop += [s for s in stop_strings(self.cfg.chat_template) if s not in stop]
            requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            default = lim.max_tokens
            want_logprobs = bool(req.logprobs)
            param = "messages"
        else:
            prompts = self._completion_prompts(req.prompt)
            requested = req.max_tokens
            default = lim.default_max_tokens
            want_logprobs = req.logprobs is not None
            param = "prompt"
        longest = max(len(ids) for _, ids in prompts)
        if longest > self.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {longest} tokens, more than the limit of {self.max_prompt_tokens} "
                                f"(model context {self.block_size} tokens); shorten the prompt", param=param,
                           code="context_length_exceeded")
        room = self.block_size - longest
        mt_param = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
        if requested is None:
            max_tokens = min(default, room)
        else:
            if requested < 1:
                raise ApiError(400, f"{mt_param} must be at least 1, got {requested}", param=mt_param,
                               code="invalid_value")
            if requested > lim.max_tokens:
                raise ApiError(400, f"{mt_param} must be <= {lim.max_tokens} (limits.max_tokens), got {requested}",
                               param=mt_param, code="invalid_value")
            if requested > room:
                raise ApiError(400, f"this model's maximum context length is {self.block_size} tokens; the prompt has "
                                    f"{longest} tokens and {mt_param} is {requested}; lower {mt_param} to at most "
                                    f"{room} or shorten the prompt", param=mt_param, code="context_length_exceeded")
            max_tokens = requested
        try:
            params = SamplingParams(
                max_new_tokens=max_tokens, temperature=float(req.temperature), top_k=req.top_k, top_p=float(req.top_p),
                repetition_penalty=float(req.repetition_penalty), copy_bias=float(req.copy_bias),
                no_repeat_ngram_size=req.no_repeat_ngram_size,
                num_beams=req.num_beams, length_penalty=float(req.length_penalty), early_stopping=req.early_stopping,
                stop=tuple(stop), n=req.n, seed=req.seed, logprobs=want_logprobs, ignore_eos=req.ignore_eos)
        except ValueError as e:  # SamplingParamsError names the field
            raise ApiError(400, str(e), code="invalid_value") from None
        return _Job(req=req, chat=chat, prompts=prompts, params=params, logprobs=want_logprobs,
                    id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, created=int(time.time()))

    def _completion_prompts(self, prompt: Any) -> list[tuple[str, list[int]]]:
        lim = self.cfg.limits
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [list(prompt)]
        else:
            items = list(prompt)
        if len(items) > lim.max_prompts:
            raise ApiError(400, f"at most {lim.max_prompts} prompts per request (limits.max_prompts), got {len(items)}",
                           param="prompt", code="invalid_value")
        out = []
        eos = self.tokenizer.eos_id
        for p in items:
            if isinstance(p, str):
                ids = self.tokenizer.encode(p)
                text = p
            else:
                bad = [t for t in p if not 0 <= t < self.vocab_size]
                if bad:
                    raise ApiError(400, f"prompt token ids must lie in [0, {self.vocab_size}), got {bad[0]}",
                                   param="prompt", code="invalid_value")
                ids = list(p)
                text = self.tokenizer.decode(ids)
            if not ids:
                # an empty prompt is conditioned on <|endoftext|>, as GPT-2 samples unconditionally
                if eos is None:
                    raise ApiError(400, "prompt must not be empty (this tokenizer has no <|endoftext|>)",
                                   param="prompt", code="invalid_value")
                ids = [eos]
            out.append((text, ids))
        return out

    def _submit(self, job: _Job):
        group = RequestGroup(self.batcher, stream=bool(job.req.stream))
        for i, (_, ids) in enumerate(job.prompts):
            group.submit(f"{job.id}-{i}", ids, job.params, num_choices=job.params.n,
                         num_seqs=_rows(job.params.n, job.params.num_beams))
        return group

    def _deadline(self) -> float:
        return time.perf_counter() + self.cfg.request_timeout_s

    def _timeout_error(self) -> ApiError:
        return ApiError(408, f"the request did not finish within {self.cfg.request_timeout_s} s "
                             "(request_timeout_s); lower max_tokens or retry later", type="timeout_error",
                        code="timeout")

    def _engine_error(self, err: BaseException) -> ApiError:
        if isinstance(err, ValueError):  # PromptTooLongError / SamplingParamsError: the request's fault
            return ApiError(400, str(err), code="invalid_value")
        logger.error("raygpt: engine failed a request: %s: %s", type(err).__name__, err)
        return ApiError(500, "the engine failed while generating; retry the request", type="server_error")

    async def _batches(self, job: _Job, group, interval: float = 0.0) -> AsyncIterator[list[tuple[int, int, Any]]]:
        """Lists of (prompt index, choice index, event) until every choice has finished: all events
        ready at a time (a stream that fell behind catches up in one go), or, with `interval` > 0,
        everything that arrived during `interval` seconds after the first event; 408 at the deadline."""
        deadline = self._deadline()
        index_of = {f"{job.id}-{i}": i for i in range(len(job.prompts))}

        async def take(until: float):
            remaining = until - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                return (await group.next())[1]

        first = True
        while not group.done:
            try:
                ev = await take(deadline)
            except TimeoutError:
                raise self._timeout_error() from None
            batch = []
            flush_at = time.perf_counter() + (0.0 if first else interval)  # the first token goes out at once
            first = False
            while True:
                if ev.kind == "error":
                    raise self._engine_error(ev.error)
                batch.append((index_of[ev.request_id], ev.index, ev))
                if group.done:
                    break
                if not group.queue.empty():
                    ev = group.next_nowait()[1]
                    continue
                if time.perf_counter() >= flush_at:
                    break
                try:
                    ev = await take(min(flush_at, deadline))
                except TimeoutError:
                    break
            yield batch

    @staticmethod
    def server_timing(job: _Job, t0: float) -> str:
        """W3C Server-Timing of a finished non-streaming request, in ms: `queue` (waiting for a batch slot),
        `engine` (prefill to last token, decode steps shared with other requests included) and `app` (this
        handler, from the parsed HTTP request to the response body). Browsers' dev tools show it; clients
        and benchmarks get the server-side split of a latency without clock sync (the longest prompt's
        values when a request has several)."""
        streams = list(job.group.streams.values()) if job.group is not None else []
        queue = max((s.queue_s for s in streams if s.queue_s is not None), default=0.0)
        engine = max((s.engine_s for s in streams if s.engine_s is not None), default=0.0)
        return (f"queue;dur={queue * 1e3:.2f}, engine;dur={engine * 1e3:.2f}, "
                f"app;dur={(time.perf_counter() - t0) * 1e3:.2f}")

    def _record(self, job: _Job, group) -> None:
        completion = sum(s.tokens for s in group.streams.values())
        self.metrics.tokens(job.prompt_tokens, completion)
        for s in group.streams.values():
            if s.ttft_s is not None:
                self.metrics.first_token(s.ttft_s)
            if s.tpot_s is not None:
                self.metrics.per_token(s.tpot_s)

    async def run(self, job: _Job) -> dict[str, Any]:
        group = job.group = self._submit(job)
        n = job.params.n
        acc = [[_Choice() for _ in range(n)] for _ in job.prompts]
        try:
            async for batch in self._batches(job, group):
                for p, c, ev in batch:
                    ch = acc[p][c]
                    if ev.kind == "token":
                        ch.add(ev)
                    elif ev.kind == "finish":
                        ch.finish_reason = _finish(ev.finish_reason)
        finally:
            group.abort_unfinished()
        self._record(job, group)
        completion_tokens = sum(len(ch.token_ids) for row in acc for ch in row)
        usage = job.usage(completion_tokens)
        choices = []
        for p, row in enumerate(acc):
            for c, ch in enumerate(row):
                idx = p * n + c
                if job.chat:
                    choices.append({"index": idx, "message": {"role": "assistant", "content": ch.text.lstrip()},
                                    "logprobs": self._chat_logprobs(ch) if job.logprobs else None,
                                    "finish_reason": ch.finish_reason})
                else:
                    prefix = job.prompts[p][0] if job.req.echo else ""
                    choices.append({"index": idx, "text": prefix + ch.text,
                                    "logprobs": self._completion_logprobs(ch, len(prefix)) if job.logprobs else None,
                                    "finish_reason": ch.finish_reason})
        return {"id": job.id, "object": "chat.completion" if job.chat else "text_completion",
                "created": job.created, "model": self.model_name, "choices": choices, "usage": usage}

    def _token_str(self, tid: int) -> str:
        return self.tokenizer.decode([tid])

    def _completion_logprobs(self, ch: _Choice, offset0: int) -> dict[str, Any]:
        tokens = [self._token_str(t) for t in ch.token_ids]
        offsets, off = [], offset0
        for s in tokens:
            offsets.append(off)
            off += len(s)
        lps = ch.logprobs if len(ch.logprobs) == len(tokens) else [None] * len(tokens)
        return {"tokens": tokens, "token_logprobs": lps,
                "top_logprobs": [{t: lp} if lp is not None else None for t, lp in zip(tokens, lps)],
                "text_offset": offsets}

    def _chat_logprobs(self, ch: _Choice) -> dict[str, Any]:
        lps = ch.logprobs if len(ch.logprobs) == len(ch.token_ids) else [0.0] * len(ch.token_ids)
        return {"content": [{"token": self._token_str(t), "logprob": lp,
                             "bytes": list(self.tokenizer.token_bytes(t)), "top_logprobs": []}
                            for t, lp in zip(ch.token_ids, lps)]}

    async def sse(self, job: _Job, t0: float, route: str) -> AsyncIterator[str]:
        """Server-sent events of a `stream: true` request in OpenAI's chunk format, ending with [DONE];
        an error after the headers went out is reported in-band, as OpenAI does."""
        status = 200
        group = None
        st = _StreamState(job, self.model_name)
        try:
            group = self._submit(job)
            if job.chat:
                for idx in range(len(job.prompts) * job.params.n):
                    yield _sse_data({**st.base, "choices": [{"index": idx, "delta": {"role": "assistant",
                                     "content": ""}, "logprobs": None, "finish_reason": None}]})
            async for batch in self._batches(job, group, self.cfg.stream_interval_s):
                # one write per batch; a choice's tokens within it merge into one chunk
                out = [self._sse_chunk(job, st, ch) for ch in self._stream_chunks(job, st, batch)]
                if out:
                    yield "".join(out)
            if st.include_usage:
                yield _sse_data({**st.base, "choices": [], "usage": job.usage(st.completion_tokens)})
            yield "data: [DONE]\n\n"
        except ApiError as e:
            # headers are gone already: report the error in-band, as OpenAI does
            status = e.status
            yield _sse_data(e.body())
            yield "data: [DONE]\n\n"
        finally:
            if group is not None:
                group.abort_unfinished()
                self._record(job, group)
            self.metrics.request(route, status, time.perf_counter() - t0)

    @staticmethod
    def _stream_chunks(job: _Job, st: _StreamState, batch: list[tuple[int, int, Any]]) -> list[dict[str, Any]]:
        """The chunks of one batch of events: a choice's tokens merge into one, finishes stay apart."""
        n = job.params.n
        chunks: list[dict[str, Any]] = []
        pending: dict[int, dict[str, Any]] = {}  # choice index -> its open token chunk
        for p, c, ev in batch:
            idx = p * n + c
            if ev.kind == "token":
                st.completion_tokens += len(ev.token_ids)
                text = ev.text
                if job.chat and not st.started[p][c]:
                    text = text.lstrip()  # the template ends with "Assistant:"; drop the space
                    if not text and not job.logprobs:
                        continue
                prefix = job.prompts[p][0] if (not job.chat and job.req.echo and not st.started[p][c]) else ""
                st.started[p][c] = st.started[p][c] or bool(text) or not job.chat
                acc = pending.get(idx)
                if acc is None:
                    acc = pending[idx] = {"text": prefix, "choice": _Choice(), "offset": st.sent[p][c] + len(prefix)}
                    chunks.append({"idx": idx, "acc": acc})
                acc["text"] += text
                st.sent[p][c] += len(prefix) + len(text)
                acc["choice"].add(ev)
            elif ev.kind == "finish":
                pending.pop(idx, None)
                st.open_choices -= 1
                prefix = job.prompts[p][0] if (not job.chat and job.req.echo and not st.started[p][c]) else ""
                chunks.append({"idx": idx, "finish": _finish(ev.finish_reason), "prefix_text": prefix,
                               "last": st.open_choices == 0})
        return chunks

    def _sse_chunk(self, job: _Job, st: _StreamState, ch: dict[str, Any]) -> str:
        """One chunk of _stream_chunks as an SSE `data:` line (the last finish carries usage)."""
        idx = ch["idx"]
        if "acc" in ch:
            acc = ch["acc"]
            if job.chat:
                lp = self._chat_logprobs(acc["choice"]) if job.logprobs else None
                choice = {"index": idx, "delta": {"content": acc["text"]}, "logprobs": lp, "finish_reason": None}
            else:
                lp = self._completion_logprobs(acc["choice"], acc["offset"]) if job.logprobs else None
                choice = {"index": idx, "text": acc["text"], "logprobs": lp, "finish_reason": None}
            return _sse_data({**st.base, "choices": [choice]})
        if job.chat:
            choice = {"index": idx, "delta": {}, "logprobs": None, "finish_reason": ch["finish"]}
        else:
            choice = {"index": idx, "text": ch["prefix_text"], "logprobs": None, "finish_reason": ch["finish"]}
        chunk = {**st.base, "choices": [choice]}
        if ch["last"] and not st.include_usage:
            chunk["usage"] = job.usage(st.completion_tokens)  # usage in every response
        return _sse_data(chunk)
