"""The stream transport's per-request path: a read into ``data_received``, and a write with nothing
buffered.  Compiled where the install can (``compiled.MODULES``).

``StreamTransport`` (``transport.py``) is an ``asyncio.Transport``, whose ``__slots__`` no compiled
class can share a layout with, so it stays interpreted and keeps the state these two paths touch here,
in a compiled object of its own (its attributes of the same names, with an underscore, are properties
over this one's).  The core calls this object's ``read_data`` when the fd is readable, and a
transport's ``write`` and ``is_closing`` are this object's (``StreamTransport.__init__``): a request then runs no
interpreted code but the protocol's.  Every other case, an error, EOF, a partial send, a buffered or
refused write, goes back to the transport's own methods, which say what asyncio's loop does.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Final

from ..loop import EventLoop
from .counts import ConnectionCounts

# On POSIX a socket is a file descriptor, and os.read/os.write reach the same recv()/send() (flags 0)
# for fewer instructions than the socket methods (server.py says how many); Windows sockets are not.
FD_IO: Final = sys.platform != "win32"
_read: Final = os.read
_write: Final = os.write

#: the first size one read asks for, and the least it comes back to: a bytes object of up to 512
#: bytes (33 of them its header) comes from the interpreter's own allocator (server.py's MIN_READ)
MIN_READ: Final = 512 - 33


class StreamCore:
    """One stream transport's per-request state and paths."""

    def __init__(
        self, transport: Any, loop: EventLoop, sock: Any, counts: ConnectionCounts, buffer: Any, max_size: int
    ) -> None:
        self.transport = transport
        self.loop = loop
        #: an object, not an int: compiled, a native int given to os.read() or os.write() is boxed
        #: at every call, and one over 256 allocates
        self.fd: Any = sock.fileno()
        self.sock = sock
        self.counts = counts
        #: the transport's write buffer (the same deque): a write goes through here only when it is empty
        self.buffer = buffer
        self._protocol: Any = None
        #: the protocol's data_received, looked up once per protocol, not per read (as uvloop keeps it)
        self.data_received: Any = None
        #: set once connection_lost is scheduled, then counts writes after it
        self.conn_lost = 0
        self.eof = False  # write_eof()
        self.closing = False  # close() or abort(): is_closing()
        self.empty_waiter: Any = None  # sendfile's
        self.last_active: float = loop.now  # the loop's clock at the last transfer (the idle sweep's)
        self.max_size = max_size
        self.read_size = min(MIN_READ, max_size)  # what the next read asks for
        #: the same, as the object os.read() is given: boxed when it changes, not at every read (a
        #: size over 256 is no cached small int, and boxing one allocates)
        self.read_ask: Any = self.read_size

    @property
    def protocol(self) -> Any:
        return self._protocol

    @protocol.setter
    def protocol(self, protocol: Any) -> None:
        self._protocol = protocol
        self.data_received = getattr(protocol, "data_received", None)  # a BufferedProtocol's is not read

    def _describe_handler(self, handler: object) -> str:
        """A slow read is named as the transport names it (the core's describe_callback)."""
        return str(self.transport._describe_handler(handler))

    def is_closing(self) -> bool:
        """``transport.is_closing()``: a stream's ``drain()`` asks it on every call."""
        return self.closing

    def read_data(self) -> None:
        """The fd is readable: one read, then data_received.

        The size asked adapts, as the core's connection does: a read allocates the whole size
        asked and shrinks it to what arrived, and at the standard loop's 256 KiB that is an mmap,
        an mremap and an munmap per read.  A read that filled the size asks 8x more next time, up
        to ``max_size``; one that used an eighth of it, 8x less."""
        if self.conn_lost:
            return
        size = self.read_size
        try:
            data: bytes = _read(self.fd, self.read_ask) if FD_IO else self.sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self.transport._fatal_error(exc, "Fatal read error on socket transport")
            return
        self.last_active = self.loop.now
        got = len(data)
        if not got:
            self.transport._read_eof()
            return
        if got == size:
            if size < self.max_size:
                self.read_size = self.read_ask = min(size * 8, self.max_size)
        elif got <= size >> 3 and size > MIN_READ:
            self.read_size = self.read_ask = max(size >> 3, MIN_READ)
        self.counts.bytes_in += got
        try:
            self.data_received(data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self.transport._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")

    def write(self, data: Any) -> None:
        """``transport.write(data)``: bytes with nothing buffered are sent at once; anything else,
        and what a send leaves, is the transport's (``_write_any``, ``_buffer_rest``)."""
        # Lengths, not truth values: compiled, len() of a bytes is a field read, and ``not data``
        # a call into the interpreter; ``sent`` is an int, so the count and the comparison stay
        # native (an untyped one cost four boxings and two generic operations, callgrind).
        if (
            type(data) is not bytes
            or not len(data)
            or self.buffer
            or self.conn_lost
            or self.eof
            or self.empty_waiter is not None
        ):
            self.transport._write_any(data)
            return
        sent: int
        try:
            sent = _write(self.fd, data) if FD_IO else self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self.transport._fatal_error(exc, "Fatal write error on socket transport")
            return
        self.counts.bytes_out += sent
        self.last_active = self.loop.now
        if sent != len(data):
            self.transport._buffer_rest(data, sent)
