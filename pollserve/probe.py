"""``pollserve stats``: read fd statistics of a running process from outside.

``--pid`` asks psutil about any process (pollserve or not); ``--url`` reads a
running pollserve's ``/stats`` endpoint.  Failures are ProbeError with a
one-line message for the user.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import socket
import time
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


class ProbeArgumentError(ProbeError):
    """The --pid or --url given cannot name anything (a malformed URL, a negative pid)."""


def socket_inode(pid: int, fd: int) -> int | None:
    """The inode of a socket a process holds as ``fd``: the same in every process that holds the
    socket (a listener a parent shares with its workers), where /proc says it (Linux: the fd's
    link reads ``socket:[INODE]``, proc(5)); None elsewhere, or if the fd has gone meanwhile."""
    if fd < 0:
        return None
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    if not (target.startswith("socket:[") and target.endswith("]")):
        return None
    return int(target[len("socket:[") : -1])


def distinct_sockets(held: list[tuple[int, Any]]) -> list[Any]:
    """The sockets in (pid, psutil connection) pairs, each once: pairs with one inode are one
    socket; where the inode cannot be read, each pair counts as a socket of its own."""
    unique: dict[int, Any] = {}
    unknown = []
    for pid, conn in held:
        inode = socket_inode(pid, conn.fd)
        if inode is None:
            unknown.append(conn)
        else:
            unique.setdefault(inode, conn)
    return [*unique.values(), *unknown]


def probe_process(pid: int) -> dict[str, Any]:
    """fd count, limits, usage, TCP sockets by state and listening addresses of a process."""
    if pid <= 0:
        raise ProbeArgumentError(f"--pid {pid} is not a process id (those are positive numbers)")
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            name = process.name()
            fds = count_fds(process)
            soft, hard = fd_limits(process)
            connections = getattr(process, "net_connections", process.connections)(kind="inet")
        children = process.children(recursive=True)
    except psutil.NoSuchProcess:
        raise ProbeError(f"no process with PID {pid}") from None
    except psutil.AccessDenied:
        raise ProbeError(f"cannot read process {pid}: permission denied (run as its user or as root)") from None
    held = [(pid, conn) for conn in connections if conn.type == socket.SOCK_STREAM]
    # A supervisor's workers (--workers) are its children: their fds and sockets are the server's too.
    child_rows = []
    for child in children:
        try:
            with child.oneshot():
                child_fds = count_fds(child)
                child_connections = getattr(child, "net_connections", child.connections)(kind="inet")
        except psutil.Error:  # exited meanwhile, or not ours to read
            continue
        child_rows.append({"pid": child.pid, "process_fds": child_fds})
        held += [(child.pid, conn) for conn in child_connections if conn.type == socket.SOCK_STREAM]
    # The workers inherit the parent's listener: one socket in three processes is one LISTEN.
    tcp = distinct_sockets(held)
    states = Counter(conn.status for conn in tcp)
    listening = sorted({format_address(tuple(conn.laddr)) for conn in tcp if conn.status == psutil.CONN_LISTEN})
    result: dict[str, Any] = {
        "pid": pid,
        "name": name,
        "process_fds": fds,
        "fd_soft_limit": soft,
        "fd_hard_limit": hard,
        "fd_usage": usage(fds, soft),
        "tcp_states": dict(sorted(states.items())),
        "listening": listening,
    }
    if child_rows:
        result["children"] = child_rows
        result["fds_with_children"] = fds + sum(row["process_fds"] for row in child_rows)
    return result


def stats_url(url: str) -> str:
    """Accept ``http://host:port`` as well as the full ``.../stats`` URL; ProbeArgumentError if malformed."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:  # "Invalid IPv6 URL", a port that is not a number or out of range
        raise ProbeArgumentError(f"--url {url!r} is not a valid URL: {exc}") from None
    if parts.scheme != "http":
        raise ProbeArgumentError(f"--url {url!r}: only http:// URLs are supported, not {parts.scheme}://")
    if not parts.hostname or any(char.isspace() for char in text):
        raise ProbeArgumentError(f"--url {url!r} is not a valid URL: expected http://HOST:PORT")
    if port is None:
        raise ProbeArgumentError(f"--url {url!r} has no port: the stats endpoint is on --stats-port")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/stats")
    return urllib.parse.urlunsplit(parts)


#: how long ``fetch_stats`` keeps asking an endpoint that answers "busy, retry after N s" (a 429 or
#: 503 with Retry-After, RFC 9110 section 10.2.3): a few seconds, for a person at a terminal
RETRY_WITHIN = 4.0


class _RetryLater(Exception):
    """The endpoint answered 429 or 503 and said when to ask again."""

    def __init__(self, message: str, seconds: float) -> None:
        super().__init__(message)
        self.seconds = seconds


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After field value asks to wait (delay-seconds or an HTTP-date); None if
    there is none or it cannot be read."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def fetch_stats(url: str, timeout: float = 5.0, retry_within: float = RETRY_WITHIN) -> dict[str, Any]:
    """The JSON snapshot a pollserve stats endpoint serves.  An endpoint that is busy and says when
    to ask again is asked again then, for as long as ``retry_within`` allows."""
    url = stats_url(url)
    started = time.monotonic()
    tries = 0
    while True:
        tries += 1
        try:
            return _fetch_once(url, timeout)
        except _RetryLater as exc:
            waited = time.monotonic() - started
            if waited + exc.seconds > retry_within:
                if tries == 1:
                    raise ProbeError(f"{exc}; it asks to retry in {exc.seconds:g} s") from None
                raise ProbeError(f"{exc}, {tries} times in {waited:.0f} s; giving up") from None
            time.sleep(exc.seconds)


def _fetch_once(url: str, timeout: float) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read(1 << 20)
    except urllib.error.HTTPError as exc:
        message = f"{url}: HTTP {exc.code} {exc.reason}"
        seconds = retry_after(exc.headers.get("Retry-After")) if exc.code in (429, 503) else None
        if seconds is not None:
            raise _RetryLater(message, seconds) from None
        raise ProbeError(message) from None
    except urllib.error.URLError as exc:
        raise ProbeError(f"cannot reach {url}: {getattr(exc.reason, 'strerror', None) or exc.reason}") from None
    except http.client.HTTPException:
        # The likeliest mistake: the app's port.  hello answers "Hello world", echo the request.
        raise ProbeError(
            f"{url} answered, but not with HTTP: is this the app's port rather than --stats-port?"
        ) from None
    except (OSError, ValueError) as exc:
        raise ProbeError(f"cannot read {url}: {exc}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise ProbeError(f"{url} did not return JSON") from None
    if not isinstance(data, dict):
        raise ProbeError(f"{url} did not return a JSON object")
    return data
