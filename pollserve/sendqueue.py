"""How many bytes a socket's send queue still holds in the kernel: the idle sweep's sign that a
client is reading although no send() of the server's has succeeded for a while.

A client that reads slowly keeps the send buffer full; the backend reports the socket writable
again only once a large part of it has drained (Linux wakes a writer when a third of the buffer
is free, ``sk_stream_wspace >= sk_stream_min_wspace`` in ``include/net/sock.h``), which with an
autotuned multi-megabyte buffer can take longer than the idle timeout.  The queue shrinking
between two looks of the sweep is that client's progress.

Linux: ``ioctl(fd, SIOCOUTQ)`` [tcp(7), unix(7)]: for TCP the bytes sent but not yet
acknowledged plus those not yet sent; for AF_UNIX the bytes the peer has not read.  ``SIOCOUTQ``
has the value of ``TIOCOUTQ`` (``include/uapi/linux/sockios.h``), which the termios module
exposes.  Elsewhere (macOS's ``SO_NWRITE``, FreeBSD's ``FIONWRITE``, none on Windows, see
platform_notes.md) ``unsent_bytes`` returns None, and only the server's own transfers count.
"""

from __future__ import annotations

import struct
import sys

_SIOCOUTQ: int | None = None
if sys.platform.startswith("linux"):
    try:
        import fcntl
        import termios

        _SIOCOUTQ = termios.TIOCOUTQ
        _ioctl = fcntl.ioctl
    except (ImportError, AttributeError):  # a Python built without them
        _SIOCOUTQ = None

_INT = struct.Struct("i")
_ZERO = bytes(_INT.size)


def unsent_bytes(fd: int) -> int | None:
    """The bytes the kernel holds in fd's send queue, or None where this OS cannot say."""
    if _SIOCOUTQ is None:
        return None
    try:
        answer = _ioctl(fd, _SIOCOUTQ, _ZERO)
    except OSError:  # not a socket that has a queue (a listener, a closed fd)
        return None
    value: int = _INT.unpack(answer)[0]
    return value
