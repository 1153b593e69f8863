"""How `raygpt serve` starts, runs and stops a server: a supervisor, and the Ray driver it watches.

    raygpt serve --checkpoint runs/x/ckpt        # pipelines/serve/cli.py -> supervise() or serve_until_stopped()
    python -m pipelines.serve.launch             # the driver child of supervise() (config JSON on stdin)

Local Ray (no --address): the command stays a small supervisor and starts the driver (Ray + Serve +
the app) as a child in a session of its own. A signal to the terminal's process group (Ctrl-C,
`docker stop`, systemd's SIGTERM) thus reaches the supervisor alone, not Ray's processes, which would
otherwise die at once and orphan HAProxy with its ports. The supervisor asks the driver to stop
(SIGINT): it deletes the app, lets in-flight requests finish for at most ServeConfig.drain_s, stops
Serve and Ray and exits; then, or at the latest STOP_DEADLINE_S after the signal, the supervisor
kills whatever is left of the driver's process group (Ray processes, HAProxy), so no process and no
port survive. A second Ctrl-C skips the drain. With --address the driver runs in this process and
deletes only its app on stop (the cluster keeps running). Does not: parse arguments (cli.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from pipelines.serve.config import ServeConfig

# from the stop signal to the supervisor's exit, whatever the driver does (under 30 s: what
# `docker stop` and most supervisors allow before they SIGKILL)
STOP_DEADLINE_S = 28.0


def say(msg: str) -> None:
    """One console line of `raygpt serve` (stdout, flushed: it may be a pipe to a log)."""
    print(f"raygpt serve: {msg}", flush=True)


# ---- supervisor (the `raygpt serve` process itself) ---------------------------------------------------

def supervise(data: dict[str, Any]) -> int:
    """Run the driver as a child in its own session and stop it cleanly on SIGTERM/SIGINT; its exit code."""
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.serve.launch"], stdin=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(data).encode())
    proc.stdin.close()
    stop_at: list[float] = []

    def on_signal(signum: int, frame: Any) -> None:
        if stop_at:  # a second Ctrl-C: no more waiting
            _kill_group(proc.pid, grace_s=0.0)
            return
        stop_at.append(time.monotonic())
        # SIGINT, not SIGTERM: Ray's native crash handler in the driver prints a stack for SIGTERM
        _signal(proc.pid, signal.SIGINT)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = _wait(proc, stop_at)
    finally:
        _kill_group(proc.pid, grace_s=2.0)  # stragglers: HAProxy or Ray processes that outlived the driver
        for s, h in old.items():
            signal.signal(s, h)
    if stop_at and rc in (0, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL):
        return 0
    if rc:
        say(f"the server exited with code {rc}")
    return rc


def _wait(proc: subprocess.Popen, stop_at: list[float]) -> int:
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if stop_at and time.monotonic() - stop_at[0] > STOP_DEADLINE_S - 3:
                say(f"the server did not stop within {STOP_DEADLINE_S - 3:.0f} s; killing it")
                _kill_group(proc.pid, grace_s=0.0)
                return proc.wait()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _kill_group(pgid: int, grace_s: float) -> None:
    """SIGTERM the process group `pgid`, then SIGKILL what is still there after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)


# ---- driver (Ray + Serve + the app) ----------------------------------------------------------------------

def serve_until_stopped(data: dict[str, Any], address: str | None, detach: bool = False) -> int:
    """Start or join Ray, start Serve, deploy the app, print its URL, then wait for SIGTERM/SIGINT and stop."""
    from pipelines.config import from_dict

    cfg = from_dict(ServeConfig, data)
    stopping = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            raise KeyboardInterrupt

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    try:
        _start(cfg, data, address)
        if detach:
            return 0
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if not detach:
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, signal.SIG_IGN)  # the stop below is not interrupted again
            _stop(cfg, local=not address)
    return 0


def _start(cfg: ServeConfig, data: dict[str, Any], address: str | None) -> None:
    from ray import serve

    from pipelines.runtime import ensure_ray
    from pipelines.serve.app import build_app
    from pipelines.serve.config import ray_serve_env

    t0 = time.monotonic()
    say(f"starting Ray and Serve for {cfg.checkpoint} ...")
    # Serve's driver-side INFO lines ("Started Serve", "Deleting app") repeat what our own lines say
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    ensure_ray(address or "local", param="--address")
    # cfg.ingress and the other process-wide Serve knobs: environment variables of the Serve
    # controller, which hands them on to the proxies/HAProxy and replicas it starts. Only applied
    # when this command starts Serve; a Serve already running on --address keeps its settings.
    serve.start(http_options={"host": cfg.host, "port": cfg.port},
                logging_config={"log_level": "WARNING"},  # Serve's own INFO lines are for its log files
                controller_options={"runtime_env": {"env_vars": ray_serve_env(cfg.ingress, cfg.testing)}})
    serve.run(build_app(data), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    base = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    say(f"model {cfg.served_model_name!r} ready at {base}/v1 in {time.monotonic() - t0:.0f} s "
        f"(ingress {cfg.ingress}; Ctrl-C or SIGTERM stops it)")


def _stop(cfg: ServeConfig, local: bool) -> None:
    """Delete the app (in-flight requests finish for at most cfg.drain_s), then stop Serve and Ray if local."""
    import ray
    from ray import serve

    t0 = time.monotonic()
    if not ray.is_initialized():  # stopped while Ray was starting, or Ray failed to start
        say("stopped")
        return
    say(f"stopping (draining requests for at most {cfg.drain_s:g} s)")
    drained = _bounded(lambda: _drain(cfg.app_name, cfg.drain_s), cfg.drain_s + 5.0) is True
    if local:
        if drained and cfg.ingress == "haproxy":  # let Serve stop HAProxy the normal way
            _bounded(serve.shutdown, 8.0)
        ray.shutdown()
    note = "" if drained else f"; requests still running after drain_s={cfg.drain_s:g} s were cut off"
    say(f"stopped in {time.monotonic() - t0:.1f} s{note}")


def _drain(app_name: str, drain_s: float) -> bool:
    """Delete `app_name` without blocking; True once it is gone (its replicas finished their requests)."""
    from ray import serve

    serve.delete(app_name, _blocking=False)
    deadline = time.monotonic() + drain_s
    while True:
        if app_name not in serve.status().applications:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def _bounded(fn: Callable[[], Any], timeout_s: float) -> Any:
    """fn() in a daemon thread; its result, or None when it raised or did not return within timeout_s
    (a stop must not hang on a controller that no longer answers)."""
    out: list[Any] = [None]

    def run() -> None:
        try:
            out[0] = fn()
        except Exception as e:
            say(f"while stopping: {type(e).__name__}: {e}")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    return out[0]


def _die_with_parent() -> None:
    """SIGINT (a clean stop) to this process when the supervisor dies, even by SIGKILL (Linux prctl
    PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def main() -> int:
    """The driver child of supervise(): ServeConfig fields as JSON on stdin, a local Ray."""
    _die_with_parent()
    parent = os.getppid()
    data = json.loads(sys.stdin.read())
    if os.getppid() != parent or parent == 1:  # the supervisor is gone already
        return 1
    from pipelines.errors import USER_ERRORS

    try:
        return serve_until_stopped(data, address=None)
    except USER_ERRORS as e:  # as pipelines.cli prints them: one line, exit code 2
        print(f"raygpt serve: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
