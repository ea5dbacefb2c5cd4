"""EMULATION of select.devpoll (Solaris /dev/poll) on Linux, built on real poll().

A test double implementing the semantics CPython documents for devpoll objects
(docs.python.org, select, "/dev/poll Polling Objects") that pollserve's devpoll
backend relies on:

* ``register(fd, eventmask)``; registering an fd that is already registered
  "is not an error, but the result is undefined" -- the emulation raises, so
  a backend that relied on it would fail here instead of on Solaris;
* ``modify(fd, eventmask)``: "an unregister() followed by a register()";
* ``unregister(fd)``: "Attempting to remove a file descriptor that was never
  registered is safely ignored";
* ``poll(timeout)`` in milliseconds, None or -1 blocking; results are
  ``(fd, event)`` pairs with POLLHUP/POLLERR/POLLNVAL reported unasked, as
  poll(7d) does;
* ``close()``, ``closed``, ``fileno()`` (an fd of its own, as /dev/poll is).
"""

from __future__ import annotations

import os
import select

NAME = "devpoll"

_POLL = getattr(select, "poll", None)
#: devpoll's default event mask, as CPython's (POLLIN | POLLPRI | POLLOUT)
_DEFAULT_MASK = getattr(select, "POLLIN", 1) | getattr(select, "POLLPRI", 2) | getattr(select, "POLLOUT", 4)


class EmulatedDevpoll:
    """select.devpoll (EMULATED on poll)."""

    def __init__(self) -> None:
        if _POLL is None:
            raise OSError("devpoll emulation needs poll()")
        self._poll = _POLL()
        self._registered: set[int] = set()
        self._fd = os.open(os.devnull, os.O_RDONLY)  # stands for the open /dev/poll
        self.closed = False

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed devpoll object")

    @staticmethod
    def _fileno(fd) -> int:
        return fd if isinstance(fd, int) else fd.fileno()

    def fileno(self) -> int:
        self._check_open()
        return self._fd

    def register(self, fd, eventmask: int = _DEFAULT_MASK) -> None:
        self._check_open()
        fd = self._fileno(fd)
        if fd in self._registered:
            raise AssertionError("devpoll emulation: registering a registered fd is undefined on /dev/poll")
        self._poll.register(fd, eventmask)
        self._registered.add(fd)

    def modify(self, fd, eventmask: int = _DEFAULT_MASK) -> None:
        self._check_open()
        fd = self._fileno(fd)
        self.unregister(fd)
        self.register(fd, eventmask)

    def unregister(self, fd) -> None:
        self._check_open()
        fd = self._fileno(fd)
        if fd in self._registered:
            self._registered.discard(fd)
            self._poll.unregister(fd)

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        self._check_open()
        if timeout is not None and timeout < 0:
            timeout = None
        return self._poll.poll(timeout)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"<select.devpoll (emulated on poll) closed={self.closed}>"


def install() -> None:
    """Put the emulation into the select module, where pollserve's devpoll backend looks."""
    if hasattr(select, "devpoll") and select.devpoll is not EmulatedDevpoll:
        raise RuntimeError("this system has a real /dev/poll; the emulation will not shadow it")
    if _POLL is None:
        raise RuntimeError("the devpoll emulation needs poll()")
    select.devpoll = EmulatedDevpoll
