"""Port checks of `raygpt serve` before anything starts: a taken port is a one-line error, not 500s.

    check_port_free("127.0.0.1", 8000, "--port")   # raises PortInUseError naming the holder if knowable
    is_loopback("127.0.0.1")                        # True

Why: Serve starts its proxy (or HAProxy) on the port long after Ray has started; a port held by an
old HAProxy or another server then shows up as bind errors in the replica logs and 500s to clients.
Does not: reserve the port (another process can still take it between the check and Serve's bind).
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from pipelines.errors import UserError


class PortInUseError(UserError):
    """A port `raygpt serve` needs is already bound by another process."""


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or "localhost") is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def port_holder(port: int) -> str | None:
    """'pid 123 (haproxy)' of the process listening on TCP `port`, or None when unknown (no psutil,
    no permission to see other users' sockets, or nobody listening)."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            try:
                name = psutil.Process(c.pid).name()
            except psutil.Error:
                name = "?"
            return f"pid {c.pid} ({name})"
    return None


def check_port_free(host: str, port: int, param: str) -> None:
    """Raise PortInUseError unless TCP `port` can be bound on `host` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # the same option servers use, so a port in TIME_WAIT after a clean stop counts as free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise UserError(f"{param} {port}: cannot bind {host}:{port} ({e.strerror}); "
                                f"pick another host or port") from None
            holder = port_holder(port)
            who = f" by {holder}" if holder else ""
            raise PortInUseError(f"{param} {port}: {host}:{port} is already in use{who}; stop that process "
                                 f"or pass another {param}") from None
