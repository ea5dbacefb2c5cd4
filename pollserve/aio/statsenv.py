"""The stats endpoint of a process started by someone else's command: ``POLLSERVE_STATS_PORT``.

``uvicorn --loop pollserve:new_event_loop app:app`` makes the loop; the program never calls
``start_stats_server()``.  With ``POLLSERVE_STATS_PORT`` set, the first loop pollserve's loop
factories (``pollserve.new_event_loop``, ``pollserve.loops``, ``pollserve.run``) make in a process
serves the endpoint on ``POLLSERVE_STATS_HOST`` (127.0.0.1 by default): ``N`` binds that port, ``N-M``
the first free port of the range, ``0`` a port the kernel picks.  One loop per process holds it at a
time, found by ``os.getpid()`` so that a forked child's first loop is its own first;
once that loop is closed, the next loop made takes it.

The variable is inherited by every worker of ``uvicorn --workers N`` or gunicorn, so a port being
taken is expected, not an error: the loop logs one warning naming the port and goes on without an
endpoint (a range gives each worker one).  Nothing here stops a loop from being made; whatever goes
wrong is one warning line.  What is said goes to the ``pollserve`` logger, or to stderr when no
logging is set up for it, so that it is seen either way.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING

from ..listeners import format_address

if TYPE_CHECKING:
    from .loop import AsyncioLoop

log = logging.getLogger("pollserve")

PORT_ENV = "POLLSERVE_STATS_PORT"
HOST_ENV = "POLLSERVE_STATS_HOST"
DEFAULT_HOST = "127.0.0.1"

#: (pid, the loop that holds the variable there); another pid's entry is a parent's, from before a fork
_holder: tuple[int, weakref.ref[AsyncioLoop]] | None = None
_lock = threading.Lock()


def ports_asked(value: str) -> range:
    """The ports to try, in order, for the variable's value: ``N``, ``N-M`` or ``0``; ValueError
    saying what is accepted otherwise."""
    first, dash, last = value.strip().partition("-")
    try:
        low = int(first, 10)
        high = int(last, 10) if dash else low
    except ValueError:
        low = high = -1
    if dash and 0 < low <= high <= 65535:
        return range(low, high + 1)
    if not dash and 0 <= low <= 65535:
        return range(low, low + 1)
    raise ValueError(f"{PORT_ENV}={value!r} is not a port (1-65535), a range N-M, or 0")


def say(level: int, message: str) -> None:
    """One line on the ``pollserve`` logger, or on stderr when nothing would show it (no handler,
    or a ``dictConfig`` that disabled the logger)."""
    if log.hasHandlers() and not log.disabled:
        log.log(level, "%s", message)
    elif sys.stderr is not None:  # None under pythonw
        try:
            sys.stderr.write(f"pollserve: {message}\n")
            sys.stderr.flush()
        except (OSError, ValueError):  # a closed stderr: nowhere left to say it, and the loop runs on
            pass


def _takes_the_variable(loop: AsyncioLoop) -> bool:
    """Whether ``loop`` is the one of this process to serve the endpoint: no open loop holds it."""
    global _holder
    pid = os.getpid()
    with _lock:
        if _holder is not None and _holder[0] == pid:
            held = _holder[1]()
            if held is not None and not held.is_closed():
                return False
        _holder = (pid, weakref.ref(loop))
        return True


def start_from_environment(loop: AsyncioLoop) -> None:
    """Serve the stats endpoint on ``loop`` if the variable asks for one and no other loop of this
    process has it; never raises (a loop is not refused for its figures)."""
    value = os.environ.get(PORT_ENV, "").strip()
    if not value or not _takes_the_variable(loop):
        return
    try:
        _start(loop, value)
    except Exception as exc:  # the loop runs whatever happens here
        say(logging.WARNING, f"no stats endpoint for pid {os.getpid()}: {type(exc).__name__}: {exc}")


def _start(loop: AsyncioLoop, value: str) -> None:
    from ..service import is_loopback  # the server's modules, imported when an endpoint is wanted

    pid = os.getpid()
    try:
        ports = ports_asked(value)
    except ValueError as exc:
        say(logging.WARNING, f"{exc}: no stats endpoint for pid {pid}")
        return
    host = os.environ.get(HOST_ENV, "").strip() or DEFAULT_HOST
    taken: list[int] = []
    for port in ports:
        try:
            address = loop.start_stats_server(host, port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                taken.append(port)
                continue
            where = exc.filename or format_address((host, port))
            say(logging.WARNING, f"no stats endpoint for pid {pid}: cannot listen on {where}: {exc.strerror or exc}")
            return
        url = f"http://{format_address(address, url=True)}/"
        say(logging.INFO, f"stats for pid {pid} on {url}")
        if not is_loopback(address):
            say(
                logging.WARNING, f"the stats endpoint is on {url}, not loopback: anyone who reaches it sees the figures"
            )
        return
    if len(taken) == 1:
        reason = f"port {taken[0]} on {host} is in use (another process has it: {PORT_ENV}=N-M gives each its own)"
    else:
        reason = f"every port of {ports.start}-{ports.stop - 1} on {host} is in use"
    say(logging.WARNING, f"no stats endpoint for pid {pid}: {reason}")
