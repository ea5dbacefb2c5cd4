"""The server object of ``create_server`` and ``create_unix_server``, and its accept loop.

An ``asyncio.AbstractServer`` with the standard semantics of the running Python: ``start_serving``,
``serve_forever``, ``close``, ``wait_closed`` (which, from 3.12.1, waits until the server is closed
*and* its connections are gone; before, it returned at once once closed), ``sockets``,
``is_serving``, ``async with``, and ``close_clients``/``abort_clients`` on 3.13.

Accepting: each listener is watched on the core's fast path; a wakeup accepts up to ``backlog``
connections and makes each one's transport at once (no task per connection).  ``EMFILE`` and its
kin pause the listener for a second and tell the exception handler, as the standard loop does; a
connection the backend cannot watch (select's ``FD_SETSIZE``) is closed, counted in
``loop.counts.connections_refused`` and reported with an ``OSError`` naming the limit and the better
backend, and the server goes on.

pollserve's options (``idle_timeout``, ``max_connections``, ``linger_timeout``: ``limits.py``) apply
to a server given them, and to no other.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import functools
import logging
import os
import socket
import sys
import weakref
from asyncio import trsock
from typing import Any

from ..backends import CapacityError
from ..loop import EventLoop
from .limits import ConnectionLimits, IdleSweep
from .tls import accept_tls
from .transport import StreamTransport, capacity_oserror

logger = logging.getLogger("asyncio")

#: seconds a listener rests after accept() ran out of fds or memory (asyncio's ACCEPT_RETRY_DELAY)
ACCEPT_RETRY_DELAY = 1.0

_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: 3.12.1 changed wait_closed(): it waits for the close *and* the connections, in either order
WAIT_CLOSED_WAITS_FOR_CLOSE = sys.version_info >= (3, 12, 1)


class Server(asyncio.AbstractServer):
    """Listening sockets, the protocol factory they serve, and the connections they made."""

    def __init__(
        self,
        loop: Any,
        sockets: list[socket.socket],
        protocol_factory: Any,
        backlog: int,
        ssl_context: Any = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> None:
        self._loop = loop
        self._sockets: list[socket.socket] | None = sockets
        self._protocol_factory = protocol_factory
        self._backlog = backlog
        #: TLS, when asked for: the user's SSLContext and the timeouts of each connection's TLS
        self._ssl_context = ssl_context
        self._ssl_handshake_timeout = ssl_handshake_timeout
        self._ssl_shutdown_timeout = ssl_shutdown_timeout
        #: the transports it made and not yet lost (weakly: an abandoned one still warns)
        self._clients: weakref.WeakSet[StreamTransport] = weakref.WeakSet()
        self._active = 0
        self._waiters: list[asyncio.Future[Any]] | None = []
        self._serving = False
        self._serving_forever_fut: asyncio.Future[Any] | None = None
        #: the context connections are made in: captured when serving starts, as the standard loop
        self._context: contextvars.Context | None = None
        #: listeners resting after running out of fds: fd -> the timer that resumes them
        self._resting: dict[int, asyncio.TimerHandle] = {}
        #: UNIX listeners whose file close() removes (cleanup_socket): socket -> the file's inode
        self._unix_files: dict[socket.socket, int] = {}
        #: pollserve's options, when given (limits.py), and the idle sweep of an idle_timeout
        self._limits: ConnectionLimits | None = None
        self._sweep: IdleSweep | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} sockets={self.sockets!r}>"

    # -- connections ---------------------------------------------------------------------------------

    def _attach(self, transport: StreamTransport | None = None) -> None:
        """A connection of the server's; wait_closed() waits for it (3.12's tests call it bare)."""
        self._active += 1
        if transport is not None:
            self._clients.add(transport)

    def _detach(self, transport: StreamTransport | None = None) -> None:
        self._active -= 1
        if transport is not None:
            self._clients.discard(transport)
        if not self._active and self._sockets is None:
            self._wakeup()

    def _wakeup(self) -> None:
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    if sys.version_info >= (3, 13):

        def close_clients(self) -> None:
            for transport in self._clients.copy():
                transport.close()

        def abort_clients(self) -> None:
            for transport in self._clients.copy():
                transport.abort()

    def _set_limits(self, limits: ConnectionLimits) -> None:
        self._limits = limits
        if limits.idle_timeout is not None:
            self._sweep = IdleSweep(self, limits.idle_timeout)

    # -- serving -------------------------------------------------------------------------------------

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    @property
    def sockets(self) -> tuple[trsock.TransportSocket, ...]:
        if self._sockets is None:
            return ()
        return tuple(trsock.TransportSocket(sock) for sock in self._sockets)

    def _start_serving(self) -> None:
        if self._serving or self._sockets is None:
            return
        self._context = contextvars.copy_context()
        for sock in self._sockets:
            sock.listen(self._backlog)
            self._watch(sock)
        self._serving = True
        self._loop.counts.serving[self] = None if self._limits is None else self._limits.max_connections
        if self._sweep is not None:
            self._sweep.start()

    def _watch(self, sock: socket.socket) -> None:
        try:
            EventLoop.add_reader(self._loop, sock.fileno(), functools.partial(self._accept, sock))
        except CapacityError as exc:
            raise capacity_oserror(exc) from None

    def _remove_on_close(self, sock: socket.socket) -> None:
        """close() removes the listener's socket file, unless another has replaced it meanwhile."""
        path = sock.getsockname()
        if path and path[0] not in (0, "\x00"):
            with contextlib.suppress(FileNotFoundError):
                self._unix_files[sock] = os.stat(path).st_ino

    def _close_listener(self, sock: socket.socket) -> None:
        inode = self._unix_files.pop(sock, None)
        path = sock.getsockname() if inode is not None else None
        sock.close()
        if path is not None:
            try:
                if os.stat(path).st_ino == inode:
                    os.remove(path)
            except FileNotFoundError:
                pass
            except OSError as err:
                logger.error("Unable to clean up listening UNIX socket %r: %r", path, err)

    def close(self) -> None:
        """Stop listening and close the listeners; the connections made stay open."""
        sockets, self._sockets = self._sockets, None
        if sockets is None:
            return
        loop = self._loop
        for sock in sockets:
            timer = self._resting.pop(sock.fileno(), None)
            if timer is not None:
                timer.cancel()
            if not loop.is_closed():
                EventLoop.remove_reader(loop, sock.fileno())
            self._close_listener(sock)
        self._serving = False
        loop.counts.serving.pop(self, None)
        if self._serving_forever_fut is not None and not self._serving_forever_fut.done():
            self._serving_forever_fut.cancel()
            self._serving_forever_fut = None
        if not self._active:
            self._wakeup()

    async def start_serving(self) -> None:
        self._start_serving()
        await asyncio.sleep(0)  # as the standard server: one pass, so the listeners are watched

    async def serve_forever(self) -> None:
        if self._serving_forever_fut is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._sockets is None:
            raise RuntimeError(f"server {self!r} is closed")
        self._start_serving()
        self._serving_forever_fut = self._loop.create_future()
        try:
            await self._serving_forever_fut
        except asyncio.CancelledError:
            try:
                self.close()
                await self.wait_closed()
            finally:
                raise
        finally:
            self._serving_forever_fut = None

    async def wait_closed(self) -> None:
        """3.12.1 and later: until the server is closed and its connections are gone, in either
        order.  Before: at once if closed already, else until then (the standard's old rule)."""
        if self._waiters is None or (not WAIT_CLOSED_WAITS_FOR_CLOSE and self._sockets is None):
            return
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        await waiter

    # -- accepting -----------------------------------------------------------------------------------

    def _accept(self, sock: socket.socket) -> None:
        """A listener is readable: accept up to ``backlog`` connections, each its transport at once."""
        loop = self._loop
        for _ in range(self._backlog):
            try:
                conn, address = sock.accept()
                conn.setblocking(False)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._rest(sock, exc)
                else:
                    loop.call_exception_handler(
                        {"message": "socket.accept() failed", "exception": exc, "socket": trsock.TransportSocket(sock)}
                    )
                return
            if loop.get_debug():
                logger.debug("%r got a new connection from %r: %r", self, address, conn)
            self._connection_made(conn, address)

    def _connection_made(self, conn: socket.socket, address: Any) -> None:
        loop = self._loop
        limits = self._limits
        if limits is not None and limits.max_connections is not None and self._active >= limits.max_connections:
            conn.close()  # at once: a clean refusal, not a client left waiting in the backlog
            loop.counts.connections_refused += 1
            if loop.get_debug():
                logger.debug("%r refused %r: %d connections open, its max_connections", self, address, self._active)
            return
        context = self._context.copy() if self._context is not None else contextvars.copy_context()
        protocol = None
        try:
            protocol = context.run(self._protocol_factory)
            if self._ssl_context:
                accept_tls(self, conn, address, protocol, context)
                loop.counts.connections_accepted += 1
                return
            transport = StreamTransport(
                loop, conn, protocol, extra={"peername": address}, server=self, context=context, watch_now=True
            )
        except CapacityError as exc:
            conn.close()
            loop.counts.connections_refused += 1
            loop.call_exception_handler(
                {
                    "message": "a new connection was closed: the loop's backend cannot watch it",
                    "exception": capacity_oserror(exc),
                    "protocol": protocol,
                }
            )
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            conn.close()
            if loop.get_debug():  # the standard loop tells only in debug mode
                context_info: dict[str, Any] = {
                    "message": "Error on transport creation for incoming connection",
                    "exception": exc,
                }
                if protocol is not None:
                    context_info["protocol"] = protocol
                loop.call_exception_handler(context_info)
            return
        if limits is not None:
            transport._linger_timeout = limits.linger_timeout
        loop.counts.connections_accepted += 1

    def _rest(self, sock: socket.socket, exc: OSError) -> None:
        """Out of fds or memory: a level-triggered listener would wake the loop at once again, so
        stop watching it for ACCEPT_RETRY_DELAY, as the standard loop does."""
        loop = self._loop
        loop.call_exception_handler(
            {
                "message": "socket.accept() out of system resource",
                "exception": exc,
                "socket": trsock.TransportSocket(sock),
            }
        )
        fd = sock.fileno()
        EventLoop.remove_reader(loop, fd)
        self._resting[fd] = loop.call_later(ACCEPT_RETRY_DELAY, self._resume, sock)

    def _resume(self, sock: socket.socket) -> None:
        self._resting.pop(sock.fileno(), None)
        if self._serving and self._sockets is not None:
            self._watch(sock)
