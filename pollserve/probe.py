"""``pollserve stats``: read fd statistics of a running process from outside.

``--pid`` asks psutil about any process (pollserve or not); ``--url`` reads a
running pollserve's ``/stats`` endpoint.  Failures are ProbeError with a
one-line message for the user.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from typing import Any

import psutil

from .server import format_address
from .stats import count_fds, fd_limits, usage


class ProbeError(Exception):
    """The process or endpoint cannot be read; the message is for the user as it is."""


def probe_process(pid: int) -> dict[str, Any]:
    """fd count, limits, usage, TCP sockets by state and listening addresses of a process."""
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            name = process.name()
            fds = count_fds(process)
            soft, hard = fd_limits(process)
            connections = getattr(process, "net_connections", process.connections)(kind="inet")
    except psutil.NoSuchProcess:
        raise ProbeError(f"no process with PID {pid}") from None
    except psutil.AccessDenied:
        raise ProbeError(f"cannot read process {pid}: permission denied (run as its user or as root)") from None
    tcp = [conn for conn in connections if conn.type == socket.SOCK_STREAM]
    states = Counter(conn.status for conn in tcp)
    listening = sorted({format_address(tuple(conn.laddr)) for conn in tcp if conn.status == psutil.CONN_LISTEN})
    return {
        "pid": pid,
        "name": name,
        "process_fds": fds,
        "fd_soft_limit": soft,
        "fd_hard_limit": hard,
        "fd_usage": usage(fds, soft),
        "tcp_states": dict(sorted(states.items())),
        "listening": listening,
    }


def stats_url(url: str) -> str:
    """Accept ``http://host:port`` as well as the full ``.../stats`` URL."""
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise ProbeError(f"only http:// URLs are supported, not {parts.scheme}://")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/stats")
    return urllib.parse.urlunsplit(parts)


def fetch_stats(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """The JSON snapshot a pollserve stats endpoint serves."""
    url = stats_url(url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read(1 << 20)
    except urllib.error.HTTPError as exc:
        raise ProbeError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise ProbeError(f"cannot reach {url}: {getattr(exc.reason, 'strerror', None) or exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise ProbeError(f"cannot read {url}: {exc}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise ProbeError(f"{url} did not return JSON") from None
    if not isinstance(data, dict):
        raise ProbeError(f"{url} did not return a JSON object")
    return data
