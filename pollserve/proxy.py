"""The PROXY protocol (HAProxy's, versions 1 and 2) as a layer in front of the app.

A balancer that relays TCP connects to us from its own address; with ``send-proxy``
(v1, a text line) or ``send-proxy-v2`` (binary) it first sends a header naming the
real client.  ``parse_header`` reads that header from bytes and nothing else, so its
tests feed bytes.  ``ProxyLayer`` is the protocol the server runs for a connection
until the header is complete: it buffers, parses, then hands the connection to the
app (``Connection.set_protocol``, as asyncio's transports do) with a transport whose
``get_extra_info("peername")`` and ``("sockname")`` are the addresses the header
gave, and from then on takes no part.  It is stacked at accept time, by
``ProxyLayerFactory``, only when the server is configured for it: a server without
it pays nothing.

The specification: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
(section numbers below refer to it).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

from .apps import LayeredTransport, Protocol, ProtocolFactory, Transport
from .listeners import format_address
from .rates import EpisodeLog

if TYPE_CHECKING:
    from .loop import EventLoop, Handle
    from .server import Connection

log = logging.getLogger("pollserve")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: section 2.1: the longest v1 line, CRLF included ("PROXY UNKNOWN" with two full IPv6 addresses)
V1_MAX_LENGTH = 107
V1_PREFIX = b"PROXY "
#: section 2.2: the 12 bytes every v2 header starts with
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: signature, version and command, family and transport, 16-bit length
V2_FIXED_LENGTH = 16
#: the most address and TLV bytes a v2 header may announce here.  The field allows 65535; the
#: addresses take at most 216 bytes (AF_UNIX) and HAProxy's TLVs (ALPN, authority, unique id of at
#: most 128 bytes, SSL details) a few hundred more.  A larger claim is refused before it is read.
V2_MAX_LENGTH = 4096
#: a connection whose header is not complete by then is closed.  Section 1 asks for at least
#: 3 seconds, to cover a TCP retransmission; a balancer sends the header at once.
HEADER_TIMEOUT = 5.0

# Section 2.2: the 13th byte is the version (high nibble, always 2) and the command (low nibble).
_V2_LOCAL = 0x0
_V2_PROXY = 0x1
# The 14th byte: address family (high nibble) and transport (low nibble, 1 STREAM, 2 DGRAM),
# with the size of the address block each family needs.
_V2_FAMILIES = {0x1: (socket.AF_INET, 12), 0x2: (socket.AF_INET6, 36), 0x3: (socket.AF_UNIX, 216)}
_V2_TRANSPORTS = (0x0, 0x1, 0x2)
# Section 2.1: ports are decimal in 0..65535 without leading zeroes.
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


class BadHeader(ValueError):
    """The bytes are not a PROXY header this server accepts; the message says why."""


@dataclasses.dataclass(frozen=True)
class ProxyHeader:
    """A parsed PROXY header.

    ``source`` and ``destination`` are shaped as ``getpeername()`` returns them for the
    family: ``(host, port)``, ``(host, port, 0, 0)`` or a path.  They are None when the
    header asks for the connection's own addresses: a v2 LOCAL command (the balancer's
    own connection, a health check), v1 UNKNOWN, or a v2 block of an unspecified family.
    """

    version: int
    #: the v2 LOCAL command: the balancer made this connection itself
    local: bool
    family: socket.AddressFamily
    source: Any
    destination: Any
    #: bytes the header took on the wire: the app's data starts after them
    length: int
    #: v2: the type-length-value vectors after the addresses, unparsed (section 2.2)
    tlvs: bytes = b""


def parse_header(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """The PROXY header at the start of ``data``, or None while more bytes are needed.

    Raises BadHeader as soon as the bytes cannot be the start of a valid header,
    so a client that is not a balancer is refused after its first bytes.
    """
    if not data:
        return None
    first = data[0]
    if first == V1_PREFIX[0]:
        return _parse_v1(data)
    if first == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise BadHeader("neither a PROXY v1 line nor a v2 signature")


def _parse_v1(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    window = bytes(data[:V1_MAX_LENGTH])
    if not window.startswith(V1_PREFIX):
        if V1_PREFIX.startswith(window):
            return None
        raise BadHeader("a v1 header starts with 'PROXY '")
    # Section 2.1: only CRLF ends the line; a lone CR or LF is invalid, and so is a line
    # without CRLF in its first 107 bytes.
    cr, lf = window.find(b"\r"), window.find(b"\n")
    if lf >= 0 and lf != cr + 1:
        raise BadHeader("a v1 line ends with CRLF, not a lone LF")
    if cr < 0 or cr + 1 == len(window):
        if len(window) == V1_MAX_LENGTH:
            raise BadHeader(f"no CRLF in the first {V1_MAX_LENGTH} bytes of a v1 line")
        return None
    if window[cr + 1] != 0x0A:
        raise BadHeader("a v1 line ends with CRLF, not a lone CR")
    line, length = window[:cr], cr + 2
    # "UNKNOWN": the receiver must ignore the rest of the line and use the real addresses.
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        return ProxyHeader(1, False, socket.AF_UNSPEC, None, None, length)
    fields = line.split(b" ")
    if len(fields) != 6:
        raise BadHeader("a v1 line is PROXY, protocol, 2 addresses and 2 ports, each after one space")
    _, protocol, source, destination, source_port, destination_port = fields
    if protocol == b"TCP4":
        family = socket.AF_INET
    elif protocol == b"TCP6":
        family = socket.AF_INET6
    else:
        raise BadHeader(f"unknown v1 protocol {protocol[:8]!r} (TCP4, TCP6 or UNKNOWN)")
    return ProxyHeader(
        1,
        False,
        family,
        _v1_address(family, source, source_port),
        _v1_address(family, destination, destination_port),
        length,
    )


def _v1_address(family: socket.AddressFamily, host: bytes, port: bytes) -> tuple[Any, ...]:
    if not _V1_PORT.fullmatch(port) or int(port) > 65535:
        raise BadHeader(f"bad port {port[:8]!r} in a v1 line")
    try:
        text = host.decode("ascii")
        # ipaddress refuses leading zeroes in IPv4 (section 2.1 forbids them too) but takes an
        # IPv6 scope ("fe80::1%eth0"), which is no part of an address on the wire.
        if family == socket.AF_INET:
            return (str(ipaddress.IPv4Address(text)), int(port))
        if "%" in text:
            raise ValueError("a scope")
        return (_ntop(socket.AF_INET6, ipaddress.IPv6Address(text).packed), int(port), 0, 0)
    except ValueError:
        kind = "IPv4" if family == socket.AF_INET else "IPv6"
        raise BadHeader(f"{host[:48]!r} is not an {kind} address") from None


def _parse_v2(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    fixed = bytes(data[:V2_FIXED_LENGTH])
    if not V2_SIGNATURE.startswith(fixed[: len(V2_SIGNATURE)]):
        raise BadHeader("not the v2 signature")
    # Each byte is checked as soon as it is in, so a bad header is refused without waiting.
    local = False
    if len(fixed) > 12:
        version, command = fixed[12] >> 4, fixed[12] & 0xF
        if version != 2:
            raise BadHeader(f"v2 signature with version {version}, not 2")
        if command not in (_V2_LOCAL, _V2_PROXY):
            raise BadHeader(f"unknown v2 command {command}")  # section 2.2: drop the connection
        local = command == _V2_LOCAL
    # LOCAL: "discard the protocol block including the family which is ignored".
    if len(fixed) > 13 and not local:
        family_code, transport = fixed[13] >> 4, fixed[13] & 0xF
        if (family_code != 0 and family_code not in _V2_FAMILIES) or transport not in _V2_TRANSPORTS:
            raise BadHeader(f"unknown v2 family and transport 0x{fixed[13]:02x}")
    if len(fixed) < V2_FIXED_LENGTH:
        return None
    block_length = int.from_bytes(fixed[14:16], "big")
    if block_length > V2_MAX_LENGTH:
        raise BadHeader(f"v2 header announces {block_length} bytes, more than the {V2_MAX_LENGTH} allowed here")
    length = V2_FIXED_LENGTH + block_length
    if len(data) < length:
        return None
    if local:
        return ProxyHeader(2, True, socket.AF_UNSPEC, None, None, length)
    family_code, transport = fixed[13] >> 4, fixed[13] & 0xF
    if family_code == 0 or transport == 0:
        # AF_UNSPEC or an unspecified transport: the receiver may use the real addresses.
        return ProxyHeader(2, False, socket.AF_UNSPEC, None, None, length)
    family, needed = _V2_FAMILIES[family_code]
    if block_length < needed:
        raise BadHeader(f"v2 {family.name} addresses need {needed} bytes, the header has {block_length}")
    block = bytes(data[V2_FIXED_LENGTH:length])
    source: Any
    destination: Any
    if family == socket.AF_UNIX:
        source, destination = _unix_path(block[:108]), _unix_path(block[108:216])
    else:
        size = 4 if family == socket.AF_INET else 16
        hosts = [_ntop(family, block[i * size : (i + 1) * size]) for i in (0, 1)]
        ports = [int.from_bytes(block[2 * size + 2 * i : 2 * size + 2 * i + 2], "big") for i in (0, 1)]
        extra = () if family == socket.AF_INET else (0, 0)  # getpeername()'s flowinfo and scope id
        source, destination = (hosts[0], ports[0], *extra), (hosts[1], ports[1], *extra)
    return ProxyHeader(2, False, family, source, destination, length, block[needed:])


def _ntop(family: socket.AddressFamily, packed: bytes) -> str:
    """An address as getpeername() spells it: inet_ntop's, which writes an IPv4-mapped IPv6
    address as ``::ffff:192.0.2.1`` where ipaddress (before Python 3.13) writes ``::ffff:c000:201``."""
    return socket.inet_ntop(family, packed)


def _unix_path(raw: bytes) -> str | bytes:
    """As getpeername() gives it: a path up to its NUL, or an abstract name (Linux) as bytes."""
    if raw.startswith(b"\0"):
        return raw.rstrip(b"\0")
    return os.fsdecode(raw.split(b"\0", 1)[0])


def parse_networks(text: str) -> tuple[Network, ...]:
    """``10.0.0.0/8,::1`` as networks; ValueError says which item is not one."""
    networks = []
    for item in text.split(","):
        item = item.strip()
        try:
            networks.append(ipaddress.ip_network(item))  # strict: "10.0.0.1/8" is a typo, not a network
        except ValueError as exc:
            raise ValueError(f"{item!r} is not a network such as 10.0.0.0/8 or ::1 ({exc})") from None
    return tuple(networks)


class ProxiedTransport(LayeredTransport):
    """What the app behind the layer is handed: its connection, with the client's addresses.

    ``get_extra_info("proxy_header")`` is the ProxyHeader; ``socket`` still reaches the
    real socket, whose peer is the balancer.
    """

    __slots__ = ("_header",)

    def __init__(self, connection: Connection, header: ProxyHeader) -> None:
        super().__init__(connection)
        self._header = header

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        header = self._header
        if name == "peername" and header.source is not None:
            return header.source
        if name == "sockname" and header.destination is not None:
            return header.destination
        if name == "proxy_header":
            return header
        return self._below.get_extra_info(name, default)

    def __repr__(self) -> str:
        return f"<ProxiedTransport for {format_address(self.get_extra_info('peername'))} via {self._below!r}>"


class ProxyLayerFactory:
    """Makes each accepted connection's protocol: the app's, behind a ProxyLayer.

    ``allowed`` networks (--proxy-from) may send a header; any other peer is closed at
    once.  AF_UNIX peers are not addresses: the socket file's permissions decide who
    connects there.  Closes are counted (``headers_rejected``, ``peers_refused``) and
    logged by episode, not per connection.
    """

    def __init__(
        self,
        app_factory: ProtocolFactory,
        loop: EventLoop,
        *,
        allowed: Iterable[Network] = (),
        timeout: float = HEADER_TIMEOUT,
        name: str = "app",
    ) -> None:
        self.app_factory = app_factory
        self.allowed = tuple(allowed)
        self.timeout = timeout
        self.headers_rejected = 0
        self.peers_refused = 0
        self._bad_headers = EpisodeLog(log, loop, f"{name}: connections closed for a bad or missing PROXY header")
        self._outsiders = EpisodeLog(log, loop, f"{name}: connections closed from peers outside --proxy-from")
        self._trace = log.isEnabledFor(logging.DEBUG)
        self._name = name

    def __call__(self) -> Protocol:
        app = self.app_factory()
        if not (hasattr(app, "connection_made") and hasattr(app, "data_received")):
            return app  # not a protocol: the server refuses it and says why, as without the layer
        return ProxyLayer(app, self)

    def may_send(self, peername: Any) -> bool:
        if not self.allowed or not isinstance(peername, tuple):
            return True
        try:
            address = ipaddress.ip_address(str(peername[0]).split("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
        return any(address in network for network in self.allowed)

    def close(self) -> None:
        """Stop the episode timers (the loop is closing)."""
        self._bad_headers.close()
        self._outsiders.close()


class ProxyLayer(Protocol):
    """One connection until its PROXY header is complete; then the app's, and out of the way.

    The spec lets a receiver refuse a header that does not come in one read (sections 2.1 and
    2.2), but TCP may split it anyway: this one waits for the rest, bounded in size by the
    parser and in time by ``timeout``.
    """

    def __init__(self, app: Protocol, factory: ProxyLayerFactory) -> None:
        self.app = app
        self.factory = factory
        self._buffer = bytearray()
        self._timer: Handle | None = None

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        factory = self.factory
        peername = transport.get_extra_info("peername")
        if not factory.may_send(peername):
            factory.peers_refused += 1
            factory._outsiders.event(f"{format_address(peername)} may not send a PROXY header")
            self._refuse("the peer is outside --proxy-from")
            return
        self._timer = transport.get_extra_info("loop").call_later(factory.timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        try:
            header = parse_header(buffer)
        except BadHeader as exc:
            self._reject(f"from {self._peer()}: {exc}")
            self._refuse(f"bad PROXY header: {exc}")
            return
        if header is not None:
            self._step_aside(header, bytes(buffer[header.length :]))

    def _step_aside(self, header: ProxyHeader, rest: bytes) -> None:
        """Hand the connection to the app: later events reach it with no layer between."""
        self._cancel_timer()
        self._buffer = bytearray()
        connection = cast("Connection", self.transport)
        transport = ProxiedTransport(connection, header)
        if self.factory._trace:
            client = "itself" if header.source is None else format_address(header.source)
            log.debug("%s: %s sent a PROXY v%d header for %s", self.factory._name, self._peer(), header.version, client)
        connection.set_protocol(self.app)
        self.app.connection_made(transport)
        # Bytes that came with the header are the app's first chunk, held back while the app
        # does not read (it may pause in connection_made: nothing until resume_reading()).
        connection._unread(rest)

    def eof_received(self) -> bool | None:
        self._cancel_timer()
        if self._buffer:  # a client that connects and leaves without a byte is no one's mistake
            self._reject(f"from {self._peer()}: the connection ended {len(self._buffer)} bytes into the header")
        return None  # the connection closes

    def connection_lost(self, exc: Exception | None) -> None:
        # The app never saw this connection, so it is not told of its end.
        self._cancel_timer()

    def _timed_out(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self._reject(
                f"from {self._peer()}: not complete within {self.factory.timeout:g} s "
                f"({len(self._buffer)} bytes received)"
            )
            self._refuse(f"no whole PROXY header within {self.factory.timeout:g} s")

    def _reject(self, reason: str) -> None:
        self._cancel_timer()
        self.factory.headers_rejected += 1
        self.factory._bad_headers.event(reason)

    def _refuse(self, why: str) -> None:
        """Close a connection the app never saw: a close the server decides on, so that the debug
        log's closing line gives this reason and not "closed by the app"."""
        cast("Connection", self.transport)._server_close(f"refused by the PROXY layer: {why}")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _peer(self) -> str:
        return format_address(self.transport.get_extra_info("peername"))
