"""Plumbing every stage shares: starting or joining Ray, provenance, filesystem paths, atomic writes, hashes.

    from pipelines.runtime import ensure_ray, code_version, atomic_write_bytes, sha256_file
    started = ensure_ray(cfg.ray_address, num_cpus=cfg.num_cpus)   # True when this call started Ray
    atomic_write_json("s3://bucket/run/manifest.json", {...})       # readers see nothing or all of it

Ray: one way to start or join it, for every command. A local Ray runs with its dashboard on
127.0.0.1 (the State API lives there, and Ray Train's placement-group cleaner asks it whether a run
is alive; without one it may ask another Ray instance on the machine and tear down a healthy run), and
its URL is logged once. An empty address means: RAY_ADDRESS if set (Ray Jobs sets it for submitted
entrypoints), else a new local Ray; "auto" joins the `ray start` cluster on this machine. Nothing
listens on a non-loopback address unless the cluster was started that way. Does not: configure
logging (pipelines/console.py does) or know any stage.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import uuid
from typing import Any

import fsspec

from pipelines import _ray_compat
from pipelines.console import library_level_name
from pipelines.errors import UserError

log = logging.getLogger("raygpt")

# environment every worker of a local Ray gets (the tokenizers' own thread pool fights Ray's workers)
DEFAULT_WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}


class RayConnectError(UserError):
    """The Ray cluster named by the user cannot be reached."""


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, env_vars: dict[str, str] | None = None,
               object_store_memory: int | None = None, log_to_driver: bool = True,
               param: str = "ray_address") -> bool:
    """Start or join Ray unless this process is connected already; True when this call connected.

    address: "" / None -> $RAY_ADDRESS or a new local Ray; "local" -> a new local Ray; "auto" -> the
    cluster started by `ray start` here; "host:port" or "ray://..." -> that cluster. `param` names
    the config key in errors. num_cpus / object_store_memory / env_vars apply to a new local Ray only.
    """
    import ray

    if ray.is_initialized():
        return False
    address = (address or os.environ.get("RAY_ADDRESS") or "local").strip()

    # the workers' root logger (Ray Train and Data log INFO chatter through it) at the libraries' level;
    # our own "raygpt" logger keeps its level and handler (pipelines/console.py)
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": log_to_driver,
                              "logging_level": logging.WARNING,
                              "logging_config": ray.LoggingConfig(encoding="TEXT", log_level=library_level_name())}
    if address == "local":
        # workers' State API calls (Ray Train's placement-group cleaner) go to THIS dashboard, not to
        # whichever Ray instance on the machine auto-detection finds first
        port = _free_port()
        api = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
        kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                      runtime_env={"env_vars": {**DEFAULT_WORKER_ENV, **api, **(env_vars or {})}})
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
        if object_store_memory:
            kwargs["object_store_memory"] = object_store_memory
    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        raise RayConnectError(f"{param}={address!r}: cannot connect to a Ray cluster there ({e}); start it "
                              f"(`ray start --head`, or cluster/head-up.sh) or leave {param} empty for a "
                              f"local Ray") from None
    global _started_local
    _started_local = address == "local"
    url = dashboard_url()
    if url:
        log.info("Ray dashboard: %s", url)
    return True


_started_local = False  # the Ray this process is connected to is a local one that ensure_ray started


def local_ray_started_here() -> bool:
    """True when this process is connected to a local Ray it started itself (no cluster it joined)."""
    import ray

    return ray.is_initialized() and _started_local


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_url() -> str | None:
    """The dashboard URL of the Ray this process is connected to, or None."""

    return _ray_compat.dashboard_url()


def code_version() -> str:
    """The code's provenance string, the same in dataset manifests, checkpoints and generation outputs."""
    from gptcore.checkpoint import code_version as _code_version

    return _code_version()


# ---- filesystem paths ---------------------------------------------------------------------------------

def fs_and_path(url: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a local path or URL (s3://, gs://, memory://...) and the path within it."""
    fs, _, paths = fsspec.get_fs_token_paths(str(url))
    return fs, paths[0]


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def join(base: str, *parts: str) -> str:
    """Join path parts with "/" (URLs and local paths alike)."""
    return posixpath.join(str(base).rstrip("/") or "/", *parts) if parts else str(base)


# ---- atomic writes and hashes -------------------------------------------------------------------------

def atomic_write_bytes(path: str | os.PathLike, data: bytes, fs: fsspec.AbstractFileSystem | None = None) -> None:
    """Write `data` so that readers see either nothing or the whole file: a dot-prefixed temp file in the
    same directory, fsync, then a rename (local: os.replace, atomic also over an existing file; object
    stores: the upload of the temp is the one PUT, then a server-side move)."""
    if fs is None:
        fs, path = fs_and_path(path)
    path = str(path)
    parent = posixpath.dirname(path)
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            fileno = getattr(f, "fileno", None)
            if fileno is not None:
                try:
                    os.fsync(fileno())
                except (OSError, io.UnsupportedOperation, ValueError):
                    pass
        if is_local(fs):
            os.replace(tmp, path)
        else:
            fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm(tmp)
        except Exception:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str, fs: fsspec.AbstractFileSystem | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fs)


def atomic_write_json(path: str | os.PathLike, obj: Any, fs: fsspec.AbstractFileSystem | None = None,
                      *, indent: int | None = 2, sort_keys: bool = True) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str).encode("utf-8"), fs)


def sha256_file(path: str | os.PathLike, fs: fsspec.AbstractFileSystem | None = None) -> str:
    """Hex sha256 of a file (local path, or a path within `fs`), read in 1 MiB chunks."""
    fs = fs or fsspec.filesystem("file")
    h = hashlib.sha256()
    with fs.open(str(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any, length: int = 16) -> str:
    """A short content hash of a JSON-serialisable object (keys sorted), for ids."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]
