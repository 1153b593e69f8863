"""pipelines/_ray_compat.py against the pinned Ray: fails the day a private name it wraps moves.

Also: no other module of ours names a private Ray module (ray._private, ray.*._internal, ray.serve._private).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines import _ray_compat as rc

REPO = Path(__file__).resolve().parents[1]
PRIVATE = re.compile(r"\bray(\.[a-z_]+)*\.(_private|_internal)\b")


def test_pinned_ray_is_the_one_compat_was_written_against():
    import ray

    assert ray.__version__ == rc.RAY_VERSION_WRITTEN_AGAINST, (
        f"Ray {ray.__version__} is installed; pipelines/_ray_compat.py was written against "
        f"{rc.RAY_VERSION_WRITTEN_AGAINST}: check each function there, then update the constant")


def test_offline_accessors():
    assert rc.train_v2_enabled() is True
    name = rc.train_snapshot_filename()
    assert isinstance(name, str) and name.endswith(".json")
    assert isinstance(rc.serve_haproxy_enabled(), bool)
    assert hasattr(rc.global_state(), "actors")
    assert rc.train_report_logger_name().endswith("context.py")
    assert rc.token_auth_logger_name().endswith("authentication_token_setup")


def test_live_accessors(ray_session):
    url = rc.dashboard_url()
    assert url and url.startswith("http://127.0.0.1:"), url  # the dashboard runs, on loopback only
    assert Path(rc.session_dir()).is_dir()
    assert rc.metrics_export_port() > 0


@pytest.mark.parametrize("top", ["pipelines", "gptcore", "jobs", "bench", "tests"])
def test_no_private_ray_names_elsewhere(top):
    offenders = []
    for path in sorted((REPO / top).rglob("*.py")):
        if path.name in ("_ray_compat.py", "test_ray_compat.py"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "private Ray names outside pipelines/_ray_compat.py:\n" + "\n".join(offenders)
