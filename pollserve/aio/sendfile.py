"""``loop.sendfile(transport, file)``: a file down a transport, with os.sendfile() where it can.

The standard loop's steps and hooks (its tests patch ``_sendfile_native``): a transport says what it
allows in ``_sendfile_compatible``; the native path waits for the transport's buffer to empty, stops
its reading and refuses its writes meanwhile, and sends from the file with os.sendfile() as the
socket takes it; when the OS or the file cannot (``SendfileNotAvailableError``), or the transport
only allows it, the fallback reads the file in chunks and writes them, waiting on the transport's
flow control.  The file's position ends after the last byte sent, as the standard loop leaves it.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import socket
from asyncio import constants
from typing import Any

from ..backends import CapacityError
from ..loop import EventLoop
from .sockets import copy_file
from .transport import StreamTransport, capacity_oserror

SendfileNotAvailableError = asyncio.SendfileNotAvailableError
FALLBACK_CHUNK = 16384


class FallbackDrain(asyncio.Protocol):
    """Stands in for the transport's protocol while the fallback writes: it turns pause_writing/
    resume_writing into something to await, and passes connection_lost on."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._protocol = transport.get_protocol()
        self._resume_reading = transport.is_reading()
        self._resume_writing = bool(getattr(transport, "_protocol_paused", False))
        self._writable: asyncio.Future[Any] | None = None
        if self._resume_writing:
            self._writable = transport._loop.create_future()
        transport.pause_reading()
        transport.set_protocol(self)

    async def drain(self) -> None:
        if self._transport.is_closing():
            raise ConnectionError("Connection closed by peer")
        if self._writable is not None:
            await self._writable

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raise RuntimeError("Invalid state: connection should have been established already.")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(exc if exc is not None else ConnectionError("Connection is closed by peer"))
        self._protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._transport._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None:
            self._writable.set_result(False)
            self._writable = None

    def data_received(self, data: bytes) -> None:
        raise RuntimeError("Invalid state: reading should be paused")

    def eof_received(self) -> bool | None:
        raise RuntimeError("Invalid state: reading should be paused")

    def restore(self) -> None:
        """The transport's own protocol back, reading and writing as it was."""
        self._transport.set_protocol(self._protocol)
        if self._resume_reading:
            self._transport.resume_reading()
        if self._writable is not None:
            self._writable.cancel()
        if self._resume_writing:
            self._protocol.resume_writing()


class SendfileCalls:
    """``sendfile`` for AsyncioLoop."""

    async def sendfile(
        self, transport: Any, file: Any, offset: int = 0, count: int | None = None, *, fallback: bool = True
    ) -> int:
        if transport.is_closing():
            raise RuntimeError("Transport is closing")
        mode = getattr(transport, "_sendfile_compatible", constants._SendfileMode.UNSUPPORTED)
        if mode is constants._SendfileMode.UNSUPPORTED:
            raise RuntimeError(f"sendfile is not supported for transport {transport!r}")
        if mode is constants._SendfileMode.TRY_NATIVE:
            try:
                return await self._sendfile_native(transport, file, offset, count)
            except SendfileNotAvailableError:
                if not fallback:
                    raise
        if not fallback:
            raise RuntimeError(f"fallback is disabled and native sendfile is not supported for transport {transport!r}")
        return await self._sendfile_fallback(transport, file, offset, count)

    async def _sendfile_native(self, transport: StreamTransport, file: Any, offset: int, count: int | None) -> int:
        if not hasattr(os, "sendfile"):
            raise SendfileNotAvailableError("os.sendfile() is not available")
        try:
            fileno = file.fileno()
        except (AttributeError, io.UnsupportedOperation):
            raise SendfileNotAvailableError("not a regular file") from None
        try:
            size = os.fstat(fileno).st_size
        except OSError:
            raise SendfileNotAvailableError("not a regular file") from None
        blocksize = count if count else size
        if not blocksize:
            return 0
        resume_reading = transport.is_reading()
        transport.pause_reading()
        await transport._make_empty_waiter()
        try:
            return await self._send_from_file(transport, fileno, offset, count, blocksize)
        finally:
            transport._reset_empty_waiter()
            if resume_reading:
                transport.resume_reading()

    async def _send_from_file(
        self, transport: StreamTransport, fileno: int, offset: int, count: int | None, blocksize: int
    ) -> int:
        sock: socket.socket = transport._sock  # type: ignore[assignment]
        fd = sock.fileno()
        total = 0
        try:
            while True:
                if count:
                    blocksize = count - total
                    if blocksize <= 0:
                        return total
                try:
                    sent = os.sendfile(fd, fileno, offset, blocksize)
                except (BlockingIOError, InterruptedError):
                    await self._writable(fd)
                    if transport._sock is None:
                        raise ConnectionError("Connection is closed by peer") from None
                    continue
                except OSError as exc:
                    if total == 0:  # not a file os.sendfile() takes (a pipe, say): the fallback can
                        raise SendfileNotAvailableError("os.sendfile call failed") from exc
                    if exc.errno == errno.ENOTCONN and type(exc) is not ConnectionError:
                        raise ConnectionError("socket is not connected", errno.ENOTCONN) from exc
                    raise
                if not sent:
                    return total  # the file ended
                offset += sent
                total += sent
                self.counts.bytes_out += sent
                transport._last_active = self.now
        finally:
            if total > 0:
                os.lseek(fileno, offset, os.SEEK_SET)

    async def _writable(self, fd: int) -> None:
        """Until fd is writable (the core's fast path; unwatched however the wait ends)."""
        waiter = self.create_future()

        def ready() -> None:
            if not waiter.done():
                waiter.set_result(None)

        try:
            EventLoop.add_writer(self, fd, ready)  # type: ignore[arg-type]
        except CapacityError as exc:
            raise capacity_oserror(exc) from None
        try:
            await waiter
        finally:
            if self._writers.get(fd) is ready and not self.is_closed():
                EventLoop.remove_writer(self, fd)  # type: ignore[arg-type]

    async def _sendfile_fallback(self, transport: Any, file: Any, offset: int, count: int | None) -> int:
        drain = FallbackDrain(transport)

        async def send(view: memoryview) -> None:
            await drain.drain()
            transport.write(view)

        try:
            return await copy_file(self, file, offset, count, FALLBACK_CHUNK, send)
        finally:
            drain.restore()
