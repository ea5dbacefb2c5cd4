"""The stream transport asyncio code gets from pollserve's loop: TCP and UNIX sockets.

An ``asyncio.Transport`` with what the standard loop's socket transport does on the running Python
(write buffer and its limits, flow control both ways, write_eof, close after the flush, abort,
``BufferedProtocol``, errors to the exception handler), over the core's fast path: its fd is watched
with ``EventLoop.add_reader(loop, fd, callback)``, no asyncio handle per event.  The callback is
``context.run`` bound to the read method, so the protocol's read callbacks run in the context
captured for the connection and a read costs one read and one call into the protocol.

Interpreted on purpose: compiled, ``BaseTransport._extra`` lands on mypyc's vtable slot, and no
compiled class can share a layout with it.  So the per-request paths, the read into
``data_received`` and a write with nothing buffered, are those of a compiled ``StreamCore``
(``streamcore.py``) that each transport keeps, and the transport's attributes they share are
properties over the core's.

Contexts, as the standard loop has them: the read callbacks (``data_received``, ``eof_received``,
``get_buffer``, ``buffer_updated``) run in one copy of the connection's context and
``connection_made`` in another, so a variable set in ``connection_made`` is not seen in
``data_received``; ``connection_lost`` runs in the context of whatever closed the transport.

pollserve's options, on a server given them (``limits.py``): each transfer stores the loop's clock
reading in ``_last_active`` for the idle sweep (one store, for every transport: the sweep is the
server's); ``_linger_timeout`` makes ``close()`` linger after the flush; the sweep's ``_reset()``
closes with a reset when bytes are undelivered.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import errno
import functools
import itertools
import logging
import os
import socket
import struct
import sys
import warnings
from asyncio import constants, trsock
from collections.abc import Callable, Iterable
from typing import Any

from ..backends import CapacityError
from ..loop import EventLoop
from .reading import PausableReading
from .streamcore import FD_IO, StreamCore

logger = logging.getLogger("asyncio")

#: how many buffers one sendmsg() takes (the standard loop's SC_IOV_MAX)
try:
    IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
except (AttributeError, OSError, ValueError):
    IOV_MAX = 16
HAS_SENDMSG = hasattr(socket.socket, "sendmsg")

#: the write-buffer limits the standard loop starts with
DEFAULT_HIGH_WATER = 64 * 1024

#: writes after the connection was lost are logged from this many on (asyncio's constant)
LOG_THRESHOLD_FOR_CONNLOST_WRITES = 5

#: SO_LINGER on with a zero timeout: close() then resets (pollserve/server.py says why)
RESET_ON_CLOSE = struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0)


def capacity_oserror(exc: CapacityError) -> OSError:
    """A backend at its capacity, as asyncio code gets it: an ``OSError`` naming the limit and the
    better backend (the backend's own message says both)."""
    return OSError(errno.EMFILE, f"{exc}: a backend without that limit (poll, epoll, kqueue) has none")


def set_nodelay(sock: socket.socket) -> None:
    """TCP_NODELAY on a TCP socket, as the standard loop sets it (its own test of the socket)."""
    if (
        hasattr(socket, "TCP_NODELAY")
        and sock.family in (socket.AF_INET, socket.AF_INET6)
        and sock.type == socket.SOCK_STREAM
        and sock.proto == socket.IPPROTO_TCP
    ):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def on_core(name: str) -> Any:
    """An attribute kept on the transport's compiled ``StreamCore`` (``streamcore.py``)."""

    def get(self: StreamTransport) -> Any:
        return getattr(self._core, name)

    def set(self: StreamTransport, value: Any) -> None:
        setattr(self._core, name, value)

    return property(get, set, doc=f"the core's {name}")


class StreamTransport(PausableReading, asyncio.Transport):
    """One connected stream socket, its protocol and its write buffer; the per-request paths are
    its ``StreamCore``'s (``streamcore.py``)."""

    _protocol = on_core("protocol")
    _conn_lost = on_core("conn_lost")  # set once connection_lost is scheduled, then counts writes after it
    _eof = on_core("eof")  # write_eof()
    _closing = on_core("closing")
    _empty_waiter = on_core("empty_waiter")
    _last_active = on_core("last_active")  # the loop's clock at the last transfer (the idle sweep's)

    def _describe_handler(self, handler: object) -> str:
        """How a slow callback is named (the core's describe_callback): the protocol, as its author
        wrote it, and the peer, never the transport's own method (under TLS, the user's protocol)."""
        protocol = type(getattr(self._protocol, "_app_protocol", self._protocol))
        name = f"{protocol.__module__}:{protocol.__qualname__}"
        peer = self._extra.get("peername")
        if getattr(handler, "__name__", "") == "_write_ready":
            return f"sending {name}'s buffered data to {peer}"
        return f"{name}.data_received on {peer}"

    max_size = 256 * 1024  # the most one read asks for, as the standard loop
    _sendfile_compatible = constants._SendfileMode.TRY_NATIVE  # loop.sendfile() may use os.sendfile()
    _start_tls_compatible = True  # loop.start_tls() may put TLS over it (tls.py)

    _sock: socket.socket | None = None  # set before anything can fail: __del__ reads it
    #: seconds close() lingers after the flush (linger_timeout); None: it closes as asyncio's does
    _linger_timeout: float | None = None
    #: the linger's timer while lingering
    _linger_timer: asyncio.TimerHandle | None = None

    def __init__(
        self,
        loop: Any,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
        server: Any = None,
        context: contextvars.Context | None = None,
        watch_now: bool = False,
    ) -> None:
        """``watch_now``: register the fd for reading at once, so that a backend at its capacity
        raises ``CapacityError`` here (the accept path: connection_made is queued before the next
        poll, so no read can come first); else reading starts after connection_made."""
        super().__init__(extra)
        set_nodelay(sock)
        self._loop = loop
        self._sock_fd = sock.fileno()
        base = context if context is not None else contextvars.copy_context()
        #: the read callbacks' context, and the callbacks the core calls for this fd
        self._context = base.copy()
        self._reader: Callable[[], Any] | None = None
        self._reading = False  # the core watches the fd for reading
        self._buffer: collections.deque[Any] = collections.deque()
        self._counts = loop.counts
        self._core = StreamCore(self, loop, sock, self._counts, self._buffer, self.max_size)
        if type(self).write is StreamTransport.write:
            # The protocol's write() calls the compiled path straight, without a frame of ours.
            self.write = self._core.write  # type: ignore[method-assign]
        if type(self).is_closing is StreamTransport.is_closing:
            self.is_closing = self._core.is_closing  # type: ignore[method-assign]
        self._protocol_connected = False
        self.set_protocol(protocol)
        if watch_now:
            EventLoop.add_reader(loop, self._sock_fd, self._reader)  # type: ignore[arg-type]
            self._reading = True
        self._extra["socket"] = trsock.TransportSocket(sock)
        try:
            self._extra["sockname"] = sock.getsockname()
        except OSError:
            self._extra["sockname"] = None
        if "peername" not in self._extra:
            try:
                self._extra["peername"] = sock.getpeername()
            except OSError:
                self._extra["peername"] = None
        self._sock = sock
        self._writer: Callable[[], Any] | None = functools.partial(self._context.run, self._write_ready)
        self._server = server
        self._buffer_size = 0
        self._paused = False  # pause_reading()
        self._eof_received = False
        self._high_water = DEFAULT_HIGH_WATER
        self._low_water = DEFAULT_HIGH_WATER // 4
        self._protocol_paused = False
        self._counts.connections_open += 1
        if server is not None:
            server._attach(self)
        loop._transports[self._sock_fd] = self
        loop.call_soon(self._protocol.connection_made, self, context=base.copy())
        if not watch_now:
            # Reading starts once connection_made has run, as the standard loop has it.
            EventLoop.call_soon(loop, self._start_reading)
        if waiter is not None:
            EventLoop.call_soon(loop, asyncio.futures._set_result_unless_cancelled, waiter, None)

    def __repr__(self) -> str:
        info = [type(self).__name__]
        if self._sock is None:
            info.append("closed")
        elif self._closing:
            info.append("closing")
        info.append(f"fd={self._sock_fd}")
        loop = self._loop
        if loop is not None and not loop.is_closed():
            info.append("read=polling" if loop._readers.get(self._sock_fd) is not None else "read=idle")
            state = "polling" if loop._writers.get(self._sock_fd) is not None else "idle"
            info.append(f"write=<{state}, bufsize={self._buffer_size}>")
        return f"<{' '.join(info)}>"

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if self._sock is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._sock.close()

    # -- the protocol --------------------------------------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """A ``BufferedProtocol`` is read into its own buffer; any other gets ``data_received``."""
        read = self._read_into_buffer if isinstance(protocol, asyncio.BufferedProtocol) else self._core.read_data
        self._protocol = protocol
        self._protocol_connected = True
        self._reader = functools.partial(self._context.run, read)
        if self._reading:
            EventLoop.add_reader(self._loop, self._sock_fd, self._reader)

    def get_protocol(self) -> Any:
        return self._protocol

    # -- reading ---------------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def _start_reading(self) -> None:
        """Watch the fd, unless paused, closing or past EOF (a resume after EOF reads nothing more)."""
        if self._reading or self._paused or self._closing or self._eof_received or self._conn_lost:
            return
        try:
            EventLoop.add_reader(self._loop, self._sock_fd, self._reader)  # type: ignore[arg-type]
        except CapacityError as exc:
            self._fatal_error(capacity_oserror(exc), "Fatal error: the loop cannot watch the socket")
            return
        self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            EventLoop.remove_reader(self._loop, self._sock_fd)

    def _read_into_buffer(self) -> None:
        """The fd is readable, for a ``BufferedProtocol``: recv_into the buffer it gives."""
        if self._conn_lost:
            return
        try:
            buf = self._protocol.get_buffer(-1)
            if not len(buf):
                raise RuntimeError("get_buffer() returned an empty buffer")
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.get_buffer() call failed.")
            return
        try:
            nbytes = self._sock.recv_into(buf)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on socket transport")
            return
        self._last_active = self._loop.now
        if not nbytes:
            self._read_eof()
            return
        self._counts.bytes_in += nbytes
        try:
            self._protocol.buffer_updated(nbytes)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")

    def _read_eof(self) -> None:
        if self._loop.get_debug():
            logger.debug("%r received EOF", self)
        self._eof_received = True
        self._stop_reading()
        try:
            keep_open = self._protocol.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if not keep_open:
            self.close()

    # -- writing ---------------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send what the kernel takes now, buffer the rest (its send once writable).  An instance's
        write is its core's, which comes here for anything but bytes with nothing buffered."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__!r}")
        if self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._empty_waiter is not None:
            raise RuntimeError("unable to write; sendfile is in progress")
        if not data:
            return
        if self._conn_lost:
            if self._conn_lost >= LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("socket.send() raised exception.")
            self._conn_lost += 1
            return
        if not self._buffer:
            try:
                sent = os.write(self._sock_fd, data) if FD_IO else self._sock.send(data)  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                sent = 0
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal write error on socket transport")
                return
            self._counts.bytes_out += sent
            self._last_active = self._loop.now
            if type(data) is bytes and sent == len(data):
                return
            self._buffer_rest(data, sent)
        else:
            self._buffer_append(memoryview(data).cast("B"), data)
            self._maybe_pause_protocol()

    #: the class's own write, for the core's write to come back to (an instance's write is the core's)
    _write_any = write

    def _buffer_rest(self, data: bytes | bytearray | memoryview, sent: int) -> None:
        """What a send from an empty buffer left: buffered, and the fd watched for writability."""
        view = memoryview(data).cast("B")  # bytes, whatever the item size and shape given
        if sent == view.nbytes:
            return
        try:
            EventLoop.add_writer(self._loop, self._sock_fd, self._writer)  # type: ignore[arg-type]
        except CapacityError as exc:
            self._fatal_error(capacity_oserror(exc), "Fatal error: the loop cannot watch the socket")
            return
        self._buffer_append(view[sent:], data)
        self._maybe_pause_protocol()

    def _buffer_append(self, view: memoryview, data: Any) -> None:
        """Keep what is left to send: bytes by reference, a mutable buffer as a copy of it now."""
        chunk = view if type(data) is bytes else view.tobytes()
        self._buffer.append(chunk)
        self._buffer_size += len(chunk)
        self._counts.write_buffer_bytes += len(chunk)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        """Every chunk into the buffer, then one sendmsg() for them all when it was empty."""
        if self._eof:
            raise RuntimeError("Cannot call writelines() after write_eof()")
        if self._empty_waiter is not None:
            raise RuntimeError("unable to writelines; sendfile is in progress")
        if self._conn_lost:
            for data in list_of_data:
                self.write(data)
            return
        was_empty = not self._buffer
        for data in list_of_data:
            view = memoryview(data).cast("B")
            if view:
                self._buffer_append(view, data)
        if was_empty and self._buffer:
            self._write_ready()
            if self._buffer:
                try:
                    EventLoop.add_writer(self._loop, self._sock_fd, self._writer)  # type: ignore[arg-type]
                except CapacityError as exc:
                    self._fatal_error(capacity_oserror(exc), "Fatal error: the loop cannot watch the socket")
                    return
        self._maybe_pause_protocol()

    def _write_ready(self) -> None:
        """The fd is writable: send what the buffer holds, several chunks per sendmsg()."""
        if self._conn_lost or not self._buffer:
            return
        try:
            if HAS_SENDMSG and len(self._buffer) > 1:
                sent = self._sock.sendmsg(itertools.islice(self._buffer, IOV_MAX))  # type: ignore[union-attr]
            else:
                sent = self._sock.send(self._buffer[0])  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._stop_writing()
            self._fatal_error(exc, "Fatal write error on socket transport")
            if self._empty_waiter is not None:
                self._empty_waiter.set_exception(exc)
            return
        self._counts.bytes_out += sent
        self._last_active = self._loop.now
        self._consume(sent)
        self._maybe_resume_protocol()  # may write more
        if not self._buffer:
            EventLoop.remove_writer(self._loop, self._sock_fd)
            if self._empty_waiter is not None:
                self._empty_waiter.set_result(None)
            if self._closing:
                if self._linger_timeout is None:
                    self._call_connection_lost(None)
                else:
                    self._conn_lost += 1
                    self._linger()
            elif self._eof:
                self._sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]

    def _consume(self, sent: int) -> None:
        """Take ``sent`` bytes off the front of the buffer."""
        buffer = self._buffer
        self._buffer_size -= sent
        self._counts.write_buffer_bytes -= sent
        while sent:
            chunk = buffer.popleft()
            if len(chunk) > sent:
                buffer.appendleft(memoryview(chunk)[sent:])
                break
            sent -= len(chunk)

    def _stop_writing(self) -> None:
        """Drop what the buffer holds and stop watching for writability."""
        if self._buffer:
            self._buffer.clear()
            self._counts.write_buffer_bytes -= self._buffer_size
            self._buffer_size = 0
            EventLoop.remove_writer(self._loop, self._sock_fd)

    def write_eof(self) -> None:
        if self._closing or self._eof:
            return
        self._eof = True
        if not self._buffer:
            self._sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]

    def can_write_eof(self) -> bool:
        return True

    # -- write flow control ----------------------------------------------------------------------------

    def get_write_buffer_size(self) -> int:
        return self._buffer_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low_water, self._high_water)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water = high
        self._low_water = low
        self._maybe_pause_protocol()

    def _maybe_pause_protocol(self) -> None:
        if self._buffer_size > self._high_water and not self._protocol_paused:
            self._protocol_paused = True
            self._tell_protocol("pause_writing")

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self._buffer_size <= self._low_water:
            self._protocol_paused = False
            self._tell_protocol("resume_writing")

    def _tell_protocol(self, method: str) -> None:
        """Flow control's call of the protocol; its error goes to the exception handler."""
        try:
            getattr(self._protocol, method)()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            message = f"protocol.{method}() failed"
            self._loop.call_exception_handler(
                {"message": message, "exception": exc, "transport": self, "protocol": self._protocol}
            )

    # -- closing ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop reading now; connection_lost once the buffer is flushed (soon, if it is empty), or
        with a linger_timeout, once the linger after the flush is over."""
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if not self._buffer:
            self._conn_lost += 1
            if self._linger_timeout is None:
                self._loop.call_soon(self._call_connection_lost, None)
            else:
                self._linger()

    def _linger(self) -> None:
        """The lingering close: shut the write side, then read and drop until the client's EOF or
        the linger_timeout.  Closing with bytes unread, or receiving some after the close, makes
        the kernel reset the connection, and the reset can destroy the reply the client has not
        read yet.  A client whose EOF was read has nothing in flight: close now."""
        loop = self._loop
        if self._eof_received:
            loop.call_soon(self._call_connection_lost, None)
            return
        context = contextvars.copy_context()  # connection_lost's, as if it came now
        try:
            self._sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
            EventLoop.add_reader(loop, self._sock_fd, functools.partial(context.run, self._linger_read))
        except (OSError, CapacityError):  # the client is gone already; or (select) it cannot be watched
            loop.call_soon(self._call_connection_lost, None)
            return
        self._linger_timer = loop.call_later(self._linger_timeout, self._end_linger, None, context=context)

    def _linger_read(self) -> None:
        try:
            data = self._sock.recv(self.max_size)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._end_linger(exc)
            return
        if data:
            self._counts.bytes_in += len(data)  # received, though no longer for the protocol
        else:
            self._end_linger(None)

    def _end_linger(self, exc: BaseException | None) -> None:
        """The client's EOF, its reset, the timeout or abort(): the real close, soon."""
        timer, self._linger_timer = self._linger_timer, None
        if timer is None:
            return
        timer.cancel()
        EventLoop.remove_reader(self._loop, self._sock_fd)
        self._loop.call_soon(self._call_connection_lost, exc)

    def abort(self) -> None:
        """Close now, dropping the buffer (and ending a linger)."""
        if self._linger_timer is not None:
            self._end_linger(None)
            return
        self._force_close(None)

    def _reset(self) -> None:
        """Close now with a reset (SO_LINGER 0): the idle sweep's end for a connection with bytes
        undelivered, so that the client cannot take a truncated reply for a whole one."""
        with contextlib.suppress(OSError):  # the client reset it first, say: the close is what it is
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)  # type: ignore[union-attr]
        self._force_close(None)

    def _fatal_error(self, exc: BaseException, message: str = "Fatal error on transport") -> None:
        """An OSError is the connection's fate (logged in debug mode); anything else is a bug the
        exception handler hears of.  Either way the transport closes at once."""
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._loop.call_exception_handler(
                {"message": message, "exception": exc, "transport": self, "protocol": self._protocol}
            )
        self._force_close(exc)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._conn_lost:
            return
        self._stop_writing()
        if not self._closing:
            self._closing = True
            self._stop_reading()
        self._conn_lost += 1
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        if self._sock is None:
            return  # already done (a flush and a forced close can both get here)
        try:
            if self._protocol_connected:
                self._protocol.connection_lost(exc)
        finally:
            self._conn_lost = max(self._conn_lost, 1)  # later writes are dropped, not sent
            loop = self._loop
            other_writer = None
            if not loop.is_closed():
                self._stop_reading()
                other_writer = loop._writers.get(self._sock_fd)
                EventLoop.remove_writer(loop, self._sock_fd)
            self._sock.close()
            if other_writer is not None and other_writer is not self._writer:
                EventLoop.call_soon(loop, other_writer)  # sendfile's wait ends, and meets the close
            self._sock = None
            self._protocol = None
            self._reader = self._writer = None
            # No cycle left through the core: write() is the class's again, which drops the bytes.
            vars(self).pop("write", None)
            self._core.transport = None
            self._counts.connections_open -= 1
            self._counts.connections_closed += 1
            if self._empty_waiter is not None and not self._empty_waiter.done():
                self._empty_waiter.set_exception(ConnectionError("Connection is closed by peer"))
            server, self._server = self._server, None
            if server is not None:
                server._detach(self)

    # -- sendfile's hooks --------------------------------------------------------------------------------

    def _make_empty_waiter(self) -> asyncio.Future[Any]:
        """A future done once the buffer is empty; write() is refused until it is reset."""
        if self._empty_waiter is not None:
            raise RuntimeError("Empty waiter is already set")
        self._empty_waiter = self._loop.create_future()
        if not self._buffer:
            self._empty_waiter.set_result(None)
        return self._empty_waiter

    def _reset_empty_waiter(self) -> None:
        self._empty_waiter = None
