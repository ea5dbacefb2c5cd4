"""``sock_connect`` and ``sock_accept``: the two socket calls the stream calls are built on.

The standard semantics: the call is tried first, and only when it would block is the fd watched,
on the core's fast path (no asyncio handle); the watch is taken back however the wait ends, a
cancellation included, so the socket stays usable and the fd unwatched.  The socket must be
non-blocking (checked in debug mode, as the standard loop checks it), not an ``ssl.SSLSocket``,
and not a transport's.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable
from typing import Any

from ..backends import CapacityError
from ..loop import EventLoop
from .addresses import HAS_IPV6, resolve
from .transport import capacity_oserror

try:
    import ssl
except ImportError:  # pragma: no cover - a Python built without OpenSSL
    ssl = None  # type: ignore[assignment]


def check_not_ssl(sock: socket.socket) -> None:
    if ssl is not None and isinstance(sock, ssl.SSLSocket):
        raise TypeError("Socket cannot be of type SSLSocket")


def check_socket(loop: Any, sock: socket.socket) -> None:
    """The standard loop's checks of a socket given to a ``sock_*`` call."""
    check_not_ssl(sock)
    if loop.get_debug() and sock.gettimeout() != 0:
        raise ValueError("the socket must be non-blocking")


async def wait_for_fd(
    loop: Any,
    fd: int,
    add: Callable[[EventLoop, int, Callable[[], Any]], None],
    table: dict[int, Callable[[], Any]],
    remove: Callable[[EventLoop, int], bool],
    attempt: Callable[[asyncio.Future[Any]], None],
) -> Any:
    """Call ``attempt(future)`` whenever fd is ready (``add`` is the core's add_reader or
    add_writer) until it settles the future, and return its result.  However the wait ends, the
    fd is unwatched, unless something else has watched it since."""
    loop._ensure_fd_no_transport(fd)
    future = loop.create_future()
    callback = functools.partial(attempt, future)
    try:
        add(loop, fd, callback)
    except CapacityError as exc:
        raise capacity_oserror(exc) from None
    try:
        return await future
    finally:
        if table.get(fd) is callback and not loop.is_closed():
            remove(loop, fd)
        # The error raised holds this frame (its traceback): no cycle through the future it was set on.
        del future, callback


def _connect_done(sock: socket.socket, address: Any, future: asyncio.Future[Any]) -> None:
    if future.done():
        return
    try:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"Connect call failed {address}")
    except (BlockingIOError, InterruptedError):
        return  # still under way: the fd stays watched
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(None)
    finally:
        del future  # the error holds this frame (its traceback), and the future holds the error


def _accept_once(sock: socket.socket, future: asyncio.Future[Any]) -> None:
    if future.done():
        return
    try:
        conn, address = sock.accept()
        conn.setblocking(False)
    except (BlockingIOError, InterruptedError):
        return
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result((conn, address))


class ConnectCalls:
    """``sock_connect`` and ``sock_accept`` for AsyncioLoop."""

    async def sock_connect(self, sock: socket.socket, address: Any) -> None:
        check_socket(self, sock)
        if sock.family == socket.AF_INET or (HAS_IPV6 and sock.family == socket.AF_INET6):
            resolved = await resolve(self, address, family=sock.family, type_=sock.type, proto=sock.proto)
            address = resolved[0][4]
        try:
            sock.connect(address)
        except (BlockingIOError, InterruptedError):
            # Under way (EINTR too: connect() goes on in the background): wait until writable.
            await wait_for_fd(
                self,
                sock.fileno(),
                EventLoop.add_writer,
                self._writers,
                EventLoop.remove_writer,
                functools.partial(_connect_done, sock, address),
            )

    async def sock_accept(self, sock: socket.socket) -> tuple[socket.socket, Any]:
        check_socket(self, sock)
        try:
            conn, address = sock.accept()
        except (BlockingIOError, InterruptedError):
            return await wait_for_fd(
                self,
                sock.fileno(),
                EventLoop.add_reader,
                self._readers,
                EventLoop.remove_reader,
                functools.partial(_accept_once, sock),
            )
        conn.setblocking(False)
        return conn, address
