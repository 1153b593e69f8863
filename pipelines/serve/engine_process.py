"""The decode engine in a child process of its own, so that a Serve replica uses two cores, not one.

    proc = EngineProcess.start(checkpoint, dtype="float32", max_batch_size=16, threads=1)
    proc.add_request("req-1", prompt_ids, SamplingParams(...), deltas=False)   # buffered
    proc.flush()                                   # one message to the child with everything buffered
    for msg in proc.receive(): ...                 # ("step", outputs, steps, step_s) | ("add_error", ...) | ...
    proc.close()

Why: a replica is one Python process. With the engine on its event loop, HTTP parsing, JSON,
tokenisation, Serve's request handling and the decode steps all take turns on one core (Python's
GIL; a second thread made it worse, see pipelines.serve.batching), and on a 2-core machine the
replica capped out at ~1 core: at 16 clients the tiny model spent ~10.1 ms of replica CPU per
request of which ~8.7 ms were the engine's. Here the child only decodes, on its own core, while the
replica's event loop answers HTTP on another; vLLM's V1 engine core process splits the same way.
Measured (bench/serve.py, tiny model, 2 cores; BENCHMARKS.md "Serving"): 16 streaming clients +15%
tokens/s, 4 clients +9%, 16 non-streaming clients on par, ~0.5 ms more 1-client latency and ~1 ms
more CPU per request (pickling across the socket pair).

Protocol: a socket pair carrying pickled messages (multiprocessing.connection framing). Parent ->
child: lists of ("add", request_id, prompt_ids, params, deltas) and ("abort", request_id), applied
in order before the child's next step; ("close",). Child -> parent: ("ready", info) once, then
("step", outputs, steps, step_s): the StepOutputs of one or more steps, (sequences, requests) per
step and their seconds (sent as soon as a step has outputs, else at least every SEND_EVERY_S, so
counters stay fresh; a non-streaming request has outputs only when it finishes), ("add_error", request_id,
exception) for a request the engine refused, ("step_error", exception, request_ids) when a step
raised (those requests are dropped; the engine keeps serving). The child exits when the parent's
end closes (EOF), so a killed replica leaves no orphan decoding on.

The child is started with `python -m pipelines.serve.engine_process FD SPEC_JSON` (not
multiprocessing's spawn, which would re-import the Ray worker's __main__); it gets the parent's
sys.path through PYTHONPATH, so a Ray runtime_env working_dir works the same.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

SEND_EVERY_S = 0.05  # longest the child keeps step counters to itself when no step had outputs


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


class EngineProcess:
    """Parent side: the child process and the connection to it (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen, conn: Connection, info: dict[str, Any]):
        self.proc = proc
        self.conn = conn
        self.info = info  # what the child loaded: kernel, checkpoint_id, block_size, vocab_size, pid
        self.kernel = info.get("kernel")
        self.pid = proc.pid
        self._out: list[tuple] = []

    @classmethod
    def start(cls, checkpoint: str, *, dtype: str = "float32", max_batch_size: int = 16, threads: int = 1,
              kernel: str = "auto", timeout_s: float = 300.0, device: str = "cpu") -> EngineProcess:
        """Start the child, wait until its engine is built (checkpoint verified and loaded) and return.
        A checkpoint the child cannot load raises RuntimeError with the child's error."""
        spec = {"checkpoint": str(checkpoint), "dtype": dtype, "max_batch_size": int(max_batch_size),
                "threads": int(threads), "kernel": kernel, "device": device}
        mine, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env["OMP_NUM_THREADS"] = str(threads)
        try:
            proc = subprocess.Popen([sys.executable, "-m", "pipelines.serve.engine_process",
                                     str(theirs.fileno()), json.dumps(spec)],
                                    pass_fds=(theirs.fileno(),), env=env, cwd=os.getcwd())
        finally:
            theirs.close()
        conn = Connection(mine.detach())
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                    msg = conn.recv()  # EOFError: the child died before saying anything
                    if msg[0] == "ready":
                        return cls(proc, conn, msg[1])
                    raise RuntimeError(f"the engine process could not start: {msg[1]}")
                if proc.poll() is not None:
                    raise RuntimeError(f"the engine process exited with code {proc.returncode} while starting "
                                       f"(its error is in this replica's log)")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the engine process did not load {checkpoint} within {timeout_s:.0f} s")
        except EOFError:
            proc.wait(timeout=10)
            raise RuntimeError(f"the engine process exited with code {proc.returncode} while starting "
                               f"(its error is in this replica's log)") from None
        except BaseException:
            conn.close()
            proc.kill()
            proc.wait()
            raise

    # ---- engine-like calls (buffered; flush() sends them) -----------------------------------------

    def add_request(self, request_id: str, prompt: Any, params: Any, *, deltas: bool = True) -> None:
        self._out.append(("add", request_id, list(prompt), params, deltas))

    def abort(self, request_id: str) -> bool:
        self._out.append(("abort", request_id))
        return True

    def flush(self) -> None:
        """Send what add_request/abort buffered, as one message (OSError/BrokenPipe: the child is gone)."""
        if self._out:
            out, self._out = self._out, []
            self.conn.send(out)

    def fileno(self) -> int:
        return self.conn.fileno()

    def receive(self) -> list[tuple]:
        """Every message the child has sent so far (EOFError once it is gone)."""
        msgs = []
        while self.conn.poll():
            msgs.append(self.conn.recv())
        return msgs

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, timeout_s: float = 5.0) -> None:
        try:
            self.conn.send([("close",)])
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()


# ---- child side -------------------------------------------------------------------------------------

def serve_engine(conn: Connection, engine: Any) -> None:
    """Apply the parent's messages and step the engine until the parent closes (or goes away)."""
    steps: list[tuple[int, int]] = []
    step_s = 0.0
    outs: list = []
    last_send = time.perf_counter()
    while True:
        busy = engine.has_unfinished()
        try:
            batches = [conn.recv()] if not busy else []  # idle: sleep until the parent has work
            while conn.poll():
                batches.append(conn.recv())
        except (EOFError, OSError):
            return  # the parent is gone
        for batch in batches:
            for msg in batch:
                if msg[0] == "add":
                    _, rid, prompt, params, deltas = msg
                    try:
                        engine.add_request(rid, prompt, params, deltas=deltas)
                    except Exception as e:  # a prompt or parameters the engine refuses: that request only
                        conn.send(("add_error", rid, _picklable(e)))
                elif msg[0] == "abort":
                    engine.abort(msg[1])
                elif msg[0] == "close":
                    return
        if not engine.has_unfinished():
            continue
        t0 = time.perf_counter()
        try:
            step_outs = engine.step()
        except Exception as e:  # an engine bug: drop the requests it held, keep serving new ones
            traceback.print_exc()
            rids = list(engine.request_ids())
            for rid in rids:
                try:
                    engine.abort(rid)
                except Exception:
                    pass
            conn.send(("step_error", _picklable(e), rids))
            continue
        now = time.perf_counter()
        step_s += now - t0
        steps.append((engine.last_step_rows, engine.last_step_requests))
        outs.extend(step_outs)
        if outs or now - last_send >= SEND_EVERY_S or not engine.has_unfinished():
            conn.send(("step", outs, steps, step_s))
            outs, steps, step_s, last_send = [], [], 0.0, now


def main(argv: list[str] | None = None) -> int:
    import signal

    # Ctrl-C reaches the whole process group; the replica decides when this child ends (EOF or "close")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    argv = sys.argv[1:] if argv is None else argv
    conn = Connection(int(argv[0]))
    spec = json.loads(argv[1])
    try:
        import torch

        from gptcore.checkpoint import load_checkpoint
        from gptcore.engine import Engine

        torch.set_num_threads(spec["threads"])
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
        device = spec.get("device", "cpu")
        ck = load_checkpoint(spec["checkpoint"], device=device, dtype=dtype)
        engine = Engine(ck.model.eval(), ck.tokenizer, device=device, dtype=dtype,
                        max_batch_size=spec["max_batch_size"], kernel=spec["kernel"])
    except Exception as e:
        traceback.print_exc()
        conn.send(("init_error", f"{type(e).__name__}: {e}"))
        return 1
    conn.send(("ready", {"kernel": engine.kernel, "checkpoint_id": ck.id, "block_size": ck.config.block_size,
                         "vocab_size": ck.config.vocab_size, "pid": os.getpid()}))
    try:
        with torch.inference_mode():
            serve_engine(conn, engine)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent went away while we were sending: nothing left to serve
    return 0


if __name__ == "__main__":
    sys.exit(main())
