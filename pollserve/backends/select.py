"""select(2): everywhere, including Windows, but O(n) per call and bounded.

POSIX select() takes fd_set bit arrays of FD_SETSIZE bits, so an fd number at
or above FD_SETSIZE cannot be watched at all (select(2): "behavior is
undefined"; CPython refuses it with ValueError).  Windows' select() takes
sockets only and CPython builds it with FD_SETSIZE 512, a limit on the *count*
of sockets per set rather than on their numbers (Modules/selectmodule.c).

One closed fd in the sets fails the whole call with EBADF (select(2): "An
invalid file descriptor was given in one of the sets"; WSAENOTSOCK on
Windows), where poll(2) flags just that fd with POLLNVAL.  So, like poll, the
backend reports such an fd as ready for what was registered and the others as
usual; its handler's own recv()/send() then meets EBADF.
"""

from __future__ import annotations

import errno
import select
import sys
import time

from .base import READ, WRITE, Backend, CapacityError

_WINDOWS = sys.platform == "win32"

#: FD_SETSIZE as CPython's select module is compiled with it: 1024 on Linux,
#: macOS and the BSDs (<sys/select.h>), 512 on Windows (selectmodule.c).
FD_SETSIZE = 512 if _WINDOWS else 1024

_WSAENOTSOCK = 10038


def _is_bad_fd(exc: OSError) -> bool:
    return exc.errno == errno.EBADF or getattr(exc, "winerror", None) == _WSAENOTSOCK


def _selectable(fd: int) -> bool:
    try:
        select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return False
    return True


def _select(readers: set[int], writers: set[int], timeout: float | None) -> tuple[list[int], list[int]]:
    """select() on read and write sets; the readable and the writable fds."""
    if _WINDOWS:
        # A failed non-blocking connect() is reported in the "except" set.
        readable, writable, failed = select.select(readers, writers, writers, timeout)
        return readable, list(set(writable).union(failed))
    readable, writable, _ = select.select(readers, writers, (), timeout)
    return readable, writable


class SelectBackend(Backend):
    name = "select"
    capacity = None if _WINDOWS else FD_SETSIZE
    capacity_hint = "use --backend poll or epoll/kqueue, which have no such limit"

    def __init__(self) -> None:
        super().__init__()
        self._readers: set[int] = set()
        self._writers: set[int] = set()

    def register(self, fd: int, events: int) -> None:
        if _WINDOWS and len(self._interest) >= FD_SETSIZE:
            raise CapacityError(
                f"the select backend watches at most {FD_SETSIZE} sockets on Windows; fd {fd} would be one more"
            )
        self._add(fd, events)
        self._apply(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self._change(fd, events)
        self._apply(fd, events)

    def unregister(self, fd: int) -> None:
        self._remove(fd)
        self._readers.discard(fd)
        self._writers.discard(fd)

    def _apply(self, fd: int, events: int) -> None:
        if events & READ:
            self._readers.add(fd)
        else:
            self._readers.discard(fd)
        if events & WRITE:
            self._writers.add(fd)
        else:
            self._writers.discard(fd)

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        if timeout is not None and timeout < 0:
            timeout = 0
        if _WINDOWS and not self._interest:
            # Windows select() fails with WSAEINVAL on three empty sets.
            time.sleep(timeout if timeout is not None else 3600)
            return []
        try:
            readable, writable = _select(self._readers, self._writers, timeout)
            ready = [(fd, READ) for fd in readable]
        except OSError as exc:
            if not _is_bad_fd(exc):
                raise
            ready, readable, writable = self._around_closed_fds()
            ready += [(fd, READ) for fd in readable]
        if writable:
            ready += [(fd, WRITE) for fd in writable]
        return ready

    def _around_closed_fds(self) -> tuple[list[tuple[int, int]], list[int], list[int]]:
        """Find the registered fds that were closed (one probe each: this is the error path),
        report them as ready for what was registered, and select() on the others at once."""
        closed = [fd for fd in self._interest if not _selectable(fd)]
        ready = [(fd, self._interest[fd]) for fd in closed]
        readers = self._readers.difference(closed)
        writers = self._writers.difference(closed)
        if not readers and not writers:
            return ready, [], []
        return ready, *_select(readers, writers, 0)

    def close(self) -> None:
        super().close()
        self._readers.clear()
        self._writers.clear()
