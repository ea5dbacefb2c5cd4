"""Listening sockets, the accept handler, and Connection (the transport).

The send path: ``write()`` calls ``send()`` at once; what the kernel did not
take goes into a bytearray, and WRITE interest is registered only while that
buffer is non-empty.  Past ``high_water`` buffered bytes the connection stops
reading from its client (and tells the protocol), so a client that never reads
cannot make the server buffer without bound; below ``low_water`` it resumes.

The close path is staged (RFC 9112, section 9.6): flush the buffer, shut the
write side, then read and drop until the client's EOF or ``linger_timeout``.
Closing a socket with unread bytes, or one that receives bytes after close(),
makes the kernel answer with RST, and the RST can destroy replies that send()
had already accepted (nginx's ``lingering_close`` exists for this).

When the server itself gives up on a connection (the idle timeout, a flush or a delivery that makes
no progress, the shutdown timeout) with bytes the client has not received, in its own buffer or in
the kernel's send queue, it resets the connection instead (SO_LINGER 0, as nginx's
``reset_timedout_connection``): a FIN would let the client take a truncated reply for a whole one.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from mypy_extensions import mypyc_attr

from . import arguments
from .apps import Protocol, ProtocolFactory
from .backends import CapacityError
from .listeners import bind_tcp, format_address
from .loop import EventLoop, Handle
from .rates import EpisodeLog, RateLimit
from .sendqueue import unsent_bytes
from .transport_socket import TransportSocket

log = logging.getLogger("pollserve")

# On POSIX a socket is a file descriptor, and os.read/os.write reach the same recv()/send()
# in the kernel (flags 0) for about 1,000 fewer instructions per request than the socket
# methods: no argument tuple to build and parse, no method to look up.  SIGPIPE is ignored by
# the interpreter, so a write to a closed peer raises EPIPE either way.  Windows sockets are not
# C runtime descriptors: there the socket methods are used.
# Final: compiled, each is a C static rather than a lookup in the module's dict per call.
_FD_IO: Final = sys.platform != "win32"
_read: Final = os.read
_write: Final = os.write

#: the most bytes asked of one recv(); one recv per readiness event
MAX_READ: Final = 65536
#: the fewest: a connection starts here, and comes back after large reads end (_on_readable).
#: A bytes object of up to 512 bytes (33 of them its header) comes from the interpreter's own
#: allocator (pymalloc); a larger one from malloc, which costs several times more.
MIN_READ: Final = 512 - 33

#: SO_LINGER on, with a zero timeout: close() then sends RST and drops what the send queue holds,
#: instead of sending it and a FIN [socket(7) SO_LINGER; RFC 9293 3.10.4 ABORT].  Windows' struct
#: linger is two u_shorts, elsewhere two ints.
_RESET_ON_CLOSE: Final = struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0)

#: accept() failures that mean "out of fds or kernel memory": back off, don't spin
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
#: accept() failures about one pending client only: skip it.  Linux passes a new connection's
#: pending network error out of accept(), and accept(2) asks to "treat them like EAGAIN by
#: retrying" (ENONET is Linux's only; the others exist everywhere but are harmless to retry).
_CLIENT_GONE = {errno.ECONNABORTED, errno.EPROTO, errno.ECONNRESET, errno.EPERM} | {
    getattr(errno, name)
    for name in ("ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH")
    if hasattr(errno, name)
}


def _call_soon(loop: EventLoop, callback: Callable[..., Any], *args: Any) -> Handle:
    """The core's ``call_soon``, whichever face the loop shows: the asyncio face (an ``async def``
    app's loop, an asyncio program's stats endpoint) overrides it with asyncio's, whose handles a
    compiled caller would refuse as not the core's.  The server's own callbacks are the core's."""
    return EventLoop.call_soon(loop, callback, *args)


def _call_later(loop: EventLoop, delay: float, callback: Callable[..., Any]) -> Handle:
    """The core's timer, ``delay`` seconds on its monotonic clock (as the core's ``call_later``,
    which asks ``call_at`` of the face), whichever face the loop shows."""
    return EventLoop.call_at(loop, time.monotonic() + delay, callback)


def _byte_view(data: Any) -> bytes | bytearray | memoryview:
    """data as something whose len() counts bytes, as send() does.

    A memoryview or array of wider items counts items: ``array("I")`` of n items
    is 4n bytes, so comparing send()'s count with len() would truncate it.
    """
    if isinstance(data, (bytes, bytearray)):
        return data
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"write() takes bytes-like data, not {type(data).__name__}") from None
    if not view.c_contiguous:
        return view.tobytes()  # send() takes contiguous buffers only
    if view.ndim == 1 and view.itemsize == 1:
        return view
    return view.cast("B")


class Traffic:
    """A server's running byte totals, which every connection of it updates.

    Slots rather than attributes of the Server: a counter in an instance dict cost
    ~900 instructions per request of the hot path (measured with callgrind)."""

    __slots__ = ("bytes_in", "bytes_out", "write_buffer_bytes")

    def __init__(self) -> None:
        #: received from and sent to the clients
        self.bytes_in = 0
        self.bytes_out = 0
        #: waiting in the connections' write buffers, all together
        self.write_buffer_bytes = 0


class Connection:
    """One client connection: the transport handed to the protocol."""

    __slots__ = (
        "_server",
        "_traffic",
        "_loop",
        "_sock",
        "_fd",
        "_protocol",
        "_peername",
        "_buffer",
        "_closing",
        "_eof",
        "_write_eof",
        "_write_shut",
        "_no_more_writes",
        "_lost",
        "_paused_by_user",
        "_paused_by_backpressure",
        "_linger_timer",
        "_held",
        "_last_active",
        "_unsent",
        "_unsent_at",
        "_read_size",
        "_read_ask",
        "high_water",
        "low_water",
    )

    def __init__(self, server: Server, sock: socket.socket, peername: Any, protocol: Protocol) -> None:
        self._server = server
        self._traffic = server.traffic
        self._loop = server.loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._peername = peername
        self._buffer = bytearray()
        self._closing = False
        #: the client's EOF was read: nothing more will arrive
        self._eof = False
        #: write_eof() was asked for; _write_shut: the FIN was sent (shutdown(SHUT_WR) done)
        self._write_eof = False
        self._write_shut = False
        #: closing, write_eof() or lost: write() ignores data (one flag for the hot path)
        self._no_more_writes = False
        self._lost = False
        self._paused_by_user = False
        self._paused_by_backpressure = False
        self._linger_timer: Handle | None = None
        #: bytes a layer read ahead of the protocol it stepped aside for, not yet delivered (_unread)
        self._held: bytes | None = None
        #: the loop's clock when bytes last moved either way (the idle sweep reads it)
        self._last_active = self._loop.now
        #: the kernel's send queue when the idle sweep last looked, and when (_kernel_progress)
        self._unsent = 0
        self._unsent_at = -1.0
        self._read_size = MIN_READ
        #: the same, as the object os.read() is given: boxed when it changes, not at every read (a
        #: size over 256 is no cached small int, and boxing one allocates)
        self._read_ask: Any = MIN_READ
        self.high_water = server.high_water
        self.low_water = server.low_water

    def __repr__(self) -> str:
        state = "lost" if self._lost else "closing" if self._closing else "open"
        return f"<Connection fd={self._fd} peer={format_address(self._peername)} {state}>"

    def _describe_handler(self, handler: object) -> str:
        """How a slow-callback warning names this connection's handler: the app's protocol, as
        its author wrote it, and the client."""
        protocol = type(self._protocol)
        name = f"{protocol.__module__}:{protocol.__qualname__}"
        if getattr(handler, "__name__", "") == "_on_writable":
            return f"sending {name}'s buffered data to {format_address(self._peername)}"
        return f"{name}.data_received on {format_address(self._peername)}"

    # -- reading -------------------------------------------------------------

    def _on_readable(self) -> None:
        # The size asked adapts, as Netty's AdaptiveRecvByteBufAllocator does: os.read() allocates
        # the whole size asked and shrinks it to what arrived, and at 64 KiB that was a fifth of a
        # small request's cost (glibc's malloc, realloc and free; callgrind).  A read that filled
        # the size asks 8x more next time; one that used an eighth of it, 8x less.
        size = self._read_size
        try:
            data = _read(self._fd, self._read_ask) if _FD_IO else self._sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # ECONNRESET, ETIMEDOUT, ...
            self._finish(exc)
            return
        got = len(data)
        if got == size:
            if size < MAX_READ:
                self._read_size = self._read_ask = min(size * 8, MAX_READ)
        elif got <= size >> 3 and size > MIN_READ:
            self._read_size = self._read_ask = max(size >> 3, MIN_READ)
        if got:
            self._traffic.bytes_in += got
            self._last_active = self._loop.now
            try:
                self._protocol.data_received(data)
            except Exception as exc:
                self._protocol_failed("data_received", exc)
        else:
            self._on_eof()

    def _on_eof(self) -> None:
        # Level-triggered: EOF stays readable, so stop asking -- for good: a socket
        # at EOF reports EOF again, so the reader must not come back on resume.
        self._eof = True
        self._loop.remove_reader(self._fd)
        try:
            keep_open = self._protocol.eof_received()
        except Exception as exc:
            self._protocol_failed("eof_received", exc)
            return
        if not keep_open:
            self.close()
        elif self._write_shut:
            self._finish(None)  # both directions are shut: nothing is left to do

    def _protocol_failed(self, method: str, exc: Exception) -> None:
        log.error("app error in %s for %s; closing it", method, format_address(self._peername), exc_info=exc)
        self._finish(exc)

    def pause_reading(self) -> None:
        """Stop calling data_received until resume_reading()."""
        self._paused_by_user = True
        self._update_reading()

    def resume_reading(self) -> None:
        self._paused_by_user = False
        self._update_reading()

    def is_reading(self) -> bool:
        """Whether data_received may be called: not paused, not at EOF, not closing."""
        return not (self._closing or self._eof or self._paused_by_user or self._paused_by_backpressure)

    def _update_reading(self) -> None:
        if self._closing or self._eof:  # closing covers lost; a lingering close owns the reader
            return
        if self._paused_by_user or self._paused_by_backpressure:
            self._loop.remove_reader(self._fd)
        elif self._held is not None:
            _call_soon(self._loop, self._deliver_held)  # not from inside resume_reading(), as asyncio
        elif not self._loop.has_reader(self._fd):
            self._loop.add_reader(self._fd, self._on_readable)

    def _unread(self, data: bytes) -> None:
        """Bytes a layer read ahead of the protocol it steps aside for (pollserve.proxy: what came
        with the header): delivered now if that protocol is reading, else once it resumes, and
        before anything read after them (the socket is not read until then)."""
        if self._closing or not data:
            return
        if self.is_reading():
            self._protocol.data_received(data)
        else:
            self._held = data
            self._loop.remove_reader(self._fd)

    def _deliver_held(self) -> None:
        data = self._held
        if data is None or not self.is_reading():  # delivered already, or paused again meanwhile
            return
        self._held = None
        self._loop.add_reader(self._fd, self._on_readable)
        try:
            self._protocol.data_received(data)
        except Exception as exc:
            self._protocol_failed("data_received", exc)

    # -- writing -------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send data now; buffer whatever the kernel does not take.  Ignored once closed."""
        if type(data) is not bytes:
            data = _byte_view(data)
        # Lengths, not truth values: compiled, len() of a bytes or bytearray is a field read,
        # and `not data` a call into the interpreter.
        size = len(data)
        if self._no_more_writes or size == 0:
            return
        buffer = self._buffer
        if len(buffer):
            buffer += data
            self._traffic.write_buffer_bytes += size
        else:
            try:
                sent = _write(self._fd, data) if _FD_IO else self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:  # EPIPE, ECONNRESET: the client is gone
                self._finish(exc)
                return
            if sent:
                self._traffic.bytes_out += sent
                self._last_active = self._loop.now
                if sent == size:
                    return
            buffer += memoryview(data)[sent:]
            self._traffic.write_buffer_bytes += size - sent
            self._loop.add_writer(self._fd, self._on_writable)
        if len(buffer) > self.high_water and not self._paused_by_backpressure:
            self._paused_by_backpressure = True
            self._update_reading()
            self._call_protocol("pause_writing")

    def _on_writable(self) -> None:
        buffer = self._buffer
        try:
            sent = _write(self._fd, buffer) if _FD_IO else self._sock.send(buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc)
            return
        self._last_active = self._loop.now
        traffic = self._traffic
        traffic.bytes_out += sent
        traffic.write_buffer_bytes -= sent
        del buffer[:sent]  # O(1) for a prefix: bytearray moves its start
        if self._paused_by_backpressure and len(buffer) <= self.low_water:
            self._paused_by_backpressure = False
            self._update_reading()
            self._call_protocol("resume_writing")
        if buffer or self._lost:
            return
        self._loop.remove_writer(self._fd)
        if self._write_eof:
            self._shutdown_write()
        if self._closing:
            self._linger()

    def _call_protocol(self, method: str) -> None:
        try:
            getattr(self._protocol, method)()
        except Exception as exc:
            self._protocol_failed(method, exc)

    def write_eof(self) -> None:
        """Send FIN once the buffer is flushed, and keep reading.

        Once the client's EOF has been read too, the connection closes itself.
        """
        if self._closing or self._write_eof or self._lost:
            return
        self._write_eof = True
        self._no_more_writes = True
        if not self._buffer:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        """Send FIN, once: write_eof() and a lingering close may both ask for it."""
        if self._write_shut:
            return
        self._write_shut = True
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._finish(exc)
            return
        if self._eof and not self._closing:
            self._finish(None)  # both directions are shut

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def set_write_buffer_limits(self, high: float | None = None, low: float | None = None) -> None:
        """Backpressure thresholds in bytes, ints or floats as asyncio takes them (defaults: the
        server's high-water mark, or four times low if only low is given; a quarter of high)."""
        high, low = arguments.water_marks(high, low, self._server.high_water, ("high", "low"))
        self.high_water, self.low_water = high, low
        if len(self._buffer) > high and not self._paused_by_backpressure and not self._lost:
            # Already over the new mark: pause now, as asyncio does, not at the next write().
            self._paused_by_backpressure = True
            self._update_reading()
            self._call_protocol("pause_writing")

    # -- closing -------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Stop reading, send what is buffered, then close, lingering while the client may still send.

        connection_lost() is called at the real close, after the linger.
        """
        if self._closing or self._lost:
            return
        self._closing = True
        self._no_more_writes = True
        self._loop.remove_reader(self._fd)
        if not self._buffer:
            self._linger()
        else:
            self._server._watch_flush()  # a client that stopped reading must not hold it forever

    def _linger(self) -> None:
        """Shut the write side, then read and drop until the client's EOF or linger_timeout.

        A client whose EOF was read has nothing more in flight: close at once.
        Otherwise it may have sent bytes we have not read, or send some before it
        sees our FIN; either would make close() send RST.  Lingering happens even
        when nothing is unread right now, because what is in flight cannot be seen.
        """
        if self._lost or self._linger_timer is not None:  # already closed, or lingering
            return
        if self._eof:
            self._finish(None)
            return
        self._shutdown_write()
        if self._lost:
            return
        self._loop.add_reader(self._fd, self._on_linger_readable)
        self._linger_timer = _call_later(self._loop, self._server.linger_timeout, self._linger_ended)

    def _linger_ended(self) -> None:
        """No EOF from the client within linger_timeout.  If the kernel still holds bytes the client
        has not acknowledged, the close is not over: closing now would leave them to an orphaned
        socket, or with a client that reads no more, to nobody.  It goes on (still reading and
        dropping) while the client makes progress, under the flush rule (_check_delivery)."""
        self._linger_timer = None
        unsent = unsent_bytes(self._fd)
        if not unsent:  # all delivered, or an OS that cannot say (sendqueue.py): close as ever
            self._finish(None)
            return
        self._unsent, self._unsent_at = unsent, self._loop.now
        self._linger_timer = _call_later(self._loop, self._server._sweep_interval(), self._check_delivery)

    def _check_delivery(self) -> None:
        """Every sweep interval after the linger: the close is over once the kernel's send queue is
        empty; the queue shrinking is progress; no progress for the server's limit, and it gives up."""
        self._linger_timer = None
        server = self._server
        now = self._loop.now
        limit = server._no_progress_limit()
        unsent = unsent_bytes(self._fd) or 0
        if unsent == 0:
            self._finish(None)
            return
        if unsent < self._unsent:
            self._last_active = now
        elif self._last_active <= now - limit:
            server._give_up(self, f"delivering, no progress for {limit:g} s")
            return
        self._unsent, self._unsent_at = unsent, now
        self._linger_timer = _call_later(self._loop, server._sweep_interval(), self._check_delivery)

    def _on_linger_readable(self) -> None:
        try:
            data = self._sock.recv(MAX_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc)
            return
        if data:
            self._traffic.bytes_in += len(data)  # received, though no longer for the app
        else:
            self._finish(None)

    def abort(self) -> None:
        """Close now, dropping whatever is buffered."""
        self._finish(None)

    def _read_pending(self) -> None:
        """One read, if the connection is reading: bytes that already arrived reach the protocol
        before a shutdown closes the connection (the read meets EAGAIN when there are none)."""
        if self.is_reading():
            self._on_readable()

    def _close_idle(self, why: str) -> bool:
        """The idle sweep gives up on a connection that made no progress for the limit.  One whose
        client has received everything gets the lingering close; one that is closing already, or
        has bytes undelivered, is closed now (_server_abort).  Returns whether it was reset."""
        if not self._closing and self._undelivered() == 0:
            self._server_close(why)
            return False
        return self._server_abort(why)

    def _undelivered(self) -> int:
        """Bytes the client has not received, as far as the server can tell: its own buffer's, and
        the kernel's send queue where the OS can say (sendqueue.py); elsewhere that part counts as
        delivered, as before, for want of a way to tell."""
        return len(self._buffer) + (unsent_bytes(self._fd) or 0)

    def _kernel_progress(self, now: float) -> bool | None:
        """Whether the client read since the sweep last looked, though no send() of ours moved a
        byte: the kernel's send queue shrank (sendqueue.py says why only the kernel can tell).
        None: this is the first look since our last transfer, so look again at the next sweep.
        False where the OS cannot say: then only our own transfers count."""
        unsent = unsent_bytes(self._fd)
        if unsent is None:
            return False
        seen, seen_at = self._unsent, self._unsent_at
        self._unsent, self._unsent_at = unsent, now
        if unsent == 0:
            return False  # nothing outstanding: idle indeed
        if seen_at < self._last_active:
            return None
        return unsent < seen

    def _finish(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._no_more_writes = True
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        # Unregister before close: epoll watches the open file description,
        # and the fd number may be reused at once (h2o pull request #1100).
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._traffic.write_buffer_bytes -= len(self._buffer)
        self._buffer.clear()
        self._sock.close()
        self._server._connection_closed(self)
        _call_soon(self._loop, self._protocol.connection_lost, exc)

    def set_protocol(self, protocol: Protocol) -> None:
        """Send later events to ``protocol``, as asyncio's transports do: a layer that has done
        its part (pollserve.proxy) steps aside, and the app is called with nothing in between."""
        self._protocol = protocol

    def get_protocol(self) -> Protocol:
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``peername``, ``sockname``, ``socket``, ``fd`` or ``loop``, as asyncio's transports offer them.

        ``socket`` is a TransportSocket: options and addresses, but no close(),
        recv() or send(), which would break the loop's hold on the fd.  ``loop``
        is the EventLoop, for a protocol that needs a timer (call_later).
        """
        if name == "peername":
            return self._peername
        if name == "sockname":
            try:
                return self._sock.getsockname()
            except OSError:
                return default
        if name == "socket":
            return TransportSocket(self._sock)
        if name == "fd":
            return self._fd
        if name == "loop":
            return self._loop
        return default

    # Closes the server decides on (the idle timeout, a shutdown): a traced connection
    # records why; an ordinary one just closes.
    def _server_close(self, why: str) -> None:
        # A layer may have its own goodbye to say first (TLS: close_notify).  Shutdown and the
        # idle sweep only: the hot path never comes here.
        goodbye = getattr(self._protocol, "server_closing", None)
        if goodbye is not None and goodbye():
            return  # the layer closes the connection itself once it has answered (TLS: a handshake)
        self.close()

    def _server_abort(self, why: str) -> bool:
        """Close now, as the server decides (the idle sweep, the shutdown timeout, Server.close):
        with bytes the client has not received, a reset, so that it cannot take a truncated reply
        for a whole one.  The app's own abort() never resets (asyncio's does not either).  Give-up
        paths only: the ioctl this costs is never paid per event.  Returns whether it reset."""
        if self._lost:
            return False
        undelivered = self._undelivered()
        if undelivered:
            self._reset_on_close(undelivered)
        self._finish(None)
        return undelivered > 0

    def _reset_on_close(self, undelivered: int) -> None:
        """SO_LINGER 0, so that the close() to come resets the connection."""
        with contextlib.suppress(OSError):  # the peer reset it first, say: the close is what it is
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)


class TracedConnection(Connection):
    """A Connection that logs its life at debug level: when it was accepted, and when and why it
    closed, with its byte counts and duration.  The server picks it once, when it is created with
    debug logging on, so an ordinary Connection's hot path pays nothing for it."""

    __slots__ = ("bytes_in", "bytes_out", "_started", "_why", "_read_base")

    def __init__(self, server: Server, sock: socket.socket, peername: Any, protocol: Protocol) -> None:
        super().__init__(server, sock, peername, protocol)
        self.bytes_in = 0
        self.bytes_out = 0
        self._started = self._loop.now
        self._why = ""
        #: the server's bytes_in when the read under way began, or None outside a read
        self._read_base: int | None = None
        log.debug("%s: accepted %s (fd %d)", server.name, format_address(peername), self._fd)

    # The server's running totals move only inside these calls for this connection's bytes.  A read
    # can end in _finish (the app raised or aborted in data_received): _take_read counts it there too.
    def _take_read(self) -> None:
        if self._read_base is not None:
            self.bytes_in += self._traffic.bytes_in - self._read_base
            self._read_base = self._traffic.bytes_in

    def _on_readable(self) -> None:
        self._read_base = self._traffic.bytes_in
        try:
            super()._on_readable()
        finally:
            self._take_read()
            self._read_base = None

    def _on_linger_readable(self) -> None:
        self._read_base = self._traffic.bytes_in
        try:
            super()._on_linger_readable()
        finally:
            self._take_read()
            self._read_base = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        before = self._traffic.bytes_out
        super().write(data)
        self.bytes_out += self._traffic.bytes_out - before

    def _on_writable(self) -> None:
        before = self._traffic.bytes_out
        super()._on_writable()
        self.bytes_out += self._traffic.bytes_out - before

    def _on_eof(self) -> None:
        self._why = self._why or "the client closed"
        super()._on_eof()

    def close(self) -> None:
        self._why = self._why or "closed by the app"
        super().close()

    def abort(self) -> None:
        self._why = self._why or "aborted by the app"
        super().abort()

    def _server_close(self, why: str) -> None:
        self._why = self._why or why
        super()._server_close(why)

    def _server_abort(self, why: str) -> bool:
        # A close already under way (the app's, a shutdown's) that the server now cuts short says both.
        if not self._lost:
            self._why = f"{self._why}, then aborted: {why}" if self._why else why
        return super()._server_abort(why)

    def _reset_on_close(self, undelivered: int) -> None:
        self._why += f"; reset, {undelivered} bytes undelivered"
        super()._reset_on_close(undelivered)

    def _finish(self, exc: Exception | None) -> None:
        if not self._lost:
            self._take_read()
            why = f"{type(exc).__name__}: {exc}" if exc is not None else self._why or "closed"
            log.debug(
                "%s: closed %s (fd %d) after %.3f s, %d bytes in, %d bytes out: %s",
                self._server.name,
                format_address(self._peername),
                self._fd,
                self._loop.now - self._started,
                self.bytes_in,
                self.bytes_out,
                why,
            )
        super()._finish(exc)


# Compiled, it stays a base that interpreted code may subclass (setup.py, DESIGN.md).
@mypyc_attr(allow_interpreted_subclasses=True)
class Server:
    """Listening sockets bound to one address, and the connections they accepted.

    ``max_connections`` bounds the open connections.  Past it a client is, by
    default, accepted and closed at once: a quick, clean refusal rather than a
    client left waiting in the backlog.  With ``refuse_excess=False`` the
    listeners are not watched until a connection closes, so the excess waits
    in the kernel's backlog at no cost to the loop (the stats endpoint's choice).
    ``accept_rate`` paces accepts: when its bucket is empty the listeners are
    not watched until the next token, so a connect flood waits in the backlog
    instead of taking a share of every loop iteration (the stats endpoint's
    protection).  ``idle_timeout`` closes a connection that has made no progress in
    either direction for that long, found by a coarse periodic sweep: the hot path
    only stores the loop's clock reading on each transfer, and the sweep asks the
    kernel whether a connection that looks idle has had its send queue read
    (Connection._kernel_progress).

    Invariant: a closing connection is gone within the idle timeout (or, with none,
    ``flush_timeout``) plus two sweep intervals if its peer makes no progress: its
    flush is held to the same rule, its linger has a timer of its own, and what the
    kernel still holds when the linger ends is held to the rule again
    (Connection._check_delivery).  A connection the server gives up on with bytes
    the client has not received is reset, never closed with a FIN.
    """

    def __init__(
        self,
        loop: EventLoop,
        protocol_factory: ProtocolFactory,
        host: str | Iterable[str] | None = "127.0.0.1",
        port: int | str | None = 5001,
        *,
        name: str = "app",
        app: str | None = None,
        backlog: float = 1024,
        accept_batch: float = 128,
        high_water: float = 64 * 1024,
        low_water: float | None = None,
        linger_timeout: float = 2.0,
        max_connections: float | None = None,
        refuse_excess: bool = True,
        accept_rate: RateLimit | None = None,
        idle_timeout: float | None = None,
        flush_timeout: float = 60.0,
    ) -> None:
        # What asyncio's create_server takes, in both builds: a host or any iterable of them, a
        # port as an int or a service name, sizes and limits as floats (pollserve.arguments).
        self.loop = loop
        self.protocol_factory = protocol_factory
        self.host: str | list[str] | None = arguments.hosts(host)
        self.port: int = arguments.port(port)
        #: names the listener in log lines ("app", "stats")
        self.name = name
        #: names the app in log lines (the --app spec)
        self.app = app or getattr(protocol_factory, "__qualname__", repr(protocol_factory))
        self.backlog: int = arguments.size(backlog, "backlog")
        #: at most this many accept() calls per wakeup, so a connect storm cannot starve clients
        self.accept_batch: int = arguments.size(accept_batch, "accept_batch")
        if self.accept_batch < 1:
            raise ValueError(f"accept_batch must be at least 1, got {self.accept_batch}")
        #: backpressure marks (the low one defaults to a quarter of the high one, as in asyncio)
        self.high_water, self.low_water = arguments.water_marks(
            high_water, low_water, 64 * 1024, ("high_water", "low_water")
        )
        #: how long a closing connection reads and drops the client's bytes, waiting for its EOF
        self.linger_timeout: float = arguments.seconds(linger_timeout, "linger_timeout")
        self.max_connections: int | None = arguments.optional_size(max_connections, "max_connections")
        self.refuse_excess = refuse_excess
        self.accept_rate = accept_rate
        idle = 0.0 if idle_timeout is None else arguments.seconds(idle_timeout, "idle_timeout")
        self.idle_timeout: float | None = idle or None  # 0: none
        #: without an idle timeout, how long a closing connection may go without progress while it
        #: flushes its buffer (nginx's send_timeout is the same rule, with the same 60 s default)
        self.flush_timeout: float = arguments.seconds(flush_timeout, "flush_timeout")
        self.sockets: list[socket.socket] = []
        self.connections: set[Connection] = set()
        # Plain counters, running totals: a snapshot reads them in O(1).
        self.connections_accepted = 0
        self.connections_closed = 0
        self.connections_refused = 0
        self.connections_idle_closed = 0
        #: of those, the ones reset because bytes were undelivered (Connection._server_abort)
        self.connections_idle_reset = 0
        #: running byte totals, updated by the connections (bytes_in, bytes_out, write_buffer_bytes)
        self.traffic = Traffic()
        #: called (no arguments) when accept() fails for lack of fds: the fd-usage warning listens
        self.on_fd_exhausted: Callable[[], Any] | None = None
        self._accept_paused = False
        self._waiting_for_room = False
        self._pacing = False
        self._refusals = EpisodeLog(log, loop, f"{name}: connections refused")
        self._app_failures = EpisodeLog(log, loop, f"{name}: connections closed because the app failed")
        #: the type the factory's product was last found to be a protocol of: checked once per type
        self._protocol_type: type | None = None
        # Chosen once: with debug logging on, connections log their life (TracedConnection).
        self._connection_class = TracedConnection if log.isEnabledFor(logging.DEBUG) else Connection
        self._idle_timer: Handle | None = None
        self._on_drained: Callable[[], Any] | None = None
        self._drain_timer: Handle | None = None

    # -- listening -------------------------------------------------------------

    def start(self, sockets: socket.socket | Iterable[socket.socket] | None = None) -> None:
        """Listen and start accepting: on ``sockets`` made elsewhere (a supervisor's, systemd's;
        one socket, as asyncio's ``sock``, or any iterable of them), else on every address
        ``host`` stands for (listeners.bind_tcp), which may raise OSError."""
        if sockets is not None:
            opened = arguments.stream_sockets(sockets)
        else:
            opened = bind_tcp(self.host, self.port, backlog=self.backlog)
        for sock in opened:
            sock.setblocking(False)
            self._watch(sock)
        self.sockets.extend(opened)
        if self.idle_timeout is not None and self._idle_timer is None:
            self._idle_timer = _call_later(self.loop, self._sweep_interval(), self._sweep_idle)

    @property
    def address(self) -> Any:
        """The bound address of the first listening socket (the real port after port 0)."""
        return self.sockets[0].getsockname()

    @property
    def addresses(self) -> list[Any]:
        """The bound addresses of every listening socket."""
        return [sock.getsockname() for sock in self.sockets]

    def _describe_handler(self, handler: object) -> str:
        """How a slow-callback warning names the accept handler."""
        return f"accepting {self.name} clients on {format_address(self.address)}"

    def _watch(self, listener: socket.socket) -> None:
        self.loop.add_reader(listener.fileno(), functools.partial(self._on_acceptable, listener))

    def stop_accepting(self) -> None:
        """Close the listening sockets; established connections go on."""
        for sock in self.sockets:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets.clear()

    def _full(self) -> bool:
        return self.max_connections is not None and len(self.connections) >= self.max_connections

    def _on_acceptable(self, listener: socket.socket) -> None:
        for _ in range(self.accept_batch):
            if listener.fileno() < 0:  # closed by the connection_made before (stop_accepting)
                return
            if not self.refuse_excess and self._full():
                self._wait_for_room()
                return
            if self.accept_rate is not None and not self.accept_rate.take():
                self._pace()
                return
            try:
                sock, peername = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _CLIENT_GONE:
                    continue
                if exc.errno in _EXHAUSTED:
                    self._pause_accepting(listener, exc)
                    return
                raise
            if self._accept_paused:
                self._accept_paused = False
                log.info("%s: accepting again (%d connections open)", self.name, len(self.connections))
            if self._full():
                self._refuse(sock, f"{len(self.connections)} connections open, the limit of {self.max_connections}")
                continue
            self._serve(sock, peername)

    def _refuse(self, sock: socket.socket, reason: str) -> None:
        """Close an accepted client at once: it sees EOF (or a reset, if it had sent bytes)."""
        sock.close()
        self.connections_refused += 1
        self._refusals.event(reason)

    def _pace(self) -> None:
        """Stop watching the listeners until the accept rate allows the next client."""
        self._pacing = True
        for sock in self.sockets:
            self.loop.remove_reader(sock.fileno())
        assert self.accept_rate is not None
        _call_later(self.loop, self.accept_rate.wait(), self._end_pacing)

    def _end_pacing(self) -> None:
        self._pacing = False
        if not self._waiting_for_room:
            for sock in self.sockets:
                self._watch(sock)

    def _wait_for_room(self) -> None:
        """Stop watching the listeners until a connection closes; the kernel's backlog holds the rest."""
        self._waiting_for_room = True
        for sock in self.sockets:
            self.loop.remove_reader(sock.fileno())

    def _pause_accepting(self, listener: socket.socket, exc: OSError) -> None:
        # Level-triggered: a pending client we cannot accept keeps the listener
        # readable, so stop watching it for a second rather than spin (asyncio's
        # choice; Twisted and libuv keep a reserve fd instead).  One warning per
        # episode, not one per second.  With the fd budget this is the last line
        # of defence: the connection limit is reached first.
        if not self._accept_paused:
            self._accept_paused = True
            log.warning(
                "%s: accept failed: %s; pausing accepts for 1 s at a time until it succeeds (%d connections open)",
                self.name,
                exc.strerror or exc,
                len(self.connections),
            )
            if self.on_fd_exhausted is not None and exc.errno in (errno.EMFILE, errno.ENFILE):
                self.on_fd_exhausted()
        fd = listener.fileno()
        self.loop.remove_reader(fd)

        def resume() -> None:
            if listener.fileno() == fd and not (self._waiting_for_room or self._pacing):  # not closed meanwhile
                self._watch(listener)

        _call_later(self.loop, 1.0, resume)

    def _serve(self, sock: socket.socket, peername: Any) -> None:
        try:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                # Without it a reply split across sends waits for the client's delayed ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            # macOS refuses socket options with EINVAL once a socket is shut both ways,
            # as an accepted one is when its client reset it first (XNU sosetsockopt;
            # envoyproxy/envoy#1446).  That client is gone; the batch goes on.
            log.debug("%s: client %s gone before it was served: %s", self.name, format_address(peername), exc)
            sock.close()
            return
        try:
            protocol = self.protocol_factory()
        except Exception as exc:
            sock.close()
            self.connections_refused += 1
            self._app_failures.event(f"app {self.app!r} failed to make a protocol: {type(exc).__name__}: {exc}", exc)
            return
        if type(protocol) is not self._protocol_type:
            # Duck typing, as asyncio: a protocol is anything with these two.  Checked once per type.
            if not (hasattr(protocol, "connection_made") and hasattr(protocol, "data_received")):
                sock.close()
                self.connections_refused += 1
                shown = repr(protocol)
                shown = shown if len(shown) <= 60 else shown[:57] + "..."
                self._app_failures.event(
                    f"app {self.app!r} returned {type(protocol).__name__} ({shown}), not a protocol "
                    "(one has connection_made and data_received)"
                )
                return
            self._protocol_type = type(protocol)
        conn = self._connection_class(self, sock, peername, protocol)
        try:
            self.loop.add_reader(conn._fd, conn._on_readable)
        except CapacityError as exc:
            self._refuse(sock, str(exc))
            return
        self.connections.add(conn)
        self.connections_accepted += 1
        try:
            protocol.connection_made(conn)
        except Exception as exc:
            conn._protocol_failed("connection_made", exc)

    # -- idle connections -----------------------------------------------------------

    def _no_progress_limit(self) -> float:
        """How long a connection may make no progress: the idle timeout, or without one the flush
        timeout, which then applies to closing connections only."""
        return self.idle_timeout or self.flush_timeout

    def _sweep_interval(self) -> float:
        """A quarter of the limit, within [0.05 s, 5 s]."""
        return min(max(self._no_progress_limit() / 4, 0.05), 5.0)

    def _watch_flush(self) -> None:
        """A connection closes with bytes still buffered: make sure a sweep will watch it."""
        if self._idle_timer is None:
            self._idle_timer = _call_later(self.loop, self._sweep_interval(), self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Close what made no progress for the limit.  Progress is a transfer either way (the hot
        path stores the clock in _last_active) or, seen here, the kernel's send queue shrinking
        between two looks (Connection._kernel_progress): only connections without a transfer for
        half of the limit are looked at, one ioctl each per sweep, and the first look after a
        transfer only takes a sample.  So a connection is kept while something moves within every
        half of the limit, and closed once nothing has been seen to move for the limit.  A read
        too small for the client's kernel to reopen its window moves nothing (README, "Idle
        timeout").  Lingering connections have their own timer (Connection._linger_ended).  A
        connection closed here with bytes undelivered is reset (Connection._close_idle), and
        counted in connections_idle_reset too."""
        self._idle_timer = None
        now = self.loop.now
        limit = self._no_progress_limit()
        interval = self._sweep_interval()
        deadline = now - limit
        look_from = now - limit / 2
        idle = []
        flushing = False
        for conn in self.connections:
            if conn._closing:
                if not conn._buffer:
                    continue
                flushing = True
            elif self.idle_timeout is None:
                continue
            if conn._last_active > look_from:
                continue
            progress = conn._kernel_progress(now)
            if progress:
                conn._last_active = now
            elif progress is not None and conn._last_active <= deadline:
                idle.append(conn)
        for conn in idle:
            what = "flushing" if conn._closing else "idle"
            self._give_up(conn, f"{what}, no progress for {limit:g} s")
        if self.idle_timeout is not None or flushing:
            self._idle_timer = _call_later(self.loop, interval, self._sweep_idle)

    def _give_up(self, conn: Connection, why: str) -> None:
        """Close a connection that made no progress for the limit, and count it."""
        self.connections_idle_closed += 1
        if conn._close_idle(why):
            self.connections_idle_reset += 1

    # -- accounting --------------------------------------------------------------

    @property
    def bytes_in(self) -> int:
        """Bytes received from the clients."""
        return self.traffic.bytes_in

    @property
    def bytes_out(self) -> int:
        """Bytes sent to the clients."""
        return self.traffic.bytes_out

    @property
    def write_buffer_bytes(self) -> int:
        """Bytes waiting in the connections' write buffers, all together."""
        return self.traffic.write_buffer_bytes

    def _connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.connections_closed += 1
        if self._waiting_for_room and not self._full():
            self._waiting_for_room = False
            if not self._pacing:
                for sock in self.sockets:
                    self._watch(sock)
        if self._on_drained is not None and not self.connections:
            self._drained()

    # -- shutdown ------------------------------------------------------------------

    def shutdown(self, timeout: float, on_done: Callable[[], Any]) -> None:
        """Stop accepting, close every connection after flushing it, then call on_done().

        Connections still flushing or lingering after timeout seconds are aborted.
        """
        self._accept_backlog()
        self.stop_accepting()
        self._on_drained = on_done
        for conn in list(self.connections):
            # What a client had sent before the shutdown gets its answer, then the close.
            conn._read_pending()
            conn._server_close("server shutting down")
        if self.connections:
            self._drain_timer = _call_later(self.loop, timeout, self._abort_all)
        elif self._on_drained is not None:
            self._drained()

    def _accept_backlog(self) -> None:
        """Accept the clients the kernel has queued, past any connection limit: closing a
        listening socket resets every connection still in its backlog (tcp(7): the queue is
        the listener's), and those clients did nothing wrong.  Bounded by the backlog size."""
        for listener in self.sockets:
            for _ in range(self.backlog):
                try:
                    sock, peername = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if exc.errno in _CLIENT_GONE:
                        continue
                    break  # out of fds: what is left is reset, as it would have been
                self._serve(sock, peername)

    def retire(self, timeout: float, on_done: Callable[[], Any]) -> None:
        """Stop accepting and let the connections end on their own (a worker replaced by a rolling
        restart); those still open after timeout seconds are shut down as by shutdown().  The
        clients already queued are accepted first, as shutdown() does: a listener of this worker
        alone (SO_REUSEPORT) resets its queue when it closes."""
        self._accept_backlog()
        self.stop_accepting()
        self._on_drained = on_done
        if not self.connections:
            self._drained()
            return

        def expired() -> None:
            self._drain_timer = None
            if self._on_drained is not None:
                callback, self._on_drained = self._on_drained, None
                self.shutdown(self.linger_timeout, callback)

        self._drain_timer = _call_later(self.loop, timeout, expired)

    def _abort_all(self) -> None:
        count = len(self.connections)
        resets = sum(conn._server_abort("shutdown timeout") for conn in list(self.connections))
        log.warning(
            "%s: shutdown timeout: aborting %d connections still flushing or lingering; %d reset, bytes undelivered",
            self.name,
            count,
            resets,
        )

    def _drained(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        on_done, self._on_drained = self._on_drained, None
        if on_done is not None:
            on_done()

    def close(self) -> None:
        """Abort every connection and close the listening sockets, now."""
        self.stop_accepting()
        for conn in list(self.connections):
            conn._server_abort("server closed")
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._refusals.close()
        self._app_failures.close()
