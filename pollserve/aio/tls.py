"""TLS on pollserve's asyncio loop: ``ssl=`` on the stream calls, ``start_tls``, the accept path.

asyncio's own ``sslproto.SSLProtocol`` runs over pollserve's ``StreamTransport``, as the standard
loop runs it over its socket transport: the raw transport carries the records, the protocol feeds
them through the ``SSLObject`` and gives the user's protocol its ``_SSLProtocolTransport``, with the
standard handshake and shutdown timeouts, flow control, errors and ``get_extra_info`` keys on every
Python (3.10's is the older ``_SSLPipe`` protocol, without a shutdown timeout).  The measurements
that chose it over a TLS layer of pollserve's own are in ``benchmarks/bench_asyncio_tls.py``.

The user's ``SSLContext`` is used as given: pollserve's TLS policy (``pollserve/tls.py``) is only
for the contexts its command-line server builds.  ``ssl=True`` on a client is asyncio's default
context, built by ``sslproto`` itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import sys
from asyncio import sslproto
from typing import Any

from .transport import StreamTransport

try:
    import ssl
except ImportError:  # pragma: no cover - a Python built without OpenSSL
    ssl = None  # type: ignore[assignment]

logger = logging.getLogger("asyncio")

#: 3.11 rewrote SSLProtocol: a BufferedProtocol that takes a shutdown timeout
HAS_SHUTDOWN_TIMEOUT = sys.version_info >= (3, 11)


if HAS_SHUTDOWN_TIMEOUT:
    SSLProtocol = sslproto.SSLProtocol
else:

    class SSLProtocol(sslproto.SSLProtocol):  # type: ignore[no-redef]
        """3.10's, given a memoryview as bytes: its write loop counts the view's len() (items)
        against the bytes SSLObject.write() reports, and spins forever on a view of ints."""

        def _write_appdata(self, data: Any) -> None:
            if isinstance(data, memoryview) and (data.itemsize != 1 or data.ndim != 1):
                data = data.cast("B") if data.c_contiguous else data.tobytes()
            super()._write_appdata(data)


def ssl_protocol(
    loop: Any,
    app_protocol: asyncio.BaseProtocol,
    sslcontext: Any,
    waiter: asyncio.Future[Any],
    server_side: bool,
    server_hostname: str | None,
    handshake_timeout: float | None,
    shutdown_timeout: float | None,
    call_connection_made: bool = True,
) -> Any:
    """asyncio's SSLProtocol with this Python's constructor (None: asyncio's default timeouts)."""
    options: dict[str, Any] = {
        "call_connection_made": call_connection_made,
        "ssl_handshake_timeout": handshake_timeout,
    }
    if HAS_SHUTDOWN_TIMEOUT:
        options["ssl_shutdown_timeout"] = shutdown_timeout
    return SSLProtocol(loop, app_protocol, sslcontext, waiter, server_side, server_hostname, **options)


def tls_transport(
    loop: Any,
    sock: socket.socket,
    protocol: asyncio.BaseProtocol,
    sslcontext: Any,
    waiter: asyncio.Future[Any],
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
    handshake_timeout: float | None = None,
    shutdown_timeout: float | None = None,
    extra: dict[str, Any] | None = None,
    server: Any = None,
    context: contextvars.Context | None = None,
    watch_now: bool = False,
) -> tuple[asyncio.Transport, StreamTransport]:
    """The TLS transport the user's protocol gets over a connected socket, and the raw transport
    under it; the waiter is done when the handshake is (its error if it failed)."""
    loop._ensure_fd_no_transport(sock.fileno())
    tls = ssl_protocol(
        loop, protocol, sslcontext, waiter, server_side, server_hostname, handshake_timeout, shutdown_timeout
    )
    raw = StreamTransport(loop, sock, tls, extra=extra, server=server, context=context, watch_now=watch_now)
    return tls._app_transport, raw


def accept_tls(server: Any, conn: socket.socket, address: Any, protocol: Any, context: contextvars.Context) -> None:
    """A connection the server accepted, served over TLS: the protocol's connection_made comes after
    the handshake; a failed handshake closes the connection and, in debug mode, is told to the
    exception handler, as the standard loop does.  A done callback on the handshake's waiter
    stands in for the standard loop's task per connection."""
    loop = server._loop
    waiter = loop.create_future()
    transport, raw = tls_transport(
        loop,
        conn,
        protocol,
        server._ssl_context,
        waiter,
        server_side=True,
        handshake_timeout=server._ssl_handshake_timeout,
        shutdown_timeout=server._ssl_shutdown_timeout,
        extra={"peername": address},
        server=server,
        context=context,
        watch_now=True,
    )
    limits = server._limits
    if limits is not None:
        raw._linger_timeout = limits.linger_timeout

    def handshake_done(future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            transport.close()
            return
        exc = future.exception()
        if exc is None:
            return
        transport.close()
        if loop.get_debug():
            loop.call_exception_handler(
                {
                    "message": "Error on transport creation for incoming connection",
                    "exception": exc,
                    "protocol": protocol,
                    "transport": transport,
                }
            )

    waiter.add_done_callback(handshake_done)


class TLSCalls:
    """``start_tls`` for AsyncioLoop (the ``ssl=`` of the stream calls is in streams.py)."""

    async def start_tls(
        self,
        transport: asyncio.BaseTransport,
        protocol: asyncio.BaseProtocol,
        sslcontext: Any,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> asyncio.Transport:
        """Upgrade a connection to TLS: the transport's reading is paused until the TLS protocol
        is in place, so bytes already waiting (a ClientHello sent at once) go to TLS, never to the
        old protocol; the old transport is the new one's raw transport from then on."""
        if ssl_shutdown_timeout is not None and not HAS_SHUTDOWN_TIMEOUT:
            raise TypeError("start_tls() got an unexpected keyword argument 'ssl_shutdown_timeout'")
        if ssl is None:
            raise RuntimeError("Python ssl module is not available")
        if not isinstance(sslcontext, ssl.SSLContext):
            raise TypeError(f"sslcontext is expected to be an instance of ssl.SSLContext, got {sslcontext!r}")
        if not getattr(transport, "_start_tls_compatible", False):
            raise TypeError(f"transport {transport!r} is not supported by start_tls()")
        waiter = self.create_future()
        tls = ssl_protocol(
            self,
            protocol,
            sslcontext,
            waiter,
            server_side,
            server_hostname,
            ssl_handshake_timeout,
            ssl_shutdown_timeout,
            call_connection_made=False,
        )
        transport.pause_reading()
        transport.set_protocol(tls)
        made = self.call_soon(tls.connection_made, transport)
        resumed = self.call_soon(transport.resume_reading)
        try:
            await waiter
        except BaseException:
            transport.close()
            made.cancel()
            resumed.cancel()
            raise
        return tls._app_transport
