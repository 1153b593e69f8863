"""Helpers of the Serve tests (deploy/undeploy an app, count replicas, bounded waits, HTTP load)."""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(name: str, args: dict, port: int) -> str:
    """Deploy pipelines.serve.app under /<name>; returns its base URL (http://127.0.0.1:PORT/<name>)."""
    from ray import serve

    from pipelines.serve.app import build_app

    prefix = f"/{name}"
    serve.run(build_app({"app_name": name, "route_prefix": prefix, **args}), name=name, route_prefix=prefix)
    return f"http://127.0.0.1:{port}{prefix}"


def deploy_many(apps: dict[str, dict], port: int) -> dict[str, str]:
    """Deploy several apps at once (their replicas start in parallel); returns name -> base URL."""
    from ray import serve

    from pipelines.serve.app import build_app

    serve.run_many([serve.RunTarget(target=build_app({"app_name": n, "route_prefix": f"/{n}", **a}), name=n,
                              route_prefix=f"/{n}") for n, a in apps.items()])
    return {n: f"http://127.0.0.1:{port}/{n}" for n in apps}


def undeploy(name: str) -> None:
    from ray import serve

    serve.delete(name)


def running_replicas(app: str) -> int:
    from ray import serve
    from ray.serve.schema import ReplicaState

    st = serve.status().applications.get(app)
    if st is None:
        return 0
    dep = next(iter(st.deployments.values()))
    return dep.replica_states.get(ReplicaState.RUNNING, 0)


def wait_until(pred, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class LoadGenerator:
    """Bounded HTTP load on 127.0.0.1: `workers` threads POST until stop() or `max_requests` in all.

    Records (monotonic time, status code, Retry-After header) per response; a connection error
    records status 0. A worker pauses 0.25 s after a 429/503, as a client honouring Retry-After would."""

    def __init__(self, url: str, body: dict, workers: int, max_requests: int = 2000, headers: dict | None = None,
                 timeout: float = 30.0):
        import threading

        self.url, self.body, self.headers, self.timeout = url, body, headers or {}, timeout
        self.max_requests = max_requests
        self.results: list[tuple[float, int, str | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]

    def _work(self) -> None:
        import httpx

        with httpx.Client(timeout=self.timeout) as c:
            while not self._stop.is_set():
                with self._lock:
                    if len(self.results) >= self.max_requests:
                        return
                try:
                    r = c.post(self.url, json=self.body, headers=self.headers)
                    item = (time.monotonic(), r.status_code, r.headers.get("retry-after"))
                except Exception:
                    item = (time.monotonic(), 0, None)
                with self._lock:
                    self.results.append(item)
                if item[1] in (429, 503):
                    time.sleep(0.25)  # a polite client backs off (bounded stand-in for Retry-After)

    def start(self) -> LoadGenerator:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def codes(self) -> dict[int, int]:
        from collections import Counter

        with self._lock:
            return dict(Counter(code for _, code, _ in self.results))
