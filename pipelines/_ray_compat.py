"""The one module that touches Ray's private names; everything else calls these functions.

    from pipelines import _ray_compat as rc
    rc.dashboard_url()            # "http://127.0.0.1:8265" or None
    rc.train_v2_enabled()         # Ray Train V2 (the controller/checkpoint semantics raygpt relies on)

Why: private names move between Ray releases. Keeping them here means one file to fix on a Ray
upgrade, and `tests/test_ray_compat.py` fails on the pinned Ray the day a name disappears.
Written against ray==2.60.0. Does not: start Ray.
"""

from __future__ import annotations

import os
from typing import Any

RAY_VERSION_WRITTEN_AGAINST = "2.60.0"


def train_v2_enabled() -> bool:
    """Whether Ray Train V2 is on (raygpt train requires it)."""
    from ray.train.v2._internal.constants import is_v2_enabled

    return bool(is_v2_enabled())


def train_snapshot_filename() -> str:
    """Name of the file in which Ray Train V2 records a run's committed checkpoints."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    return str(CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)


def train_report_logger_name() -> str:
    """Name of the logger with which Ray Train V2 logs every `ray.train.report` call at INFO ("Reporting
    training result N: TrainingReport(...)"): its module's file path, outside the `ray.train` hierarchy."""
    from ray.train.v2._internal.execution import context

    return str(context.logger.name)


def token_auth_logger_name() -> str:
    """Name of the logger with which `ray.init` announces, at WARNING on every start of a new local Ray, that
    token auth is on by default (and warns when it is off)."""
    from ray._private.authentication import authentication_token_setup

    return str(authentication_token_setup.logger.name)


def _node() -> Any:
    from ray._private import worker

    return worker._global_node


def dashboard_url() -> str | None:
    """The dashboard's URL of the Ray this process is connected to, or None without one."""
    try:
        from ray._private import worker

        url = worker.global_worker.node.address_info.get("webui_url")
    except Exception:
        return None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def session_dir() -> str:
    """This Ray instance's session directory (logs, sockets)."""
    return str(_node().get_session_dir_path())


def metrics_export_port() -> int:
    """The port on which this node exports Prometheus metrics."""
    return int(_node().metrics_export_port)


def serve_haproxy_enabled() -> bool:
    """Whether Serve in this process fronts replicas with HAProxy (Serve reads it from its environment)."""
    try:
        from ray.serve._private import constants
    except ImportError:  # a Ray without the module
        return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
    return bool(getattr(constants, "RAY_SERVE_ENABLE_HA_PROXY", False))


def serve_haproxy_ports() -> dict[str, int]:
    """Serve's HAProxy side ports as this process's environment sets them (Ray's defaults otherwise):
    {"stats": 8404, "metrics": 9101, "fallback": 8500}. HAProxy binds stats and metrics on all interfaces."""
    from ray.serve._private import constants

    return {"stats": int(constants.RAY_SERVE_HAPROXY_STATS_PORT),
            "metrics": int(constants.RAY_SERVE_HAPROXY_METRICS_PORT),
            "fallback": int(constants.RAY_SERVE_FALLBACK_PROXY_HTTP_PORT)}


def global_state() -> Any:
    """Ray's GCS state accessor (node table etc.), for drills that inspect the cluster."""
    from ray._private import state

    return state
