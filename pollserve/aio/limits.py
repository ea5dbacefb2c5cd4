"""pollserve's connection limits on asyncio servers, when asked for.

``create_server`` and ``create_unix_server`` take three keyword options on this loop, so that
``asyncio.start_server(handler, host, port, idle_timeout=30)`` passes them through its keywords
(asyncio's own loop refuses them with ``TypeError``).  Each is off by default, and a server given
none behaves as on asyncio's loop.  Given, each does what pollserve's own server does (its
docstrings in ``pollserve/server.py`` say why):

- ``idle_timeout``: a connection on which nothing moved for that long is closed, found by one sweep
  timer per server (the transports only store the loop's clock reading on each transfer).  One whose
  client has received everything gets the lingering close; one with bytes undelivered, in the
  transport's buffer or in the kernel's send queue, is reset.  Counted in ``loop.counts``.
- ``max_connections``: a connection accepted while that many of the server's are open is closed at
  once and counted in ``connections_refused``.
- ``linger_timeout``: ``close()``, once the buffer is flushed, shuts the write side and reads and
  drops until the client's EOF or the timeout, so that bytes the client is still sending cannot
  make the kernel reset the connection and destroy the reply.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .. import arguments
from ..sendqueue import unsent_bytes

logger = logging.getLogger("asyncio")

#: how long an idle close lingers on a server without linger_timeout (pollserve's own default)
IDLE_LINGER = 2.0


def _timeout(value: object, name: str) -> float | None:
    """Seconds, finite and not negative; None or 0 for none."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a float, not bool")
    return arguments.seconds(value, name) or None


def _count(value: object, name: str) -> int | None:
    """A count of at least 1 (a float rounded down, infinity for no bound); None for none."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a float, not bool")
    count = arguments.size(value, name)
    if count < 1:
        raise ValueError(f"{name} must be at least 1, got {count}")
    return count


class ConnectionLimits:
    """The options one server was given, checked."""

    __slots__ = ("idle_timeout", "max_connections", "linger_timeout")

    def __init__(self, idle_timeout: object = None, max_connections: object = None, linger_timeout: object = None):
        self.idle_timeout = _timeout(idle_timeout, "idle_timeout")
        self.max_connections = _count(max_connections, "max_connections")
        self.linger_timeout = _timeout(linger_timeout, "linger_timeout")

    def __bool__(self) -> bool:
        return not (self.idle_timeout is None and self.max_connections is None and self.linger_timeout is None)

    def __repr__(self) -> str:
        return (
            f"ConnectionLimits(idle_timeout={self.idle_timeout!r}, max_connections={self.max_connections!r}, "
            f"linger_timeout={self.linger_timeout!r})"
        )


class IdleSweep:
    """One server's idle sweep: every quarter of the timeout (within [0.05 s, 5 s]) it closes the
    connections that made no progress for the timeout, as pollserve's Server._sweep_idle does.

    Progress is a transfer either way (the transport stores the loop's clock in ``_last_active``)
    or, seen here, the kernel's send queue shrinking between two looks: a slow reader whose send()
    seldom succeeds is reading all the same.  Only connections without a transfer for half the
    timeout are asked, one ioctl each per sweep.  A closing connection still flushing is held to
    the same rule; a lingering one has its own timer.  The sweep goes on while the server listens
    or has connections."""

    def __init__(self, server: Any, timeout: float) -> None:
        self.server = server
        self.timeout = timeout
        self.interval = min(max(timeout / 4, 0.05), 5.0)
        self._timer: Any = None
        #: transport -> (its kernel send queue, when) at the sweep's last look
        self._seen: dict[Any, tuple[int, float]] = {}

    def start(self) -> None:
        if self._timer is None:
            self._timer = self.server._loop.call_later(self.interval, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        server = self.server
        loop = server._loop
        now = loop.now
        deadline = now - self.timeout
        look_from = now - self.timeout / 2
        seen, self._seen = self._seen, {}
        idle = []
        for transport in list(server._clients):
            if transport._sock is None or (transport._closing and not transport._buffer):
                continue  # closed, or closing with its own timer (lingering)
            if transport._last_active > look_from:
                continue
            progress = self._kernel_progress(transport, seen.get(transport), now)
            if progress:
                transport._last_active = now
            elif progress is not None and transport._last_active <= deadline:
                idle.append(transport)
        for transport in idle:
            self._give_up(transport)
        if server._sockets is not None or server._clients:
            self.start()

    def _kernel_progress(self, transport: Any, before: tuple[int, float] | None, now: float) -> bool | None:
        """Whether the kernel's send queue shrank since the last look; None when there was no
        look since the last transfer (look again next time); False where the OS cannot say."""
        unsent = unsent_bytes(transport._sock_fd)
        if unsent is None:
            return False
        self._seen[transport] = (unsent, now)
        if unsent == 0:
            return False  # nothing outstanding: idle indeed
        if before is None or before[1] < transport._last_active:
            return None
        return unsent < before[0]

    def _give_up(self, transport: Any) -> None:
        """Everything delivered: the lingering close.  Else (its buffer, or the kernel's queue,
        holds bytes the client has not received): a reset, so that the client cannot take a
        truncated reply for a whole one."""
        counts = self.server._loop.counts
        counts.connections_idle_closed += 1
        undelivered = transport._buffer_size + (unsent_bytes(transport._sock_fd) or 0)
        if self.server._loop.get_debug():
            logger.debug("%r: no progress for %g s, %d bytes undelivered", transport, self.timeout, undelivered)
        if undelivered:
            counts.connections_idle_reset += 1
            transport._reset()
        else:
            if transport._linger_timeout is None:
                transport._linger_timeout = IDLE_LINGER
            transport.close()


class ServerLimits:
    """``create_server`` and ``create_unix_server`` with pollserve's options, for AsyncioLoop; a
    server given none is made exactly as without this class."""

    async def create_server(
        self,
        protocol_factory: Any,
        host: Any = None,
        port: Any = None,
        *,
        idle_timeout: float | None = None,
        max_connections: float | None = None,
        linger_timeout: float | None = None,
        **kwds: Any,
    ) -> Any:
        limits = ConnectionLimits(idle_timeout, max_connections, linger_timeout)
        return await _serve(limits, super().create_server, protocol_factory, host, port, **kwds)  # type: ignore[misc]

    async def create_unix_server(
        self,
        protocol_factory: Any,
        path: Any = None,
        *,
        idle_timeout: float | None = None,
        max_connections: float | None = None,
        linger_timeout: float | None = None,
        **kwds: Any,
    ) -> Any:
        limits = ConnectionLimits(idle_timeout, max_connections, linger_timeout)
        return await _serve(limits, super().create_unix_server, protocol_factory, path, **kwds)  # type: ignore[misc]


async def _serve(limits: ConnectionLimits, create: Any, *args: Any, start_serving: bool = True, **kwds: Any) -> Any:
    """Without limits, the server as ``create`` makes it.  With them, made not serving, given its
    limits, then serving if asked: no connection is accepted before the limits apply."""
    if not limits:
        return await create(*args, start_serving=start_serving, **kwds)
    server = await create(*args, start_serving=False, **kwds)
    server._set_limits(limits)
    if start_serving:
        server._start_serving()
        await asyncio.sleep(0)  # one pass, as the standard loop takes
    return server
