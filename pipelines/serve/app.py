"""The OpenAI-compatible Ray Serve application: FastAPI ingress + continuous-batching engine per replica.

    serve run pipelines.serve.app:build_app checkpoint=runs/x/ckpt autoscaling.max_replicas=2
    serve run cluster/serve/raygpt.yaml            # or: serve deploy cluster/serve/raygpt.yaml
    raygpt serve --checkpoint runs/x/ckpt          # pipelines/serve/cli.py (starts Ray + Serve)

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id},
GET /health (liveness, always open), GET /ready (engine loop alive, open), GET /stats (batching
counters, pid; behind the API key like /v1). `stream: true` answers server-sent events in OpenAI's
chunk format ending with `data: [DONE]`. Every response carries usage token counts (streams: on the
final chunk, or on an extra empty-choices chunk with stream_options.include_usage, as OpenAI does).
Non-streaming answers carry a W3C `Server-Timing` header (`queue`, `engine`, `app`, in ms): where a
request's latency went on the server, next to what the client measured.

One deployment, one replica = one engine + one batcher (pipelines.serve.batching): requests join the
running batch between decode steps. The engine runs in a child process of the replica
(pipelines.serve.engine_process; ServeConfig.engine_process, default on), so decoding has a core of
its own while the replica's event loop answers HTTP; engine_process=false keeps it on that loop. Serve gives autoscaling (on ongoing
requests), max_ongoing_requests per replica and max_queued_requests (beyond it: 503 or 429 with
Retry-After; with ServeConfig.ingress "haproxy" HAProxy forwards HTTP straight to the replicas and
each replica enforces it, with "proxy" Serve's proxy does, per deployment). This module enforces the
rest: API keys (sha256 digests, constant-time compare; keys never logged or echoed), body size
(413), request schema (422) and values (400), unknown model (404), context window and limits (400),
request timeout (408). Client input never reaches a 500: body bytes are decoded and parsed here,
not by FastAPI.

Does not: start Ray/Serve, tokenize in batches across requests, or serve more than one model.
"""

# no `from __future__ import annotations`: FastAPI must see real annotation objects (Request)
# on the methods Serve wraps into class-based routes
import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.config import ConfigError, apply_overrides, from_dict, read_yaml, to_dict
from pipelines.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    error_body,
    parse_request,
)
from pipelines.serve.config import AuthSettings, ServeConfig, deployment_options

logger = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "OpenAIServer"

app = FastAPI(title="raygpt OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)


# ---- errors: every error leaves as OpenAI-format JSON ---------------------------------------------

@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    loc = ".".join(str(x) for x in errs[0]["loc"]) if errs else None
    msg = errs[0]["msg"] if errs else "invalid request"
    return JSONResponse(error_body(f"invalid request: {loc}: {msg}", param=loc, code="invalid_type"), status_code=422)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        msg = f"unknown route {request.method} {request.url.path}; see /v1/completions, /v1/chat/completions, /v1/models"
    elif exc.status_code == 405:
        msg = f"method {request.method} is not allowed on {request.url.path}"
    else:
        msg = str(exc.detail)
    code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(error_body(msg, type="invalid_request_error", code=code), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # a bug of ours, never client input: log the traceback (no headers, no body), answer a generic 500
    logger.exception("raygpt: internal error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("internal server error", type="server_error"), status_code=500)


# ---- API keys -----------------------------------------------------------------------------------

def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def load_api_keys(auth: AuthSettings) -> list[bytes]:
    """sha256 digests of the configured API keys (file lines and/or a comma-separated env var)."""
    keys: list[str] = []
    if auth.api_keys_file:
        p = Path(auth.api_keys_file)
        if not p.is_file():
            raise ConfigError(f"auth.api_keys_file {str(p)!r} does not exist; create it with one key per line "
                              "or unset auth.api_keys_file")
        for line in p.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    if auth.api_keys_env:
        keys.extend(k.strip() for k in os.environ.get(auth.api_keys_env, "").split(",") if k.strip())
    if auth.require_keys and not keys:
        raise ConfigError(f"auth.require_keys is true but no API key was found (auth.api_keys_file="
                          f"{auth.api_keys_file!r}, environment variable {auth.api_keys_env!r})")
    return [_digest(k) for k in dict.fromkeys(keys)]


def key_matches(token: str, digests: list[bytes]) -> bool:
    """Constant-time check of a presented key against every configured digest (no early exit)."""
    d = _digest(token)
    ok = False
    for ref in digests:
        ok |= hmac.compare_digest(d, ref)
    return ok


# ---- per-request helpers (defined before the deployment class: Serve pickles the class at decoration
# time, so names it uses must already exist) ---------------------------------------------------------

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
    __slots__ = ("text", "token_ids", "logprobs", "finish_reason")

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
    def of(cls, ev: Any) -> "_Choice":
        c = cls()
        c.add(ev)
        return c


def _haproxy_enabled() -> bool:
    """Whether this Serve instance fronts replicas with HAProxy (read by Serve from its environment)."""
    from pipelines import _ray_compat

    return _ray_compat.serve_haproxy_enabled()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


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


# ---- the deployment -------------------------------------------------------------------------------

@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(app)
class OpenAIServer:
    def __init__(self, config: dict[str, Any]):
        import torch

        from pipelines.serve.batching import ContinuousBatcher, ProcessBatcher
        from pipelines.serve.metrics import ServeMetrics

        self.cfg: ServeConfig = from_dict(ServeConfig, config)
        self._key_digests = load_api_keys(self.cfg.auth)  # before the engine: a bad key file fails fast
        b = self.cfg.batching
        self.metrics = ServeMetrics()
        batching = dict(max_batch_size=b.max_batch_size, continuous=b.continuous,
                        batch_wait_timeout_s=b.batch_wait_timeout_s, on_step=self.metrics.step)
        if self.cfg.engine_process:
            from gptcore.checkpoint import read_tokenizer
            from pipelines.serve.engine_process import EngineProcess

            torch.set_num_threads(1)  # this process only tokenises; the child decodes
            self.engine = EngineProcess.start(self.cfg.checkpoint, dtype=self.cfg.dtype,
                                              max_batch_size=b.max_batch_size, threads=self.cfg.threads)
            # the child verified the checkpoint's checksums before answering
            self.tokenizer = read_tokenizer(self.cfg.checkpoint)
            self.block_size = self.engine.info["block_size"]
            self.vocab_size = self.engine.info["vocab_size"]
            self.checkpoint_id = self.engine.info["checkpoint_id"]
            self.batcher = ProcessBatcher(self.engine, **batching)
        else:
            from gptcore.checkpoint import load_checkpoint
            from gptcore.engine import Engine

            torch.set_num_threads(self.cfg.threads)
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.cfg.dtype]
            ckpt = load_checkpoint(self.cfg.checkpoint, device="cpu", dtype=dtype)
            self.engine = Engine(ckpt.model.eval(), ckpt.tokenizer, device="cpu", dtype=dtype,
                                 max_batch_size=b.max_batch_size)
            self.tokenizer = ckpt.tokenizer
            self.block_size = ckpt.config.block_size
            self.vocab_size = ckpt.config.vocab_size
            self.checkpoint_id = ckpt.id
            self.batcher = ContinuousBatcher(self.engine, **batching)
        self.model_name = self.cfg.served_model_name
        self.created = int(time.time())
        lim = self.cfg.limits
        self.max_prompt_tokens = min(lim.max_prompt_tokens or self.block_size - 1, self.block_size - 1)
        logger.info("raygpt: serving %s (checkpoint id %s, block_size %d) with %d API key(s), batching=%s, "
                    "engine %s", self.model_name, self.checkpoint_id[:12], self.block_size, len(self._key_digests),
                    "continuous" if b.continuous else "static",
                    f"in process {self.engine.pid}" if self.cfg.engine_process else "on the event loop")
        if _haproxy_enabled() != (self.cfg.ingress == "haproxy"):
            # process-wide: set where Serve starts (raygpt serve, or controller_options.runtime_env in a
            # Serve config file, or the environment of `ray start`), not by this app
            logger.warning("raygpt: ingress=%r but this Serve instance runs %s; set RAY_SERVE_ENABLE_HA_PROXY="
                           "%s where Serve starts (see ServeConfig.ingress)", self.cfg.ingress,
                           "HAProxy" if _haproxy_enabled() else "the Python proxy",
                           "1" if self.cfg.ingress == "haproxy" else "0")

    def check_health(self) -> None:
        """Serve's replica health check: a dead decode loop makes Serve replace the replica."""
        if not self.batcher.alive:
            raise RuntimeError("the raygpt decode loop is not running")

    def __del__(self) -> None:
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.close()
        close = getattr(getattr(self, "engine", None), "close", None)
        if close is not None:  # the engine process (the in-process Engine has nothing to close)
            close()

    # ---- open routes ----------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        if self.batcher.alive:
            return JSONResponse({"status": "ready", "model": self.model_name})
        return JSONResponse(error_body("engine not running", type="service_unavailable_error"), status_code=503)

    # ---- authenticated routes ---------------------------------------------------------------------

    @app.get("/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        ctx = serve.get_replica_context()
        return {"pid": os.getpid(), "replica": getattr(ctx, "replica_tag", None) or str(getattr(ctx, "replica_id", "")),
                "engine_pid": getattr(self.engine, "pid", os.getpid()),
                "queued": self.batcher.queued, "running": self.batcher.running, "kernel": self.engine.kernel,
                "torch_threads": _torch_threads(), **self.batcher.stats.as_dict()}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return ModelList(data=[self._card()]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        self._check_model(model_id)
        return self._card().model_dump()

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, "/v1/chat/completions", chat=True)

    # ---- request handling -------------------------------------------------------------------------

    def _card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created)

    def _authorize(self, request: Request) -> None:
        if not self._key_digests:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not key_matches(token, self._key_digests):
            # never echo the presented key, not even masked
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r} "
                                f"(see GET /v1/models)", param="model", code="model_not_found")

    async def _read_json(self, request: Request) -> Any:
        limit = self.cfg.limits.max_body_bytes
        too_large = ApiError(413, f"request body is larger than the server limit of {limit} bytes "
                                  "(limits.max_body_bytes)", code="request_too_large")
        cl = request.headers.get("content-length")
        if cl is not None:
            try:
                if int(cl) > limit:
                    raise too_large
            except ValueError:
                raise ApiError(400, "invalid Content-Length header", code="invalid_request") from None
        body = bytearray()
        async for chunk in request.stream():
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

    async def _handle(self, request: Request, route: str, chat: bool):
        t0 = time.perf_counter()
        status = 500  # until proven otherwise (an unexpected exception goes to _internal_error)
        streaming = False
        try:
            self._authorize(request)
            data = await self._read_json(request)
            req = parse_request(ChatCompletionRequest if chat else CompletionRequest, data)
            self._check_model(req.model)
            job = self._prepare(req, chat)
            if req.stream:
                streaming = True  # the stream records its own metrics when it ends
                return StreamingResponse(self._sse(job, t0, route), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            body = await self._run(job)
            status = 200
            return JSONResponse(body, headers={"Server-Timing": self._server_timing(job, t0)})
        except ApiError as e:
            status = e.status
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except asyncio.CancelledError:
            status = 499  # client went away; _run aborted its engine requests
            raise
        finally:
            if not streaming:
                self.metrics.request(route, status, time.perf_counter() - t0)

    # ---- turning a request into engine work ---------------------------------------------------------

    def _prepare(self, req: Any, chat: bool) -> "_Job":
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
                repetition_penalty=float(req.repetition_penalty), no_repeat_ngram_size=req.no_repeat_ngram_size,
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
        for i, p in enumerate(items):
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

    def _submit(self, job: "_Job"):
        from pipelines.serve.batching import RequestGroup

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

    async def _batches(self, job: "_Job", group, interval: float = 0.0) -> AsyncIterator[list[tuple[int, int, Any]]]:
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
    def _server_timing(job: "_Job", t0: float) -> str:
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

    def _record(self, job: "_Job", group) -> None:
        completion = sum(s.tokens for s in group.streams.values())
        self.metrics.tokens(job.prompt_tokens, completion)
        for s in group.streams.values():
            if s.ttft_s is not None:
                self.metrics.first_token(s.ttft_s)
            if s.tpot_s is not None:
                self.metrics.per_token(s.tpot_s)

    async def _run(self, job: "_Job") -> dict[str, Any]:
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

    def _completion_logprobs(self, ch: "_Choice", offset0: int) -> dict[str, Any]:
        tokens = [self._token_str(t) for t in ch.token_ids]
        offsets, off = [], offset0
        for s in tokens:
            offsets.append(off)
            off += len(s)
        lps = ch.logprobs if len(ch.logprobs) == len(tokens) else [None] * len(tokens)
        return {"tokens": tokens, "token_logprobs": lps,
                "top_logprobs": [{t: lp} if lp is not None else None for t, lp in zip(tokens, lps)],
                "text_offset": offsets}

    def _chat_logprobs(self, ch: "_Choice") -> dict[str, Any]:
        lps = ch.logprobs if len(ch.logprobs) == len(ch.token_ids) else [0.0] * len(ch.token_ids)
        return {"content": [{"token": self._token_str(t), "logprob": lp,
                             "bytes": list(self.tokenizer.token_bytes(t)), "top_logprobs": []}
                            for t, lp in zip(ch.token_ids, lps)]}

    async def _sse(self, job: "_Job", t0: float, route: str) -> AsyncIterator[str]:
        status = 200
        group = None
        n = job.params.n
        base = {"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
                "created": job.created, "model": self.model_name}
        include_usage = bool(job.req.stream_options and job.req.stream_options.include_usage)
        open_choices = len(job.prompts) * n
        started = [[False] * n for _ in job.prompts]
        sent = [[0] * n for _ in job.prompts]  # characters streamed per choice (logprobs text_offset)
        completion_tokens = 0
        try:
            group = self._submit(job)
            if job.chat:
                for p in range(len(job.prompts)):
                    for c in range(n):
                        yield _sse_data({**base, "choices": [{"index": p * n + c, "delta": {"role": "assistant",
                                         "content": ""}, "logprobs": None, "finish_reason": None}]})
            async for batch in self._batches(job, group, self.cfg.stream_interval_s):
                # one write per batch; a choice's tokens within it merge into one chunk
                chunks: list[dict[str, Any]] = []
                pending: dict[int, dict[str, Any]] = {}  # choice index -> its open token chunk
                for p, c, ev in batch:
                    idx = p * n + c
                    if ev.kind == "token":
                        completion_tokens += len(ev.token_ids)
                        text = ev.text
                        if job.chat and not started[p][c]:
                            text = text.lstrip()  # the template ends with "Assistant:"; drop the space
                            if not text and not job.logprobs:
                                continue
                        prefix = job.prompts[p][0] if (not job.chat and job.req.echo and not started[p][c]) else ""
                        started[p][c] = started[p][c] or bool(text) or not job.chat
                        acc = pending.get(idx)
                        if acc is None:
                            acc = pending[idx] = {"text": prefix, "choice": _Choice(),
                                                  "offset": sent[p][c] + len(prefix)}
                            chunks.append({"idx": idx, "acc": acc})
                        acc["text"] += text
                        sent[p][c] += len(prefix) + len(text)
                        acc["choice"].add(ev)
                    elif ev.kind == "finish":
                        pending.pop(idx, None)
                        open_choices -= 1
                        prefix = job.prompts[p][0] if (not job.chat and job.req.echo and not started[p][c]) else ""
                        chunks.append({"idx": idx, "finish": _finish(ev.finish_reason), "prefix_text": prefix,
                                       "last": open_choices == 0})
                out = []
                for ch in chunks:
                    idx = ch["idx"]
                    if "acc" in ch:
                        acc = ch["acc"]
                        if job.chat:
                            lp = self._chat_logprobs(acc["choice"]) if job.logprobs else None
                            choice = {"index": idx, "delta": {"content": acc["text"]}, "logprobs": lp,
                                      "finish_reason": None}
                        else:
                            lp = self._completion_logprobs(acc["choice"], acc["offset"]) if job.logprobs else None
                            choice = {"index": idx, "text": acc["text"], "logprobs": lp, "finish_reason": None}
                        out.append(_sse_data({**base, "choices": [choice]}))
                    else:
                        if job.chat:
                            choice = {"index": idx, "delta": {}, "logprobs": None, "finish_reason": ch["finish"]}
                        else:
                            choice = {"index": idx, "text": ch["prefix_text"], "logprobs": None,
                                      "finish_reason": ch["finish"]}
                        chunk = {**base, "choices": [choice]}
                        if ch["last"] and not include_usage:
                            chunk["usage"] = job.usage(completion_tokens)  # usage in every response
                        out.append(_sse_data(chunk))
                if out:
                    yield "".join(out)
            if include_usage:
                yield _sse_data({**base, "choices": [], "usage": job.usage(completion_tokens)})
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


# ---- application builder ----------------------------------------------------------------------------

def config_from_args(args: dict[str, Any] | None) -> ServeConfig:
    """`serve run ... key=value` / YAML `args:` -> ServeConfig.

    `config` names a YAML file of ServeConfig fields; other keys override it. String values (what
    `serve run` passes) are parsed like CLI overrides (`autoscaling.max_replicas=2`); nested mappings
    (a YAML `args:` block) are merged."""
    from pipelines.serve.config import serve_config_fields

    args = dict(args or {})
    path = args.pop("config", None)
    data: dict[str, Any] = serve_config_fields(read_yaml(path)) if path else {}
    overrides = []
    for k, v in args.items():
        if isinstance(v, str):
            overrides.append(f"{k}={v}")
        elif isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    data = apply_overrides(data, overrides)
    try:
        return from_dict(ServeConfig, data)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_app(args: dict[str, Any] | None = None):
    """Serve application builder (import path `pipelines.serve.app:build_app`)."""
    cfg = config_from_args(args)
    return OpenAIServer.options(**deployment_options(cfg)).bind(to_dict(cfg))
