"""Shared test fixtures: one local Ray instance per test session, the shared data folder, tiny models.

Ray: `ray_session` starts ONE local Ray (address="local", never an outside cluster) the first time a
test asks for it, and stops it at the end of the session. Logical CPUs are oversubscribed (8 on a
2-core machine) so that Train workers, Data operators and Serve replicas used by different tests
never wait on each other for a CPU *slot*; real parallelism is still the 2 cores.
"""

from __future__ import annotations

import os
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


def pytest_sessionfinish(session, exitstatus):
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
