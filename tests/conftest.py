"""Shared test fixtures: one local Ray instance per test session, the shared data folder, tiny models.

Ray: `ray_session` starts ONE local Ray (address="local", never an outside cluster) the first time a
test asks for it, and stops it at the end of the session. Logical CPUs are oversubscribed (8 on a
2-core machine) so that Train workers, Data operators and Serve replicas used by different tests
never wait on each other for a CPU *slot*; real parallelism is still the 2 cores.

CPUAdam: DeepSpeed JIT-builds its CPUAdam op the first time a run offloads the optimizer (~70 CPU-seconds,
cached in ~/.cache/torch_extensions). When the session collected a `cpu_adam` test, a niced subprocess
builds it at the start, in the CPU time that Ray start-ups and waits leave idle, so the test finds it
cached (torch's build lock makes a test that gets there first wait for the build, never build twice).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RAYGPT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (the project's real test corpora); tests skip clearly without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (set RAYGPT_SHARED_DATA to run this test)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole test session."""
    import ray

    from pipelines.runtime import ensure_ray

    # the same start-up as every raygpt command (dashboard on loopback), never an outside cluster
    ensure_ray("local", num_cpus=8, object_store_memory=1024 * 1024 * 1024, env_vars={"OMP_NUM_THREADS": "1"})
    yield ray
    # shut down in pytest_sessionfinish instead so module-level users (Serve) can clean up first


_PREBUILD: list[subprocess.Popen] = []
_BUILD_CPU_ADAM = ("from deepspeed.ops.op_builder import CPUAdamBuilder\n"
                   "CPUAdamBuilder().load(verbose=False)\n")


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: `make test-fast` builds nothing
def pytest_collection_modifyitems(session, config, items):
    if config.option.collectonly or _PREBUILD:
        return
    if any(item.get_closest_marker("cpu_adam") for item in items):
        env = {**os.environ, "MAX_JOBS": "1"}  # one compiler at a time: the tests keep the other core
        _PREBUILD.append(subprocess.Popen(
            ["nice", "-n", "19", sys.executable, "-c", _BUILD_CPU_ADAM], env=env, cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))


def _stop_prebuild() -> None:
    """Let a build that is still running finish (killing it mid-build would leave torch's lock file, and
    the next build would wait on it forever); past 5 minutes, stop it and remove the lock."""
    for proc in _PREBUILD:
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            from torch.utils.cpp_extension import _get_build_directory

            lock = Path(_get_build_directory("cpu_adam", verbose=False)) / "lock"
            lock.unlink(missing_ok=True)


def pytest_sessionfinish(session, exitstatus):
    _stop_prebuild()
    try:
        import ray

        if ray.is_initialized():
            try:
                from ray import serve

                serve.shutdown()
            except Exception:
                pass
            ray.shutdown()
    except ImportError:
        pass
