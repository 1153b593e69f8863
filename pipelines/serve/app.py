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

This module is the routes and the Serve deployment; the request logic lives in pipelines/serve/serving.py
(runs without Ray) and API keys in pipelines/serve/auth.py. One deployment, one replica = one engine +
one batcher (pipelines.serve.batching): requests join the running batch between decode steps. The engine runs in a child process of the replica
(pipelines.serve.engine_process; ServeConfig.engine_process, default on), so decoding has a core of
its own while the replica's event loop answers HTTP; engine_process=false keeps it on that loop. Serve gives autoscaling (on ongoing
requests), max_ongoing_requests per replica and max_queued_requests (beyond it: 503 or 429 with
Retry-After; with ServeConfig.ingress "haproxy" HAProxy forwards HTTP straight to the replicas and
each replica enforces it, with "proxy" Serve's proxy does, per deployment). The app enforces the
rest: API keys (sha256 digests, constant-time compare; keys never logged or echoed), body size
(413), request schema (422) and values (400), unknown model (404), context window and limits (400),
request timeout (408). Client input never reaches a 500: body bytes are decoded and parsed here,
not by FastAPI.

Does not: start Ray/Serve, tokenize in batches across requests, or serve more than one model.
"""

# no `from __future__ import annotations`: FastAPI must see real annotation objects (Request)
# on the methods Serve wraps into class-based routes
import asyncio
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines import _ray_compat
from pipelines.config import ConfigError, apply_overrides, from_dict, read_yaml, to_dict
from pipelines.serve.auth import authorize, key_matches, load_api_keys
from pipelines.serve.config import ServeConfig, deployment_options, serve_config_fields
from pipelines.serve.metrics import ServeMetrics
from pipelines.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelList,
    error_body,
    parse_request,
)
from pipelines.serve.serving import Serving

__all__ = ["DEPLOYMENT_NAME", "OpenAIServer", "app", "build_app", "config_from_args", "key_matches",
           "load_api_keys"]

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


# ---- the deployment -------------------------------------------------------------------------------

def _haproxy_enabled() -> bool:
    """Whether this Serve instance fronts replicas with HAProxy (read by Serve from its environment)."""

    return _ray_compat.serve_haproxy_enabled()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(app)
class OpenAIServer:
    def __init__(self, config: dict[str, Any]):
        self.cfg: ServeConfig = from_dict(ServeConfig, config)
        self._key_digests = load_api_keys(self.cfg.auth)  # before the engine: a bad key file fails fast
        self.serving = s = Serving.load(self.cfg, ServeMetrics())
        logger.info("raygpt: serving %s (checkpoint id %s, block_size %d) with %d API key(s), batching=%s, "
                    "engine %s", s.model_name, s.checkpoint_id[:12], s.block_size, len(self._key_digests),
                    "continuous" if self.cfg.batching.continuous else "static",
                    f"in process {s.engine.pid}" if self.cfg.engine_process else "on the event loop")
        if _haproxy_enabled() != (self.cfg.ingress == "haproxy"):
            # process-wide: set where Serve starts (raygpt serve, or controller_options.runtime_env in a
            # Serve config file, or the environment of `ray start`), not by this app
            logger.warning("raygpt: ingress=%r but this Serve instance runs %s; set RAY_SERVE_ENABLE_HA_PROXY="
                           "%s where Serve starts (see ServeConfig.ingress)", self.cfg.ingress,
                           "HAProxy" if _haproxy_enabled() else "the Python proxy",
                           "1" if self.cfg.ingress == "haproxy" else "0")

    def check_health(self) -> None:
        """Serve's replica health check: a dead decode loop makes Serve replace the replica."""
        if not self.serving.alive:
            raise RuntimeError("the raygpt decode loop is not running")

    def __del__(self) -> None:
        serving = getattr(self, "serving", None)
        if serving is not None:
            serving.close()

    # ---- open routes ----------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        if self.serving.alive:
            return JSONResponse({"status": "ready", "model": self.serving.model_name})
        return JSONResponse(error_body("engine not running", type="service_unavailable_error"), status_code=503)

    # ---- authenticated routes ---------------------------------------------------------------------

    @app.get("/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        authorize(request.headers.get("authorization"), self._key_digests)
        ctx = serve.get_replica_context()
        s = self.serving
        return {"pid": os.getpid(), "replica": getattr(ctx, "replica_tag", None) or str(getattr(ctx, "replica_id", "")),
                "engine_pid": getattr(s.engine, "pid", os.getpid()),
                "queued": s.batcher.queued, "running": s.batcher.running, "kernel": s.engine.kernel,
                "torch_threads": _torch_threads(), **s.batcher.stats.as_dict()}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        authorize(request.headers.get("authorization"), self._key_digests)
        return ModelList(data=[self.serving.card()]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        authorize(request.headers.get("authorization"), self._key_digests)
        self.serving.check_model(model_id)
        return self.serving.card().model_dump()

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, "/v1/chat/completions", chat=True)

    async def _handle(self, request: Request, route: str, chat: bool):
        s = self.serving
        t0 = time.perf_counter()
        status = 500  # until proven otherwise (an unexpected exception goes to _internal_error)
        streaming = False
        try:
            authorize(request.headers.get("authorization"), self._key_digests)
            data = await s.read_json(request.stream(), request.headers.get("content-length"))
            req = parse_request(ChatCompletionRequest if chat else CompletionRequest, data)
            s.check_model(req.model)
            job = s.prepare(req, chat)
            if req.stream:
                streaming = True  # the stream records its own metrics when it ends
                return StreamingResponse(s.sse(job, t0, route), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            body = await s.run(job)
            status = 200
            return JSONResponse(body, headers={"Server-Timing": s.server_timing(job, t0)})
        except ApiError as e:
            status = e.status
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except asyncio.CancelledError:
            status = 499  # client went away; _run aborted its engine requests
            raise
        finally:
            if not streaming:
                s.metrics.request(route, status, time.perf_counter() - t0)


# ---- application builder ----------------------------------------------------------------------------

def config_from_args(args: dict[str, Any] | None) -> ServeConfig:
    """`serve run ... key=value` / YAML `args:` -> ServeConfig.

    `config` names a YAML file of ServeConfig fields; other keys override it. String values (what
    `serve run` passes) are parsed like CLI overrides (`autoscaling.max_replicas=2`); nested mappings
    (a YAML `args:` block) are merged."""

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
