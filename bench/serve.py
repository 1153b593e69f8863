"""Serving benchmark: the Ray Serve OpenAI endpoint at 1, 4 and 16 concurrent clients vs the offline engine.

    .venv/bin/python bench/serve.py [--checkpoint CKPT | --preset tiny [--model n_layer=6 ...]] [--requests 64] \
        [--new-tokens 64] [--rounds 3] [--pairs 20] [--threads 1] [--stream-interval 0] [--markdown] \
        [--ingress haproxy|proxy] [--serve-env KEY=VALUE ...] [--target front|replica] [--app KEY=VALUE ...]

Builds (or loads) a checkpoint, then per round, interleaved so machine noise hits all alike:
  offline  engine.generate on 16 prompts at once (tokens/s at batch 16) and on 1 prompt (latency of a
           direct engine call), in this process, on --threads torch threads;
  serve    one replica (same threads, continuous batching, max batch 16) on 127.0.0.1, behind what
           ServeConfig.ingress picks (default: HAProxy forwarding to the replica's own HTTP server;
           --ingress proxy: Serve's Python proxy actor), Serve started the way `raygpt serve` does;
           for 1, 4, 16 concurrent clients a fixed number of requests (64 new tokens each,
           ignore_eos so every request is exactly that long), once non-streaming (aggregate tokens/s,
           p50/p99 latency) and once with stream=true (time to first token, streaming tokens/s).
Goal figures come from back-to-back pairs, so that the noise of a shared machine hits both sides
alike: offline batch-16 run then a 16-client serve run (ratio of tokens/s, median over pairs), and a
direct engine call then one HTTP request with the same prompt (difference, median over pairs).
The difference compares engine speed in two processes (~2-3% noise: ~10 ms on a 375 ms request), so
goal 2 is also reported per request: HTTP latency minus the engine time the replica itself reports
in the response's Server-Timing header, once through httpx (what earlier sessions reported) and once through
RawHTTP, a one-socket keep-alive client that adds ~0.1 ms of its own (httpx adds ~1-2 ms of client CPU on
2 slow cores), with the handler's own share (Server-Timing app - engine).
The HTTP clients run in this process, on the same cores as Serve: they take a share of the CPU, so
the load generator is aiohttp (~0.4-0.7 ms of CPU per request, httpx ~1.6) and each client's
keep-alive connection is opened before a run's clock starts.
--app KEY=VALUE overrides ServeConfig fields of the benchmarked app (e.g. engine_process=false).
--serve-env sets more Ray Serve environment knobs (e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1) on top of
ray_serve_env(ingress), for this process before Ray starts and for the Serve controller (which
hands them to the proxies, HAProxy and replicas); --target replica sends the requests straight to
the replica's own HTTP port (needs direct ingress: --ingress haproxy or
RAY_SERVE_ENABLE_DIRECT_INGRESS=1) instead of the port given to serve.start.
CPU per request: CPU seconds of this process (the HTTP client) and of every process it started
(Ray, Serve, HAProxy) during the 16-client runs of the throughput pairs, divided by their requests;
unlike wall-clock figures it hardly moves with the load of a shared machine.
Does not: assert on timings, use the network beyond 127.0.0.1, or leave Ray running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import print_conditions, record  # noqa: E402 - bench/ is not a package

SHARED = Path(os.environ.get("RAYGPT_SHARED_DATA", REPO.parent / "shared" / "data"))
FALLBACK_TEXT = ("To be, or not to be, that is the question: whether tis nobler in the mind to suffer the slings "
                 "and arrows of outrageous fortune, or to take arms against a sea of troubles. ") * 50


def corpus() -> str:
    p = SHARED / "tinyshakespeare" / "input.txt"
    return p.read_text(encoding="utf-8") if p.is_file() else FALLBACK_TEXT


def build_checkpoint(preset_name: str, out: Path, overrides: dict | None = None) -> Path:
    import torch

    from gptcore.checkpoint import save_checkpoint
    from gptcore.config import preset
    from gptcore.model import GPT
    from gptcore.tokenizer import train_bpe

    text = corpus()
    tok = train_bpe([text[i:i + 4000] for i in range(0, min(len(text), 400_000), 4000)], vocab_size=2048)
    torch.manual_seed(0)
    model = GPT(preset(preset_name, **{"vocab_size": tok.vocab_size, **(overrides or {})}))
    return Path(save_checkpoint(out / "ckpt", model, tok, {"step": 0, "note": "bench/serve.py random weights"}))


def prompts(n: int) -> list[str]:
    lines = [ln.strip() for ln in corpus().splitlines() if len(ln.strip()) > 20]
    return [lines[(i * 37) % len(lines)][:60] for i in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


# ---- offline engine ----------------------------------------------------------------------------

def offline16(engine, ps: list[str], new_tokens: int) -> float:
    """Tokens/s of one engine.generate over 16 prompts."""
    from gptcore.sampling import SamplingParams

    sp = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = engine.generate(ps[:16], sp)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)


def direct_call(engine, prompt: str, new_tokens: int) -> float:
    """Seconds of one direct engine call for one prompt."""
    from gptcore.sampling import SamplingParams

    t0 = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_new_tokens=new_tokens, temperature=1.0, ignore_eos=True))
    return time.perf_counter() - t0


# ---- HTTP clients ----------------------------------------------------------------------------------

async def _one(session, url: str, body: dict, stream: bool) -> tuple[float, float | None, int]:
    t0 = time.perf_counter()
    if not stream:
        async with session.post(url, json=body) as r:
            r.raise_for_status()
            return time.perf_counter() - t0, None, (await r.json())["usage"]["completion_tokens"]
    ttft, ntok = None, 0
    async with session.post(url, json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.content:  # one server-sent-event line at a time
            # cheap byte checks: the client shares the machine with the server, keep it lean
            if ttft is None and line.startswith(b"data: {") and b'"text":""' not in line:
                ttft = time.perf_counter() - t0
            if b'"usage"' in line:
                ntok = json.loads(line[6:])["usage"]["completion_tokens"]
    return time.perf_counter() - t0, ttft, ntok


async def load(url: str, ps: list[str], clients: int, requests: int, new_tokens: int, stream: bool,
               cpu: dict[str, float] | None = None) -> dict:
    """`clients` concurrent closed-loop clients send `requests` requests in all. Each client's keep-alive
    connection is opened (one 1-token request) before the clock starts, as a long-running client's
    would be: the figure is the server's throughput, not TCP set-up. `cpu`: add the CPU seconds per role
    of the timed part to it."""
    import aiohttp

    body = {"max_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True}
    results: list[tuple[float, float | None, int]] = []
    counter = iter(range(requests))
    # aiohttp, not httpx: ~0.7 ms of client CPU per request instead of ~1.6 (non-streaming) on the
    # cores the server uses too
    conn = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(_one(session, url, {**body, "prompt": ps[i % len(ps)], "max_tokens": 1}, False)
                               for i in range(clients)))

        async def worker():
            for i in counter:
                results.append(await _one(session, url, {**body, "prompt": ps[i % len(ps)]}, stream))

        snap = cpu_snapshot() if cpu is not None else None
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
        if snap is not None:
            for role, v in cpu_delta(snap, cpu_snapshot()).items():
                cpu[role] = cpu.get(role, 0.0) + v
    lat = [r[0] for r in results]
    ttft = [r[1] for r in results if r[1] is not None]
    assert sum(r[2] for r in results) == requests * new_tokens, "every request must produce new_tokens tokens"
    return {"tps": sum(r[2] for r in results) / wall, "p50": pct(lat, 50), "p99": pct(lat, 99),
            "ttft_p50": pct(ttft, 50) if ttft else float("nan")}


# ---- CPU accounting (load-independent: CPU seconds per request do not grow with the machine's load) ---------

def _role(p) -> str:
    cmd = p.cmdline()
    if "pipelines.serve.engine_process" in cmd:
        return "engine process"
    name = " ".join(cmd[:1]) or p.name()
    for key, role in (("ServeReplica", "replica"), ("ProxyActor", "proxy"), ("haproxy", "haproxy"),
                      ("HAProxy", "proxy"), ("ServeController", "controller")):
        if key in name or key in p.name():
            return role
    return "ray other"


def cpu_snapshot() -> dict[str, float]:
    """CPU seconds so far of this process ("client") and of every process it started (Ray, Serve, HAProxy)."""
    import psutil

    me = psutil.Process()
    out: dict[str, float] = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            role = "client" if p.pid == me.pid else _role(p)
        except psutil.Error:
            continue
        out[f"{role}:{p.pid}"] = t.user + t.system
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per role between two snapshots (processes present in `after`)."""
    out: dict[str, float] = {}
    for k, v in after.items():
        role = k.split(":")[0]
        out[role] = out.get(role, 0.0) + v - before.get(k, 0.0)
    return out


class RawHTTP:
    """The leanest keep-alive HTTP/1.1 client: one socket, a request written in one send, the response read
    by its Content-Length (Serve's non-streaming answers carry one). ~0.1 ms of client CPU per request
    where httpx spends ~1-2 ms on this kind of machine; the goal-2 figures are the server's overhead, so the
    client should add as little as it can. Not for streaming answers (chunked)."""

    def __init__(self, port: int, timeout_s: float = 120.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict[str, str], bytes]:
        data = json.dumps(body).encode() if body is not None else b""
        self.sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self._recv()
        head, _, rest = buf.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
        n = int(headers.get("content-length", "0"))
        while len(rest) < n:
            rest += self._recv()
        return int(status_line.split()[1]), headers, rest[:n]

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def server_timing(header: str) -> dict[str, float]:
    """`queue;dur=1.2, engine;dur=3.4` -> {"queue": 1.2, "engine": 3.4} (ms)."""
    return {k.strip(): float(v) for k, _, v in (p.partition(";dur=") for p in header.split(",") if ";dur=" in p)}


PAIR_REQUESTS = 64  # per 16-client serve run of a goal-1 pair: 4 per client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_port(app: str) -> int:
    """HTTP port of the app's (single) ingress replica in direct-ingress mode."""
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        groups = ray.get(controller.get_target_groups.remote(app, True))
        ports = [t.port for g in groups if g.protocol == "HTTP" and g.app_name == app for t in g.targets]
        if ports:
            return ports[0]
        time.sleep(0.5)
    raise RuntimeError("no direct-ingress HTTP port for the app: is RAY_SERVE_ENABLE_DIRECT_INGRESS=1 set?")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="checkpoint directory (default: a random-weight --preset model)")
    ap.add_argument("--preset", default="tiny", help="model preset when no --checkpoint (default tiny)")
    ap.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                    help="GPTConfig overrides of the preset, e.g. n_layer=6 block_size=256")
    ap.add_argument("--stream-interval", type=float, default=0.0,
                    help="the app's stream_interval_s (default 0: one chunk per decode step)")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level (default 64)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the engine, offline and in Serve (default 1: on a shared 2-core "
                         "machine two spinning OpenMP threads collapse under contention)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--pairs", type=int, default=20,
                    help="back-to-back pairs per round for the goal figures (latency pairs; /4 throughput pairs)")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    ap.add_argument("--ingress", choices=("haproxy", "proxy"), default=None,
                    help="ServeConfig.ingress (default: haproxy, as BENCHMARKS.md measured)")
    ap.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment variable for Ray/Serve (repeatable), e.g. "
                         "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=1")
    ap.add_argument("--app", nargs="*", default=[], metavar="KEY=VALUE",
                    help="ServeConfig overrides of the benchmarked app, e.g. engine_process=false access_log=false")
    ap.add_argument("--target", choices=("front", "replica"), default="front",
                    help="where requests go: the serve.start port (HAProxy or Serve's proxy) or the "
                         "replica's own direct-ingress HTTP port")
    args = ap.parse_args(argv)
    start = print_conditions("serve", {"engine (offline and replica)": args.threads})
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    serve_env = {}
    for kv in args.serve_env:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            ap.error(f"--serve-env wants KEY=VALUE, got {kv!r}")
        serve_env[k] = v
        os.environ[k] = v
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(args.threads)
    import ray
    from ray import serve

    from gptcore.checkpoint import load_checkpoint
    from gptcore.engine import Engine
    from pipelines.config import apply_overrides
    from pipelines.serve.app import build_app
    from pipelines.serve.config import ServeConfig, ServeTesting, ray_serve_env

    tmp = tempfile.TemporaryDirectory(prefix="raygpt-bench-serve-")
    overrides = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.model)}
    ckpt = Path(args.checkpoint) if args.checkpoint else build_checkpoint(args.preset, Path(tmp.name), overrides)
    ck = load_checkpoint(ckpt)
    engine = Engine(ck.model.eval(), ck.tokenizer, max_batch_size=16)
    ps = prompts(64)
    levels = [int(c) for c in args.clients.split(",")]
    mc = ck.config
    print(f"model {mc.name} {mc.n_layer}L/{mc.n_embd}d ({ck.model.num_params() / 1e6:.2f} M params, block "
          f"{mc.block_size}), stream_interval_s {args.stream_interval}, "
          f"{args.new_tokens} new tokens/request, {args.requests} requests/level, {args.threads} torch threads, "
          f"{os.cpu_count()} cores", flush=True)
    ingress = args.ingress or "haproxy"  # what BENCHMARKS.md measured (a local `raygpt serve` defaults to proxy)
    env = {**ray_serve_env(ingress), **serve_env}
    print(f"ingress {ingress}, Serve env {env}, requests to the {args.target}", flush=True)
    hap_dir = tempfile.TemporaryDirectory(prefix="rghap-", dir="/tmp")  # short: unix socket paths
    # own HAProxy files and side ports (ServeConfig.testing): another Serve may run on this machine
    testing = ServeTesting(haproxy_state_dir=hap_dir.name, haproxy_stats_port=free_port(),
                           haproxy_metrics_port=free_port(), fallback_proxy_port=free_port())
    env.update(testing.serve_env(ingress))

    ray.init(address="local", num_cpus=max(4, args.threads + 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options={"runtime_env": {"env_vars": env}})
    app_cfg = apply_overrides({"checkpoint": str(ckpt), "model_name": "bench", "num_cpus": args.threads,
                               "ingress": ingress, "torch_threads": args.threads, "max_ongoing_requests": 64,
                               "max_queued_requests": -1, "auth": {"api_keys_env": None},
                               "batching": {"max_batch_size": 16}, "limits": {"max_tokens": args.new_tokens},
                               "stream_interval_s": args.stream_interval}, args.app)
    print(f"app: engine_process {app_cfg.get('engine_process', ServeConfig.engine_process)}"
          + (f", overrides {args.app}" if args.app else ""), flush=True)
    serve.run(build_app(app_cfg), name="bench", route_prefix="/")
    if args.target == "replica":
        port = replica_port("bench")
    url = f"http://127.0.0.1:{port}/v1/completions"
    asyncio.run(load(url, ps, 4, 8, 8, True))  # warm-up: connections, replica code paths
    asyncio.run(load(url, ps, 4, 8, 8, False))

    rows: dict[str, list[dict]] = {**{f"c{c}": [] for c in levels}, **{f"s{c}": [] for c in levels}}
    pairs_tps: list[tuple[float, float]] = []  # (offline@16, serve@16) measured back to back
    pairs_lat: list[tuple[float, float]] = []  # (direct call, serve@1 request) back to back
    health: list[float] = []
    outside: list[float] = []  # serve@1 request latency minus its Server-Timing engine time (same request)
    outside_raw: list[float] = []  # the same through RawHTTP (the leanest client)
    app_minus_engine: list[float] = []  # the replica's handler time outside the engine (Server-Timing app - engine)
    health_raw: list[float] = []
    cpu: dict[str, float] = {}  # CPU seconds per role over the 16-client runs of the throughput pairs
    cpu_requests = 0
    offline_cpu: list[float] = []  # CPU seconds per request of the offline batch-16 runs
    import httpx

    http = httpx.Client(timeout=120)
    raw = RawHTTP(port)
    try:
        for rnd in range(args.rounds):
            for c in levels:
                rows[f"c{c}"].append(asyncio.run(load(url, ps, c, args.requests, args.new_tokens, stream=False)))
                rows[f"s{c}"].append(asyncio.run(load(url, ps, c, args.requests, args.new_tokens, stream=True)))
            # goal 1: alternate offline batch-16 runs and 16-client serve runs (PAIR_REQUESTS requests)
            for _ in range(args.pairs // 4):
                c0 = time.process_time()
                off = offline16(engine, ps, args.new_tokens)
                offline_cpu.append((time.process_time() - c0) / 16)
                srv = asyncio.run(load(url, ps, 16, PAIR_REQUESTS, args.new_tokens, stream=False, cpu=cpu))["tps"]
                cpu_requests += PAIR_REQUESTS
                pairs_tps.append((off, srv))
            # goal 2: alternate a direct engine call and one HTTP request (keep-alive client) with the same prompt
            for i in range(args.pairs):
                p = ps[i % len(ps)]
                d = direct_call(engine, p, args.new_tokens)
                t0 = time.perf_counter()
                r = http.post(url, json={"prompt": p, "max_tokens": args.new_tokens, "temperature": 1.0,
                                         "ignore_eos": True})
                pairs_lat.append((d, time.perf_counter() - t0))
                timing = server_timing(r.headers.get("server-timing", ""))
                if "engine" in timing:
                    outside.append(pairs_lat[-1][1] - timing["engine"] / 1e3)
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == args.new_tokens
                t0 = time.perf_counter()
                http.get(url.replace("/v1/completions", "/health"))  # Serve's bare round trip, for reference
                health.append(time.perf_counter() - t0)
                # the same request through the leanest client: what the server (not httpx) adds
                t0 = time.perf_counter()
                status, headers, _ = raw.request("POST", "/v1/completions", {
                    "prompt": p, "max_tokens": args.new_tokens, "temperature": 1.0, "ignore_eos": True})
                dt = time.perf_counter() - t0
                timing = server_timing(headers.get("server-timing", ""))
                assert status == 200 and "engine" in timing
                outside_raw.append(dt - timing["engine"] / 1e3)
                app_minus_engine.append((timing["app"] - timing["engine"]) / 1e3)
                t0 = time.perf_counter()
                raw.request("GET", "/health")
                health_raw.append(time.perf_counter() - t0)
            print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(
                f"serve@{c} {rows[f'c{c}'][-1]['tps']:.0f} tok/s" for c in levels), flush=True)
    finally:
        http.close()
        raw.close()
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
        hap_dir.cleanup()

    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in rows[key])

    print(f"\nmedians over {args.rounds} rounds (tokens/s and latency: non-streaming requests; TTFT and "
          f"stream tok/s: the same load with stream=true)")
    print(f"{'clients':>8} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'stream tok/s':>13} {'TTFT p50 ms':>12}")
    table = []
    for c in levels:
        row = (c, med(f"c{c}", "tps"), med(f"c{c}", "p50") * 1e3, med(f"c{c}", "p99") * 1e3,
               med(f"s{c}", "tps"), med(f"s{c}", "ttft_p50") * 1e3)
        table.append(row)
        print(f"{row[0]:>8} {row[1]:>8.0f} {row[2]:>8.1f} {row[3]:>8.1f} {row[4]:>13.0f} {row[5]:>12.1f}")
    off16 = statistics.median(a for a, _ in pairs_tps)
    srv16 = statistics.median(b for _, b in pairs_tps)
    ratio = statistics.median(b / a for a, b in pairs_tps)
    d50 = statistics.median(a for a, _ in pairs_lat)
    h50 = statistics.median(b for _, b in pairs_lat)
    over = statistics.median((b - a) for a, b in pairs_lat)
    print(f"goal 1: offline engine {off16:.0f} tok/s at batch 16, serve@16 {srv16:.0f} tok/s; median of "
          f"{len(pairs_tps)} back-to-back ratios serve/offline = {ratio:.2f} (goal >= 0.8; issue 17: >= 0.95)")
    print(f"goal 2: direct engine call p50 {d50 * 1e3:.1f} ms, serve@1 request p50 {h50 * 1e3:.1f} ms; median of "
          f"{len(pairs_lat)} back-to-back differences = {over * 1e3:.1f} ms (goal < 10 ms); for reference "
          f"GET /health p50 {statistics.median(health) * 1e3:.1f} ms (the ingress round trip alone)")
    if outside:
        print(f"goal 2, same request: serve@1 latency minus the replica's own engine time (Server-Timing), p50 over "
              f"{len(outside)} requests = {statistics.median(outside) * 1e3:.1f} ms (no cross-process noise; httpx client)")
    if outside_raw:
        print(f"goal 2, same request, lean client (one keep-alive socket): latency minus engine time p50 "
              f"{statistics.median(outside_raw) * 1e3:.2f} ms over {len(outside_raw)} requests; of it in the replica's "
              f"handler outside the engine (Server-Timing app - engine) p50 {statistics.median(app_minus_engine) * 1e3:.2f} ms; "
              f"GET /health p50 {statistics.median(health_raw) * 1e3:.2f} ms")
    if cpu_requests:
        per = {r: v / cpu_requests * 1e3 for r, v in sorted(cpu.items(), key=lambda kv: -kv[1])}
        print(f"CPU ms per request at 16 clients ({cpu_requests} requests): " +
              ", ".join(f"{r} {v:.1f}" for r, v in per.items()) + f"; total {sum(per.values()):.1f} "
              f"(offline engine: {statistics.median(offline_cpu) * 1e3:.1f} ms per request at batch 16)")
    record("serve", {"serve16_over_offline16": ratio, "serve1_minus_direct_ms": over * 1e3,
                     "latency_minus_engine_ms_httpx": statistics.median(outside) * 1e3 if outside else None,
                     "latency_minus_engine_ms_one_socket": (statistics.median(outside_raw) * 1e3
                                                            if outside_raw else None)}, start)
    if args.markdown:
        print("\n| clients | tokens/s | p50 latency ms | p99 latency ms | streaming tokens/s | TTFT p50 ms |\n"
              "|---:|---:|---:|---:|---:|---:|")
        for row in table:
            print(f"| {row[0]} | {row[1]:.0f} | {row[2]:.1f} | {row[3]:.1f} | {row[4]:.0f} | {row[5]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
