"""What the public API takes: the argument types asyncio takes, checked once where they come in.

The compiled build checks every annotation at run time, so an ``int`` parameter refuses the
``65536.0`` that the pure build and asyncio take (asyncio's ``set_write_buffer_limits(1e6)``).
The public signatures therefore declare the wide type -- ``float`` for a size or a limit (ints
are floats to the type checker, and the compiled build converts them), any iterable of hosts or
sockets -- and turn the value into the narrow one here, before anything stores it.  A value that
no reading makes sense of is a ValueError or a TypeError naming the argument, in both builds
alike.  Nothing here is on the per-request path.
"""

from __future__ import annotations

import math
import socket
import sys
from collections.abc import Iterable


def size(value: object, name: str) -> int:
    """A size in bytes or a count: an int, or a float rounded down; infinity means no bound at
    all (sys.maxsize, which nothing reaches).  Messages write numbers with ``g``: the compiled
    build hands a float parameter's int over as a float, and -1 must read the same in both."""
    number = _number(value, name)
    if number < 0:
        raise ValueError(f"{name} must not be negative, got {number:g}")
    if isinstance(number, float):
        return sys.maxsize if math.isinf(number) else math.floor(number)
    return int(number)  # a bool is an int, as for asyncio; stored as a plain one


def optional_size(value: object, name: str) -> int | None:
    return None if value is None else size(value, name)


def water_marks(high: object, low: object, default_high: int, names: tuple[str, str]) -> tuple[int, int]:
    """(high, low) backpressure marks as asyncio's transports set them: high defaults to four
    times low if only low is given, else ``default_high``; low to a quarter of high."""
    high_name, low_name = names
    low_given = optional_size(low, low_name)
    if high is not None:
        high_mark = size(high, high_name)
    elif low_given is not None:
        high_mark = 4 * low_given
    else:
        high_mark = default_high
    low_mark = high_mark // 4 if low_given is None else low_given
    if low_mark > high_mark:
        raise ValueError(f"{low_name} {low_mark} is above {high_name} {high_mark}")
    return high_mark, low_mark


def seconds(value: object, name: str) -> float:
    """A finite, non-negative number of seconds."""
    number = _number(value, name)
    if number < 0:
        raise ValueError(f"{name} must be a finite number of seconds, not negative: {number:g}")
    if math.isinf(number):
        raise ValueError(f"{name} must be a finite number of seconds, not {number:g}")
    return float(number)


def _number(value: object, name: str) -> int | float:
    if not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be an int or a float, not {type(value).__name__}")
    if isinstance(value, float) and math.isnan(value):
        raise ValueError(f"{name} must be a number, got nan")
    return value


def port(value: object) -> int:
    """A TCP port as asyncio takes it: an int, a service name or digits, or None for any (0)."""
    if value is None:
        return 0
    if isinstance(value, str):
        if value.isdigit():
            number = int(value)
        else:
            try:
                number = socket.getservbyname(value, "tcp")
            except OSError:
                raise ValueError(f"port {value!r} is no TCP service name this host knows") from None
    elif isinstance(value, int):
        number = int(value)
    else:
        raise TypeError(f"port must be an int or a service name, not {type(value).__name__}")
    if not 0 <= number <= 65535:
        raise ValueError(f"port must be 0-65535, got {number}")
    return number


def hosts(value: object) -> str | list[str] | None:
    """A host as asyncio's create_server takes it: a str, None or "" for every interface, or an
    iterable of them (a tuple, a generator...), read once into a list."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, Iterable):
        raise TypeError(f"host must be a str or an iterable of str, not {type(value).__name__}")
    names = list(value)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"host must be a str or an iterable of str, not {type(name).__name__} in it")
    return names


def stream_sockets(value: object) -> list[socket.socket]:
    """Listening sockets as ``start()`` takes them: one socket (asyncio's ``sock``) or any
    iterable of them, each a stream socket."""
    candidates = [value] if isinstance(value, socket.socket) else value
    if not isinstance(candidates, Iterable) or isinstance(candidates, (str, bytes)):
        raise TypeError(f"start() takes sockets, not {type(value).__name__}")
    found = list(candidates)
    for sock in found:
        if not isinstance(sock, socket.socket):
            raise TypeError(f"start() takes sockets, not {type(sock).__name__}")
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"start() takes stream sockets (SOCK_STREAM), not {sock.type!r}")
    return found
