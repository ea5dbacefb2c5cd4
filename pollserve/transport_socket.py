"""TransportSocket: the socket a transport hands out, without the calls that would break it.

A protocol that closes, reads or writes the socket under its transport breaks the
loop's bookkeeping: a closed fd still registered makes select() fail with EBADF,
and epoll and kqueue silently forget it, leaving the connection without events.
So ``get_extra_info("socket")`` returns this view, as asyncio's transports have
done since Python 3.8 (asyncio.trsock.TransportSocket): options and addresses
can be read and set, the socket cannot be closed, detached, read or written.
"""

from __future__ import annotations

import socket
from typing import Any


class TransportSocket:
    """A restricted view of a connection's socket."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @property
    def family(self) -> int:
        return self._sock.family

    @property
    def type(self) -> int:
        return self._sock.type

    @property
    def proto(self) -> int:
        return self._sock.proto

    def fileno(self) -> int:
        return self._sock.fileno()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getsockopt(self, *args: Any) -> Any:
        return self._sock.getsockopt(*args)

    def setsockopt(self, *args: Any) -> None:
        self._sock.setsockopt(*args)

    def getblocking(self) -> bool:
        return self._sock.getblocking()

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def __repr__(self) -> str:
        return f"<pollserve.TransportSocket fd={self.fileno()} family={self.family!s} type={self.type!s}>"
