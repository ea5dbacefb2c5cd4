"""The ``sock_*`` calls of the asyncio loop: a non-blocking socket's syscalls, awaited.

Each call tries its syscall first, as the standard loop does, and only when the kernel says
``EAGAIN`` waits for the fd to be ready, through the core's own reader and writer tables (no
asyncio handle per wait), then tries again.  The wait is one future: cancelling the call at its
await cancels the future, whose done callback takes the fd out of the backend, so the socket is
left as it was and usable at once.  ``sock_connect`` and ``sock_accept`` belong with the stream
transports, not here.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import io
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from ..backends import CapacityError
from ..loop import EventLoop
from .transport import capacity_oserror

try:
    import ssl
except ImportError:  # an interpreter built without OpenSSL
    ssl = None  # type: ignore[assignment]

#: what the fallback of sock_sendfile reads at once (asyncio's constant)
SENDFILE_FALLBACK_READBUFFER_SIZE = 256 * 1024


async def copy_file(
    loop: Any, file: Any, offset: int, count: int | None, chunk: int, send: Callable[[memoryview], Awaitable[Any]]
) -> int:
    """The sendfile fallbacks' copy: read ``chunk`` bytes at a time in the default executor, await
    ``send`` with each, stop at ``count`` (None or 0: the end of the file); the file is left at the
    end of what was sent, as the standard loop leaves it.  How many bytes were sent."""
    if offset:
        file.seek(offset)
    blocksize = min(count, chunk) if count else chunk
    buf = bytearray(blocksize)
    total = 0
    try:
        while True:
            if count:
                blocksize = min(count - total, blocksize)
                if blocksize <= 0:
                    return total
            view = memoryview(buf)[:blocksize]
            read = await loop.run_in_executor(None, file.readinto, view)
            if not read:
                return total
            await send(view[:read])
            total += read
    finally:
        if total and hasattr(file, "seek"):
            file.seek(offset + total)


def check_not_ssl(sock: Any) -> None:
    """The standard loop's refusal: an ``ssl.SSLSocket`` has its own buffering, not the kernel's."""
    if ssl is not None and isinstance(sock, ssl.SSLSocket):
        raise TypeError("Socket cannot be of type SSLSocket")


class SocketCalls:
    """The loop's ``sock_*`` methods (mixed into ``AsyncioLoop``)."""

    _debug: bool

    def _check_sock(self, sock: Any) -> None:
        check_not_ssl(sock)
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")

    def _fd_ready(self, sock: Any, write: bool) -> asyncio.Future[None]:
        """A future done once ``sock`` is readable (or writable): its watcher goes as it fires, and,
        when the future is cancelled first, with it."""
        loop: Any = self  # an EventLoop once mixed in
        fd = sock.fileno()
        self._ensure_fd_no_transport(fd)
        waiter: asyncio.Future[None] = self.create_future()
        table = self._writers if write else self._readers
        core_remove = EventLoop.remove_writer if write else EventLoop.remove_reader

        def ready() -> None:
            if table.get(fd) is ready:
                core_remove(loop, fd)
            if not waiter.done():
                waiter.set_result(None)

        def forget(_: asyncio.Future[None]) -> None:
            # Another wait on the fd may have replaced this one (as the standard loop's handle is
            # replaced): leave that one be.
            if table.get(fd) is ready and not self._closed:
                core_remove(loop, fd)

        try:
            (EventLoop.add_writer if write else EventLoop.add_reader)(loop, fd, ready)
        except CapacityError as exc:
            raise capacity_oserror(exc) from None
        waiter.add_done_callback(forget)
        return waiter

    async def _io(self, sock: Any, write: bool, attempt: Callable[[], Any]) -> Any:
        """``attempt()``, the syscall, until it does not block, waiting for readiness in between."""
        self._check_sock(sock)
        while True:
            try:
                return attempt()
            except (BlockingIOError, InterruptedError):
                pass
            await self._fd_ready(sock, write)

    async def sock_recv(self, sock: socket.socket, nbytes: int) -> bytes:
        return await self._io(sock, False, lambda: sock.recv(nbytes))

    async def sock_recv_into(self, sock: socket.socket, buf: Any) -> int:
        return await self._io(sock, False, lambda: sock.recv_into(buf))

    async def sock_sendall(self, sock: socket.socket, data: Any) -> None:
        """Send all of ``data``, any C-contiguous buffer: its length is counted in bytes, whatever
        the buffer's item size or dimensions (the standard loop counts items)."""
        self._check_sock(sock)
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        with memoryview(data) as whole, whole.cast("B") as view:
            while sent < view.nbytes:
                await self._fd_ready(sock, True)
                try:
                    sent += sock.send(view[sent:])
                except (BlockingIOError, InterruptedError):
                    continue

    if sys.version_info >= (3, 11):  # the datagram calls came with 3.11

        async def sock_recvfrom(self, sock: socket.socket, bufsize: int) -> tuple[bytes, Any]:
            return await self._io(sock, False, lambda: sock.recvfrom(bufsize))

        async def sock_recvfrom_into(self, sock: socket.socket, buf: Any, nbytes: int = 0) -> tuple[int, Any]:
            """``nbytes`` 0 is the whole buffer, in bytes (the standard loop takes its len())."""
            return await self._io(sock, False, lambda: sock.recvfrom_into(buf, nbytes))

        async def sock_sendto(self, sock: socket.socket, data: Any, address: Any) -> int:
            return await self._io(sock, True, lambda: sock.sendto(data, address))

    # -- sendfile ------------------------------------------------------------------------------------

    async def sock_sendfile(
        self, sock: socket.socket, file: Any, offset: int = 0, count: int | None = None, *, fallback: bool | None = True
    ) -> int:
        """``os.sendfile`` where the OS and the file allow it; else, with ``fallback``, reads and
        ``sock_sendall``; else ``asyncio.SendfileNotAvailableError``."""
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")
        check_not_ssl(sock)
        self._check_sendfile_params(sock, file, offset, count)
        try:
            return await self._sock_sendfile_native(sock, file, offset, count)
        except asyncio.SendfileNotAvailableError:
            if not fallback:
                raise
        return await self._sock_sendfile_fallback(sock, file, offset, count)

    @staticmethod
    def _check_sendfile_params(sock: Any, file: Any, offset: Any, count: Any) -> None:
        if "b" not in getattr(file, "mode", "b"):
            raise ValueError("file should be opened in binary mode")
        if sock.type != socket.SOCK_STREAM:
            raise ValueError("only SOCK_STREAM type sockets are supported")
        if count is not None:
            if not isinstance(count, int):
                raise TypeError(f"count must be a positive integer (got {count!r})")
            if count <= 0:
                raise ValueError(f"count must be a positive integer (got {count!r})")
        if not isinstance(offset, int):
            raise TypeError(f"offset must be a non-negative integer (got {offset!r})")
        if offset < 0:
            raise ValueError(f"offset must be a non-negative integer (got {offset!r})")

    async def _sock_sendfile_native(self, sock: Any, file: Any, offset: int, count: int | None) -> int:
        """The kernel copies the file: a block at a time, waiting for the socket in between; the
        file's position ends after what was sent, as the standard loop leaves it."""
        if not hasattr(os, "sendfile"):
            raise asyncio.SendfileNotAvailableError("os.sendfile() is not available")
        try:
            fileno = file.fileno()
        except (AttributeError, io.UnsupportedOperation):
            raise asyncio.SendfileNotAvailableError("not a regular file") from None
        try:
            size = os.fstat(fileno).st_size
        except OSError:
            raise asyncio.SendfileNotAvailableError("not a regular file") from None
        blocksize = min(count or size, sys.maxsize // 2 + 1)  # 32-bit builds overflow past 1 GiB
        if not blocksize:
            return 0
        total = 0
        waited = False
        try:
            while not count or total < count:
                try:
                    sent = os.sendfile(sock.fileno(), fileno, offset + total, count - total if count else blocksize)
                except (BlockingIOError, InterruptedError):
                    sent = -1
                except OSError as exc:
                    if total == 0:
                        raise asyncio.SendfileNotAvailableError("os.sendfile call failed") from exc
                    if waited and exc.errno == errno.ENOTCONN and type(exc) is not ConnectionError:
                        raise ConnectionError(errno.ENOTCONN, "socket is not connected") from exc
                    raise
                if sent == 0:
                    break  # the end of the file
                total += max(sent, 0)
                # The standard loop waits for the socket after each block too: other tasks get
                # their turn while a large file goes out.
                await self._fd_ready(sock, True)
                waited = True
            return total
        finally:
            if total:
                os.lseek(fileno, offset + total, os.SEEK_SET)

    async def _sock_sendfile_fallback(self, sock: Any, file: Any, offset: int, count: int | None) -> int:
        return await copy_file(
            self, file, offset, count, SENDFILE_FALLBACK_READBUFFER_SIZE, functools.partial(self.sock_sendall, sock)
        )
