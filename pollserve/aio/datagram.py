"""Datagram endpoints of the asyncio loop: ``create_datagram_endpoint`` and its transport.

The transport watches its socket through the core's reader and writer tables directly (no asyncio
handle per datagram), so it catches its own errors and gives them to the loop's exception handler,
as the standard loop's handles would.  Its protocol's callbacks run in the contexts the standard
loop uses: ``connection_made`` in a copy of the caller's context, every ``datagram_received`` and
``error_received`` from a read in one other copy, so a variable set in ``connection_made`` is not
seen there.  Bytes in and out go to the loop's ``counts``.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import os
import socket
import stat
import sys
import warnings
from asyncio.trsock import TransportSocket
from collections.abc import Callable
from typing import Any, TypeVar

from ..backends import CapacityError
from ..loop import EventLoop
from .addresses import set_reuse_port
from .transport import capacity_oserror

logger = logging.getLogger("asyncio")

#: what one read takes at most (the standard loop's max_size)
MAX_DATAGRAM = 256 * 1024
#: the standard loop's default write-buffer high-water mark
DEFAULT_HIGH_WATER = 64 * 1024
#: sends after the endpoint is lost that pass silently, before each logs a warning (asyncio's constant)
LOG_THRESHOLD_FOR_CONNLOST_WRITES = 5
#: 3.13 counts a buffered datagram's header in the write buffer's size, and sends empty datagrams
HEADER_BYTES = 8 if sys.version_info >= (3, 13) else 0
SENDS_EMPTY = sys.version_info >= (3, 13)

_unset = object()

#: what one send came to
SENT, BLOCKED, FAILED = range(3)

ProtocolT = TypeVar("ProtocolT", bound=asyncio.BaseProtocol)


class DatagramTransport(asyncio.Transport, asyncio.DatagramTransport):
    """A UDP (or UNIX datagram) socket of the loop: the standard ``asyncio.DatagramTransport``, and an
    ``asyncio.Transport`` as the standard loop's is."""

    _sock: socket.socket | None = None  # __del__ reads it even if __init__ failed

    def __init__(
        self, loop: Any, sock: socket.socket, protocol: asyncio.BaseProtocol, address: Any = None, waiter: Any = None
    ) -> None:
        super().__init__(None)
        self._extra["socket"] = TransportSocket(sock)
        for key, query in (("sockname", sock.getsockname), ("peername", sock.getpeername)):
            try:
                self._extra[key] = query()
            except OSError:
                self._extra[key] = None
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol: Any = protocol
        self._protocol_connected = True
        self._address = address
        self._buffer: collections.deque[tuple[bytes, Any]] = collections.deque()
        self._buffer_size = 0
        self._conn_lost = 0
        self._closing = False
        self._paused = False
        self._protocol_paused = False
        self._high_water = DEFAULT_HIGH_WATER
        self._low_water = DEFAULT_HIGH_WATER // 4
        #: the context every read's protocol callback runs in (the reader's, on the standard loop)
        self._read_context = contextvars.copy_context()
        self._write_context = self._read_context
        loop._transports[self._fd] = self
        loop.call_soon(protocol.connection_made, self)
        loop.call_soon(self._start_reading)  # only once connection_made() has run
        if waiter is not None:
            loop.call_soon(asyncio.futures._set_result_unless_cancelled, waiter, None)

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else "closing" if self._closing else "open"
        return f"<{type(self).__name__} fd={self._fd} {state} bufsize={self._buffer_size}>"

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if self._sock is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._sock.close()

    # -- the core's callbacks -------------------------------------------------------------------------

    def _watch(self, write: bool) -> None:
        add = EventLoop.add_writer if write else EventLoop.add_reader
        try:
            add(self._loop, self._fd, self._on_writable if write else self._on_readable)
        except CapacityError as exc:
            self._fatal_error(capacity_oserror(exc), "Cannot watch the datagram socket")

    def _unwatch(self, write: bool) -> None:
        if not self._loop.is_closed():
            (EventLoop.remove_writer if write else EventLoop.remove_reader)(self._loop, self._fd)

    def _report(self, message: str, exc: BaseException) -> None:
        self._loop.call_exception_handler(
            {"message": message, "exception": exc, "transport": self, "protocol": self._protocol}
        )

    def _run_guarded(self, context: contextvars.Context, method: Callable[[], None]) -> None:
        """What an asyncio handle does around a callback: its context, its errors to the handler."""
        try:
            context.run(method)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._report(f"Exception in callback {type(self).__name__}.{method.__name__}()", exc)

    def _on_readable(self) -> None:
        self._run_guarded(self._read_context, self._read_ready)

    def _on_writable(self) -> None:
        self._run_guarded(self._write_context, self._sendto_ready)

    def _start_reading(self) -> None:
        if not self._closing and not self._paused:
            self._watch(False)

    def _read_ready(self) -> None:
        if self._conn_lost or self._sock is None:
            return
        try:
            data, addr = self._sock.recvfrom(MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._protocol.error_received(exc)
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on datagram transport")
            return
        self._loop.counts.bytes_in += len(data)
        self._protocol.datagram_received(data, addr)

    # -- sending ----------------------------------------------------------------------------------------

    def _try_send(self, data: Any, addr: Any) -> int:
        """One datagram to the socket: SENT, BLOCKED, or FAILED (told to ``error_received``, or
        fatal and the transport closing)."""
        assert self._sock is not None
        try:
            sent = self._sock.send(data) if self._extra["peername"] else self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            return BLOCKED
        except OSError as exc:
            self._protocol.error_received(exc)
            return FAILED
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal write error on datagram transport")
            return FAILED
        self._loop.counts.bytes_out += sent
        return SENT

    def sendto(self, data: Any, addr: Any = None) -> None:
        """Send one datagram, or buffer it while the socket's buffer is full; a failed send goes to
        ``error_received``.  ``data`` is any bytes-like object; its size counts in bytes."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__!r}")
        if not data and not SENDS_EMPTY:
            return
        if self._address:
            if addr not in (None, self._address):
                raise ValueError(f"Invalid address: must be None or {self._address}")
            addr = self._address
        if self._conn_lost and self._address:
            if self._conn_lost >= LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("socket.send() raised exception.")
            self._conn_lost += 1
            return
        if not self._buffer:
            if self._try_send(data, addr) != BLOCKED:
                return
            self._write_context = contextvars.copy_context()
            self._watch(True)
        copy = bytes(data)  # what is buffered must not change under us
        self._buffer.append((copy, addr))
        self._grow_buffer(len(copy) + HEADER_BYTES)
        self._maybe_pause_protocol()

    def _grow_buffer(self, nbytes: int) -> None:
        self._buffer_size += nbytes
        self._loop.counts.write_buffer_bytes += nbytes

    def _sendto_ready(self) -> None:
        while self._buffer:
            data, addr = self._buffer[0]
            outcome = self._try_send(data, addr)
            if outcome == BLOCKED:
                break
            if self._buffer:  # a fatal error has emptied it
                self._buffer.popleft()
                self._grow_buffer(-len(data) - HEADER_BYTES)
            if outcome == FAILED:
                return
        self._maybe_resume_protocol()  # may send more
        if not self._buffer:
            self._unwatch(True)
            if self._closing:
                self._call_connection_lost(None)

    def get_write_buffer_size(self) -> int:
        return self._buffer_size

    # -- flow control -----------------------------------------------------------------------------------

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water, self._low_water = high, low
        self._maybe_pause_protocol()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low_water, self._high_water

    def _call_protocol(self, name: str) -> None:
        try:
            getattr(self._protocol, name)()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._report(f"protocol.{name}() failed", exc)

    def _maybe_pause_protocol(self) -> None:
        if self._buffer_size > self._high_water and not self._protocol_paused:
            self._protocol_paused = True
            self._call_protocol("pause_writing")

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self._buffer_size <= self._low_water:
            self._protocol_paused = False
            self._call_protocol("resume_writing")

    # -- reading ------------------------------------------------------------------------------------------

    def is_reading(self) -> bool:
        return not self._closing and not self._paused

    def pause_reading(self) -> None:
        if self.is_reading():
            self._paused = True
            self._unwatch(False)

    def resume_reading(self) -> None:
        if not self._closing and self._paused:
            self._paused = False
            self._watch(False)

    # -- closing --------------------------------------------------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._protocol_connected = True

    def get_protocol(self) -> Any:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; once the buffered datagrams are sent, ``connection_lost(None)``."""
        if self._closing:
            return
        self._closing = True
        self._unwatch(False)
        if not self._buffer:
            self._conn_lost += 1
            self._unwatch(True)
            self._loop.call_soon(self._call_connection_lost, None)

    def abort(self) -> None:
        """Drop the buffered datagrams and close now."""
        self._force_close(None)

    def _fatal_error(self, exc: BaseException, message: str) -> None:
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._report(message, exc)
        self._force_close(exc)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._conn_lost:
            return
        if self._buffer:
            self._grow_buffer(-self._buffer_size)
            self._buffer.clear()
            self._unwatch(True)
        if not self._closing:
            self._closing = True
            self._unwatch(False)
        self._conn_lost += 1
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            if self._protocol_connected:
                self._protocol.connection_lost(exc)
        finally:
            if self._sock is not None:
                self._sock.close()
            self._sock = None
            self._protocol = None
            self._loop = None


def _remove_stale_unix_socket(path: Any) -> None:
    """A socket file left by an endpoint before: bound again, it would fail (the standard rule)."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        logger.error("Unable to check or remove stale UNIX socket %r: %r", path, err)


class DatagramEndpoints:
    """``create_datagram_endpoint`` (mixed into ``AsyncioLoop``)."""

    async def _resolve_datagram(self, address: Any, family: int, proto: int, flags: int) -> list[Any]:
        """getaddrinfo for a datagram address: in the loop when the host is numeric (nothing to
        look up), else in the executor, as the standard loop's ``_ensure_resolved``."""
        host, port = address
        try:
            return socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM, proto, flags | socket.AI_NUMERICHOST)
        except (socket.gaierror, UnicodeError):
            return await self.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM, proto=proto, flags=flags)

    async def _datagram_address_pairs(
        self, local_addr: Any, remote_addr: Any, family: int, proto: int, flags: int
    ) -> list[tuple[tuple[int, int], tuple[Any, Any]]]:
        """Every (family, proto) for which both addresses given resolve, with the addresses."""
        if not (local_addr or remote_addr):
            if family == 0:
                raise ValueError("unexpected address family")
            return [((family, proto), (None, None))]
        if hasattr(socket, "AF_UNIX") and family == socket.AF_UNIX:
            for addr in (local_addr, remote_addr):
                if addr is not None and not isinstance(addr, str):
                    raise TypeError("string is expected")
            if local_addr and local_addr[0] not in (0, "\x00"):
                _remove_stale_unix_socket(local_addr)
            return [((family, proto), (local_addr, remote_addr))]
        found: dict[tuple[int, int], list[Any]] = {}
        for index, addr in ((0, local_addr), (1, remote_addr)):
            if addr is None:
                continue
            if not (isinstance(addr, tuple) and len(addr) == 2):
                if sys.version_info < (3, 11):
                    raise AssertionError("2-tuple is expected")
                raise TypeError("2-tuple is expected")
            infos = await self._resolve_datagram(addr, family, proto, flags)
            if not infos:
                raise OSError("getaddrinfo() returned empty list")
            for fam, _, pro, _, address in infos:
                found.setdefault((fam, pro), [None, None])[index] = address
        pairs = [
            (key, (pair[0], pair[1]))
            for key, pair in found.items()
            if not ((local_addr and pair[0] is None) or (remote_addr and pair[1] is None))
        ]
        if not pairs:
            raise ValueError("can not get address information")
        return pairs

    def _datagram_socket(
        self, family: int, proto: int, local: Any, remote: Any, reuse_port: Any, allow_broadcast: Any
    ) -> socket.socket:
        sock = socket.socket(family=family, type=socket.SOCK_DGRAM, proto=proto)
        try:
            if reuse_port:
                set_reuse_port(sock)
            if allow_broadcast:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setblocking(False)
            if local:
                sock.bind(local)
            if remote and not allow_broadcast:
                # A datagram connect() only sets the peer: it never waits, so no sock_connect().
                sock.connect(remote)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _create_datagram_endpoint(
        self,
        protocol_factory: Callable[[], ProtocolT],
        local_addr: Any,
        remote_addr: Any,
        family: int,
        proto: int,
        flags: int,
        reuse_port: Any,
        allow_broadcast: Any,
        sock: Any,
    ) -> tuple[DatagramTransport, ProtocolT]:
        self._check_closed()
        remote = None
        if sock is not None:
            # 3.13 takes any socket but a stream's (a raw one, say); before, UDP only
            if sock.type == socket.SOCK_STREAM if sys.version_info >= (3, 13) else sock.type != socket.SOCK_DGRAM:
                kind = "A datagram socket" if sys.version_info >= (3, 13) else "A UDP Socket"
                raise ValueError(f"{kind} was expected, got {sock!r}")
            if local_addr or remote_addr or family or proto or flags or reuse_port or allow_broadcast:
                options = {
                    "local_addr": local_addr,
                    "remote_addr": remote_addr,
                    "family": family,
                    "proto": proto,
                    "flags": flags,
                    "reuse_port": reuse_port,
                    "allow_broadcast": allow_broadcast,
                }
                problems = ", ".join(f"{k}={v}" for k, v in options.items() if v)
                raise ValueError(
                    f"socket modifier keyword arguments can not be used when sock is specified. ({problems})"
                )
            sock.setblocking(False)
        else:
            pairs = await self._datagram_address_pairs(local_addr, remote_addr, family, proto, flags)
            errors: list[OSError] = []
            for (fam, pro), (local, remote) in pairs:
                try:
                    sock = self._datagram_socket(fam, pro, local, remote, reuse_port, allow_broadcast)
                except OSError as exc:
                    errors.append(exc)
                    continue
                break
            else:
                raise errors[0]
        protocol = protocol_factory()
        waiter = self.create_future()
        transport = DatagramTransport(self, sock, protocol, remote, waiter)
        if self._debug:
            if local_addr:
                logger.info(
                    "Datagram endpoint local_addr=%r remote_addr=%r created: (%r, %r)",
                    local_addr,
                    remote_addr,
                    transport,
                    protocol,
                )
            else:
                logger.debug("Datagram endpoint remote_addr=%r created: (%r, %r)", remote_addr, transport, protocol)
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        return transport, protocol

    if sys.version_info >= (3, 11):

        async def create_datagram_endpoint(
            self,
            protocol_factory: Callable[[], ProtocolT],
            local_addr: tuple[str, int] | str | None = None,
            remote_addr: tuple[str, int] | str | None = None,
            *,
            family: int = 0,
            proto: int = 0,
            flags: int = 0,
            reuse_port: bool | None = None,
            allow_broadcast: bool | None = None,
            sock: socket.socket | None = None,
        ) -> tuple[asyncio.DatagramTransport, ProtocolT]:
            return await self._create_datagram_endpoint(
                protocol_factory, local_addr, remote_addr, family, proto, flags, reuse_port, allow_broadcast, sock
            )

    else:

        async def create_datagram_endpoint(
            self,
            protocol_factory: Callable[[], ProtocolT],
            local_addr: tuple[str, int] | str | None = None,
            remote_addr: tuple[str, int] | str | None = None,
            *,
            family: int = 0,
            proto: int = 0,
            flags: int = 0,
            reuse_address: Any = _unset,
            reuse_port: bool | None = None,
            allow_broadcast: bool | None = None,
            sock: socket.socket | None = None,
        ) -> tuple[asyncio.DatagramTransport, ProtocolT]:
            """3.10's signature has ``reuse_address``: True refused (bpo-37228), False deprecated."""
            if sock is None and reuse_address is not _unset:
                if reuse_address:
                    raise ValueError(
                        "Passing `reuse_address=True` is no longer supported, as the usage of "
                        "SO_REUSEPORT in UDP poses a significant security concern."
                    )
                warnings.warn(
                    "The *reuse_address* parameter has been deprecated as of 3.5.10 "
                    "and is scheduled for removal in 3.11.",
                    DeprecationWarning,
                    stacklevel=2,
                )
            return await self._create_datagram_endpoint(
                protocol_factory, local_addr, remote_addr, family, proto, flags, reuse_port, allow_broadcast, sock
            )
