"""Host and port to addresses, for the connect and listen calls: getaddrinfo in the loop's
executor, skipped for an address that is an IP literal already (as the standard loop skips it),
and the interleaving of families that Happy Eyeballs (RFC 8305) asks for."""

from __future__ import annotations

import itertools
import socket
from typing import Any

#: one getaddrinfo() result: (family, type, proto, canonname, sockaddr)
AddrInfo = tuple[int, int, int, str, Any]

HAS_IPV6 = hasattr(socket, "AF_INET6")


def literal_addrinfo(
    host: Any, port: Any, family: int, type_: int, proto: int, flowinfo: int = 0, scopeid: int = 0
) -> AddrInfo | None:
    """The one getaddrinfo() result for a host that is a numeric IPv4/IPv6 address and a numeric
    port; None when getaddrinfo() is needed (a name, a service name, a zone index)."""
    if host is None or proto not in (0, socket.IPPROTO_TCP, socket.IPPROTO_UDP):
        return None
    if type_ == socket.SOCK_STREAM:
        proto = socket.IPPROTO_TCP
    elif type_ == socket.SOCK_DGRAM:
        proto = socket.IPPROTO_UDP
    else:
        return None
    if port is None or port in (b"", ""):
        port = 0
    else:
        try:
            port = int(port)
        except (TypeError, ValueError):
            return None
    if isinstance(host, bytes):
        host = host.decode("idna")
    if not isinstance(host, str) or "%" in host:  # Linux's inet_pton refuses a zone index
        return None
    families = [family] if family != socket.AF_UNSPEC else [socket.AF_INET] + ([socket.AF_INET6] if HAS_IPV6 else [])
    for af in families:
        try:
            socket.inet_pton(af, host)
        except (OSError, ValueError):
            continue
        if HAS_IPV6 and af == socket.AF_INET6:
            return af, type_, proto, "", (host, port, flowinfo, scopeid)
        return af, type_, proto, "", (host, port)
    return None


async def resolve(
    loop: Any, address: Any, *, family: int = 0, type_: int = socket.SOCK_STREAM, proto: int = 0, flags: int = 0
) -> list[AddrInfo]:
    """``address`` (host, port[, flowinfo, scopeid]) as getaddrinfo() results."""
    host, port = address[:2]
    info = literal_addrinfo(host, port, family, type_, proto, *address[2:])
    if info is not None:
        return [info]
    return list(await loop.getaddrinfo(host, port, family=family, type=type_, proto=proto, flags=flags))


def interleave(infos: list[AddrInfo], first_family_count: int = 1) -> list[AddrInfo]:
    """Alternate the address families, the first family's first ``first_family_count`` first."""
    by_family: dict[int, list[AddrInfo]] = {}
    for info in infos:
        by_family.setdefault(info[0], []).append(info)
    groups = list(by_family.values())
    ordered: list[AddrInfo] = []
    if groups and first_family_count > 1:
        ordered.extend(groups[0][: first_family_count - 1])
        del groups[0][: first_family_count - 1]
    ordered.extend(info for info in itertools.chain.from_iterable(itertools.zip_longest(*groups)) if info is not None)
    return ordered


def set_reuse_port(sock: socket.socket) -> None:
    """SO_REUSEPORT, with the standard loop's ValueError where the OS lacks it or refuses it."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("reuse_port not supported by socket module")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError:
        raise ValueError(
            "reuse_port not supported by socket module, SO_REUSEPORT defined but not implemented."
        ) from None
