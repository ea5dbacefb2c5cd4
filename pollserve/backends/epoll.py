"""epoll(7): Linux.  O(ready) per call; the kernel keeps the interest list.

Level-triggered, like the other backends: the loop reads once per wakeup and
relies on being told again while data remains.

Quirks that shape this module:

* epoll watches open file *descriptions*, not fd numbers.  An fd closed while
  registered is removed only once every duplicate of it is closed, so a
  dup()ed fd keeps reporting events for a number we may have reused
  (epoll(7), "Questions and answers": "Will closing a file descriptor cause
  it to be removed from all epoll interest lists?"; h2o pull request #1100).
  Hence the rule the server follows: unregister before close.
* EPOLL_CTL_ADD on a regular file fails with EPERM (epoll_ctl(2)); that error
  is raised to the caller unchanged.
* EPOLLERR and EPOLLHUP are always reported, asked for or not
  (epoll_ctl(2)); they are in read_bits and write_bits, so they mean
  readiness of what was registered and the kernel's list is handed through.
"""

from __future__ import annotations

import contextlib
import select

from .base import READ, WRITE, Backend

_ERROR_BITS = getattr(select, "EPOLLERR", 0x8) | getattr(select, "EPOLLHUP", 0x10)

# READ/WRITE are POLLIN/POLLOUT, which equal EPOLLIN/EPOLLOUT on Linux, so
# masks go to and come from the kernel untranslated.  Checked, not assumed.
_PASS_THROUGH = getattr(select, "EPOLLIN", None) == READ and getattr(select, "EPOLLOUT", None) == WRITE


class EpollBackend(Backend):
    name = "epoll"
    read_bits = READ | _ERROR_BITS
    write_bits = WRITE | _ERROR_BITS

    #: at most this many events per poll(); the rest wait for the next call.  CPython's
    #: epoll.poll() allocates its event array (12 bytes an event) on every call: 42 events (504
    #: bytes) come from the interpreter's own allocator, which serves up to 512 bytes; 64 took
    #: glibc's malloc and free (~100 instructions a call more, callgrind), and 1,023 (its
    #: default) a trip through malloc's bins (~350 more).  epoll_wait(2) hands out a longer
    #: ready list round-robin over the calls.
    max_events = 42

    def __init__(self) -> None:
        super().__init__()
        if not _PASS_THROUGH:
            raise AttributeError("select.epoll is missing or has unexpected constants")
        self._epoll = select.epoll()
        # The loop's path, with no Python frame: epoll.poll takes None (wait forever) or
        # seconds, and max_events as its second positional argument (a keyword would cost a
        # keyword parse per call; left out, it is FD_SETSIZE - 1, CPython's selectmodule.c).
        self.wait = self.kernel_wait = self._epoll.poll
        self.wait_max_events = self.max_events

    def fileno(self) -> int:
        return self._epoll.fileno()

    def register(self, fd: int, events: int) -> None:
        self._add(fd, events)
        try:
            self._epoll.register(fd, events)
        except BaseException:
            del self._interest[fd]
            raise

    def modify(self, fd: int, events: int) -> None:
        old = self._change(fd, events)
        if old != events:
            self._epoll.modify(fd, events)

    def unregister(self, fd: int) -> None:
        self._remove(fd)
        # EBADF/ENOENT: the fd was closed before being unregistered and the
        # kernel already dropped it.  Our own records are now right.
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        if timeout is None:
            timeout = -1
        elif timeout < 0:
            timeout = 0
        return self._epoll.poll(timeout, self.max_events)

    def close(self) -> None:
        super().close()
        self._epoll.close()
