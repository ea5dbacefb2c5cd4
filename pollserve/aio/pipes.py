"""Pipe transports: ``connect_read_pipe`` and ``connect_write_pipe`` on pollserve's loop.

The standard loop's pipe semantics (asyncio's ``unix_events``): a pipe, a socket or a character
device (a pty) is accepted and any other file refused with ``ValueError``, as asyncio refuses it;
the fd is made non-blocking; ``connection_made`` comes first, then reading.  A read pipe gives
``data_received``, then at EOF ``eof_received`` and ``connection_lost(None)``; ``EIO`` (a pty whose
other side closed) ends it quietly.  A write pipe buffers what the kernel does not take, with the
high and low water marks of ``pause_writing``/``resume_writing``; ``write_eof``/``close`` end it once
the buffer is flushed; a broken pipe (``EPIPE``, or the reader's end seen closed) ends it in
``connection_lost`` with the error, logged only in debug mode.

The fds are watched on the core's fast path (``EventLoop.add_reader(loop, fd, callback)``), each
callback a ``context.run`` of the transport's method, whose errors the transport routes to the
exception handler itself.  Each transport is in ``loop._transports`` under its fd, so that
``add_reader`` on it is refused as for a socket transport.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import functools
import logging
import os
import stat
import sys
import warnings
from asyncio import transports
from collections.abc import Callable
from typing import Any

from ..backends import CapacityError
from ..loop import EventLoop
from .reading import PausableReading
from .transport import LOG_THRESHOLD_FOR_CONNLOST_WRITES, capacity_oserror
from .unsupported import refuse_on_windows

logger = logging.getLogger("asyncio")


def _pipe_kind(fd: int) -> tuple[bool, bool, bool]:
    """(fifo, socket, character device) for the file behind fd."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode), stat.S_ISSOCK(mode), stat.S_ISCHR(mode)


class _PipeTransport:
    """What the two pipe transports share: the pipe, its fd, the contexts, the repr, the end."""

    _pipe: Any = None  # set before anything can fail: __del__ reads it
    _direction = ""

    def _attach(self, loop: Any, pipe: Any, protocol: asyncio.BaseProtocol) -> tuple[bool, bool, bool]:
        """Take the pipe, or refuse a file that is not one as asyncio does; (fifo, socket, chr)."""
        self._extra["pipe"] = pipe
        kind = _pipe_kind(pipe.fileno())
        if not any(kind):
            raise ValueError(self._refusal)
        self._loop = loop
        self._pipe = pipe
        self._fileno: int = pipe.fileno()
        self._protocol: Any = protocol
        self._closing = False
        base = contextvars.copy_context()
        #: the fd callbacks' context; connection_made gets a copy of its own, as asyncio has it
        self._context = base.copy()
        self._made_context = base.copy()
        os.set_blocking(self._fileno, False)
        loop._transports[self._fileno] = self
        return kind

    def _connect(self, waiter: asyncio.Future[Any] | None, watch: Callable[[], None] | None) -> None:
        """connection_made first; then the fd's watch and the waiter's wakeup."""
        self._loop.call_soon(self._protocol.connection_made, self, context=self._made_context)
        if watch is not None:
            EventLoop.call_soon(self._loop, watch)
        if waiter is not None:
            EventLoop.call_soon(self._loop, asyncio.futures._set_result_unless_cancelled, waiter, None)

    def _watched(self) -> bool:
        raise NotImplementedError

    def __repr__(self) -> str:
        info = [type(self).__name__]
        if self._pipe is None:
            info.append("closed")
        elif self._closing:
            info.append("closing")
        info.append(f"fd={self._fileno}")
        loop = self._loop
        if self._pipe is None:
            info.append("closed")
        elif loop is None or loop.is_closed():
            info.append("open")
        else:
            info.append("polling" if self._watched() else "idle")
            if isinstance(self, WritePipeTransport):
                info.append(f"bufsize={self.get_write_buffer_size()}")
        return f"<{' '.join(info)}>"

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if self._pipe is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._pipe.close()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> Any:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def _watch(self, add: Callable[[Any, int, Callable[[], Any]], None], callback: Callable[[], Any]) -> bool:
        """Watch the fd on the core's fast path; a backend at its capacity ends the transport."""
        try:
            add(self._loop, self._fileno, callback)
        except CapacityError as exc:
            self._fatal_error(capacity_oserror(exc), "Fatal error: the loop cannot watch the pipe")
            return False
        return True

    def _orphaned(self) -> bool:
        """Whether the loop closed under the transport: its pipe is closed at once then, as no
        callback can run any more (a subprocess transport collected after its loop closes it)."""
        loop = self._loop
        if loop is None or not loop.is_closed():
            return False
        self._closing = True
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None
        return True

    def _report(self, exc: BaseException, message: str) -> None:
        self._loop.call_exception_handler(
            {"message": message, "exception": exc, "transport": self, "protocol": self._protocol}
        )

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        if self._pipe is None:
            return
        try:
            self._protocol.connection_lost(exc)
        finally:
            if self._loop._transports.get(self._fileno) is self:
                del self._loop._transports[self._fileno]
            self._pipe.close()
            self._pipe = None
            self._protocol = None
            self._loop = None


class ReadPipeTransport(_PipeTransport, PausableReading, asyncio.ReadTransport):
    """The read end of a pipe (or a socket, or a pty's master) and its protocol."""

    _direction = "Read"
    _refusal = "Pipe transport is for pipes/sockets only."

    max_size = 256 * 1024  # what one read() asks for, as the standard loop

    def __init__(
        self,
        loop: Any,
        pipe: Any,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(extra)
        self._attach(loop, pipe, protocol)
        self._paused = False
        self._reading = False
        self._reader = functools.partial(self._context.run, self._read_ready)
        self._connect(waiter, self._start_reading)

    def _watched(self) -> bool:
        return self._reading

    def _start_reading(self) -> None:
        if not self._reading and self.is_reading():
            self._reading = self._watch(EventLoop.add_reader, self._reader)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            EventLoop.remove_reader(self._loop, self._fileno)

    def _read_ready(self) -> None:
        """The fd is readable: one read(), then data_received; EOF ends the transport."""
        try:
            data = os.read(self._fileno, self.max_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal_error(exc, "Fatal read error on pipe transport")
            return
        if not data:
            if self._loop.get_debug():
                logger.info("%r was closed by peer", self)
            self._closing = True
            self._stop_reading()
            self._loop.call_soon(self._protocol.eof_received)
            self._loop.call_soon(self._call_connection_lost, None)
            return
        try:
            self._protocol.data_received(data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            # The standard loop's handle reports it and the pipe stays open.
            self._report(exc, "Exception in protocol.data_received() of a pipe transport")

    def close(self) -> None:
        if not self._orphaned() and not self._closing:
            self._close(None)

    def _fatal_error(self, exc: BaseException, message: str = "Fatal error on pipe transport") -> None:
        """EIO (a pty whose other side is gone) is the pipe's end, logged in debug mode only."""
        if isinstance(exc, OSError) and exc.errno == errno.EIO:
            if self._loop.get_debug():
                logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._report(exc, message)
        self._close(exc)

    def _close(self, exc: BaseException | None) -> None:
        self._closing = True
        self._stop_reading()
        self._loop.call_soon(self._call_connection_lost, exc)


class WritePipeTransport(_PipeTransport, transports._FlowControlMixin):
    """The write end of a pipe (or a socket, or a pty), its protocol and its write buffer; the
    write limits and pause_writing/resume_writing are asyncio's own (``_FlowControlMixin``)."""

    _direction = "Write"
    _refusal = "Pipe transport is only for pipes, sockets and character devices"

    def __init__(
        self,
        loop: Any,
        pipe: Any,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(extra, loop)
        is_fifo, is_socket, _ = self._attach(loop, pipe, protocol)
        self._buffer = bytearray()
        self._conn_lost = 0
        self._writing = False
        self._watching_peer = False
        self._writer = functools.partial(self._context.run, self._write_ready)
        # The reader's end closing makes a pipe's or a socket's write end readable: watch for it
        # (AIX tells it for sockets only).
        peer_watch = is_socket or (is_fifo and not sys.platform.startswith("aix"))
        self._connect(waiter, self._watch_peer if peer_watch else None)

    def _watched(self) -> bool:
        return self._writing

    def _watch_peer(self) -> None:
        if self._pipe is not None and not self._closing:
            callback = functools.partial(self._context.run, self._peer_closed)
            self._watching_peer = self._watch(EventLoop.add_reader, callback)

    def _unwatch_peer(self) -> None:
        if self._watching_peer:
            self._watching_peer = False
            EventLoop.remove_reader(self._loop, self._fileno)

    def _peer_closed(self) -> None:
        """The reader's end is closed: bytes still buffered are lost, a broken pipe."""
        if self._loop.get_debug():
            logger.info("%r was closed by peer", self)
        self._close(BrokenPipeError() if self._buffer else None)

    # -- writing ---------------------------------------------------------------------------------------

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__!r}")
        view = memoryview(data).cast("B")  # bytes, whatever the item size given
        if not view:
            return
        if self._conn_lost or self._closing:
            if self._conn_lost >= LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("pipe closed by peer or os.write(pipe, data) raised exception.")
            self._conn_lost += 1
            return
        if not self._buffer:
            try:
                sent = os.write(self._fileno, view)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._conn_lost += 1
                self._fatal_error(exc, "Fatal write error on pipe transport")
                return
            if sent == len(view):
                return
            self._writing = self._watch(EventLoop.add_writer, self._writer)
            if not self._writing:
                self._conn_lost += 1
                return
            view = view[sent:]
        self._buffer += view
        self._maybe_pause_protocol()

    def _write_ready(self) -> None:
        """The fd is writable: write what the buffer holds; a close waiting for it ends now."""
        try:
            sent = os.write(self._fileno, self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._buffer.clear()
            self._conn_lost += 1
            self._stop_writing()
            self._fatal_error(exc, "Fatal write error on pipe transport")
            return
        del self._buffer[:sent]
        if self._buffer:
            return
        self._stop_writing()
        self._maybe_resume_protocol()  # may write more
        if self._closing and not self._buffer:
            self._unwatch_peer()
            self._call_connection_lost(None)

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            EventLoop.remove_writer(self._loop, self._fileno)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """No more writes: the pipe closes once the buffer is flushed."""
        if self._closing:
            return
        self._closing = True
        if not self._buffer:
            self._unwatch_peer()
            self._loop.call_soon(self._call_connection_lost, None)

    def close(self) -> None:
        if not self._orphaned() and self._pipe is not None and not self._closing:
            self.write_eof()

    def abort(self) -> None:
        if not self._orphaned():
            self._close(None)

    # -- the end -----------------------------------------------------------------------------------------

    def _fatal_error(self, exc: BaseException, message: str = "Fatal error on pipe transport") -> None:
        """An OSError (EPIPE: the reader is gone) is the pipe's fate, logged in debug mode only."""
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._report(exc, message)
        self._close(exc)

    def _close(self, exc: BaseException | None) -> None:
        if self._pipe is None:
            return
        self._closing = True
        self._buffer.clear()
        self._stop_writing()
        self._unwatch_peer()
        self._loop.call_soon(self._call_connection_lost, exc)


class PipeCalls:
    """The loop's pipe methods (a mixin of ``AsyncioLoop``)."""

    async def connect_read_pipe(self, protocol_factory: Callable[[], asyncio.BaseProtocol], pipe: Any) -> Any:
        """A transport reading ``pipe`` (a pipe, a socket or a pty) into the factory's protocol."""
        return await self._connect_pipe(ReadPipeTransport, protocol_factory, pipe)

    async def connect_write_pipe(self, protocol_factory: Callable[[], asyncio.BaseProtocol], pipe: Any) -> Any:
        """A transport writing to ``pipe`` (a pipe, a socket or a pty) for the factory's protocol."""
        return await self._connect_pipe(WritePipeTransport, protocol_factory, pipe)

    async def _connect_pipe(
        self: Any,
        kind: type[ReadPipeTransport | WritePipeTransport],
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        pipe: Any,
    ) -> tuple[Any, asyncio.BaseProtocol]:
        refuse_on_windows("pipes")
        self._check_closed()
        protocol = protocol_factory()
        waiter = self.create_future()
        transport: Any = kind(self, pipe, protocol, waiter)
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        if self._debug:
            logger.debug("%s pipe %r connected: (%r, %r)", kind._direction, pipe.fileno(), transport, protocol)
        return transport, protocol
