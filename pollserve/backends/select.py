"""select(2): everywhere, including Windows, but O(n) per call and bounded.

POSIX select() takes fd_set bit arrays of FD_SETSIZE bits, so an fd number at
or above FD_SETSIZE cannot be watched at all (select(2): "behavior is
undefined"; CPython refuses it with ValueError).  Windows' select() takes
sockets only and CPython builds it with FD_SETSIZE 512, a limit on the *count*
of sockets per set rather than on their numbers (Modules/selectmodule.c).
"""

from __future__ import annotations

import select
import sys
import time

from .base import READ, WRITE, Backend, CapacityError

_WINDOWS = sys.platform == "win32"

#: FD_SETSIZE as CPython's select module is compiled with it: 1024 on Linux,
#: macOS and the BSDs (<sys/select.h>), 512 on Windows (selectmodule.c).
FD_SETSIZE = 512 if _WINDOWS else 1024


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
        if _WINDOWS:
            if not self._interest:
                # Windows select() fails with WSAEINVAL on three empty sets.
                time.sleep(timeout if timeout is not None else 3600)
                self.polls += 1
                return []
            # A failed non-blocking connect() is reported in the "except" set.
            readable, writable, failed = select.select(self._readers, self._writers, self._writers, timeout)
            writable = set(writable).union(failed)
        else:
            readable, writable, _ = select.select(self._readers, self._writers, (), timeout)
        ready = [(fd, READ) for fd in readable]
        if writable:
            ready += [(fd, WRITE) for fd in writable]
        self.polls += 1
        self.events_total += len(ready)
        return ready

    def close(self) -> None:
        super().close()
        self._readers.clear()
        self._writers.clear()
