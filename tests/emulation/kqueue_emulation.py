"""EMULATION of select.kqueue / select.kevent on Linux, built on real epoll readiness.

Linux has no kqueue, so pollserve's kqueue backend would otherwise go untested
here.  This is a test double, not a port: it implements exactly the kqueue(2)
semantics the backend relies on, and refuses loudly (NotImplementedError)
whatever else is asked of it.

What it implements, after kqueue(2) (FreeBSD; macOS behaves alike here):

* ``EVFILT_READ`` and ``EVFILT_WRITE`` on fds, level-triggered.
* ``EV_ADD`` adds a knote, or modifies it: "Re-adding an existing event will
  modify the parameters of the original event, and not result in a duplicate
  entry."  An fd that is not open fails with EBADF.
* ``EV_DELETE`` removes it; a knote that does not exist fails with ENOENT, an
  fd that is not open with EBADF.
* Closing an fd removes its knotes: "Calling close() on a file descriptor will
  remove any kevents that reference the descriptor."
* The changelist is applied in order, before waiting.  A change that fails is
  returned in the eventlist "with EV_ERROR set in flags and the system error in
  data" if there is room, otherwise control() raises OSError.  As
  sys/kern/kern_event.c (kqueue_kevent) does, flags of an error entry are
  EV_ERROR alone, and a call that produced errors returns them at once without
  scanning for events.
* ``EV_EOF`` in flags when the peer has shut down writing (EVFILT_READ) or the
  connection is gone (EVFILT_WRITE); for EVFILT_READ, ``data`` is the number
  of bytes still buffered, which may be non-zero alongside EV_EOF.
* ``control(changelist, max_events, timeout)``: None waits forever, 0 polls;
  at most max_events entries; ``close()``; ``closed``; ``fileno()``.

Beyond kqueue: ``inject_error(ident, filter, errno)`` makes the next change for
that knote fail, for errors a test cannot provoke (ENOMEM).

Not emulated (never used by the backend): other filters, EV_ENABLE,
EV_DISABLE, EV_ONESHOT, EV_CLEAR, EV_RECEIPT, udata round trips beyond
copying, the socket error in fflags (reading SO_ERROR would consume it), and
regular files (epoll refuses them with EPERM; kqueue accepts them).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import sys

NAME = "kqueue"

# The values of <sys/event.h> on FreeBSD and macOS.
KQ_FILTER_READ = -1
KQ_FILTER_WRITE = -2
KQ_EV_ADD = 0x0001
KQ_EV_DELETE = 0x0002
KQ_EV_ENABLE = 0x0004
KQ_EV_DISABLE = 0x0008
KQ_EV_ONESHOT = 0x0010
KQ_EV_CLEAR = 0x0020
KQ_EV_EOF = 0x8000
KQ_EV_ERROR = 0x4000

CONSTANTS = {name: value for name, value in globals().items() if name.startswith("KQ_")}

_EPOLL = getattr(select, "epoll", None)
_READ_BITS = getattr(select, "EPOLLIN", 0) | getattr(select, "EPOLLRDHUP", 0)
_READ_READY = _READ_BITS | getattr(select, "EPOLLHUP", 0) | getattr(select, "EPOLLERR", 0)
_WRITE_READY = getattr(select, "EPOLLOUT", 0) | getattr(select, "EPOLLHUP", 0) | getattr(select, "EPOLLERR", 0)
_READ_EOF = getattr(select, "EPOLLRDHUP", 0) | getattr(select, "EPOLLHUP", 0)
_WRITE_EOF = getattr(select, "EPOLLHUP", 0) | getattr(select, "EPOLLERR", 0)


def _fileno(ident) -> int:
    return ident if isinstance(ident, int) else ident.fileno()


class EmulatedKevent:
    """select.kevent (EMULATED): the fields of struct kevent."""

    __slots__ = ("data", "fflags", "filter", "flags", "ident", "udata")

    def __init__(self, ident, filter=KQ_FILTER_READ, flags=KQ_EV_ADD, fflags=0, data=0, udata=0) -> None:
        self.ident = _fileno(ident)
        self.filter = filter
        self.flags = flags
        self.fflags = fflags
        self.data = data
        self.udata = udata

    def _key(self) -> tuple:
        return (self.ident, self.filter, self.flags, self.fflags, self.data, self.udata)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EmulatedKevent) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"<select.kevent (emulated) ident={self.ident} filter={self.filter} flags={self.flags:#x} "
            f"fflags={self.fflags:#x} data={self.data:#x} udata={self.udata:#x}>"
        )


def _identity(fd: int) -> tuple[int, int] | None:
    """What the fd number refers to now, or None if it is not open."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _bytes_buffered(fd: int) -> int:
    import fcntl
    import termios

    try:
        return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4), sys.byteorder)
    except OSError:  # a listening socket, say
        return 0


class EmulatedKqueue:
    """select.kqueue (EMULATED on epoll)."""

    def __init__(self) -> None:
        if _EPOLL is None:
            raise OSError(errno.ENOSYS, "kqueue emulation needs epoll (Linux)")
        self._epoll = _EPOLL()
        #: fd -> (what it referred to when added, its filters)
        self._knotes: dict[int, tuple[tuple[int, int], set[int]]] = {}
        #: (ident, filter) -> errno the next change for it fails with (inject_error)
        self._injected: dict[tuple[int, int], int] = {}
        self.closed = False

    def inject_error(self, ident: int, filter: int, error: int) -> None:
        """Fail the next change for (ident, filter) with error, leaving the knotes as they were.

        For the failures a test cannot provoke on demand, such as kqueue(2)'s ENOMEM: "The
        kernel failed to allocate enough memory for the kernel queue."
        """
        self._injected[(_fileno(ident), filter)] = error

    def fileno(self) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed kqueue object")
        return self._epoll.fileno()

    @classmethod
    def fromfd(cls, fd: int):
        raise NotImplementedError("kqueue emulation: fromfd is not emulated")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._epoll.close()
            self._knotes.clear()

    # -- changes ------------------------------------------------------------------

    def _forget_closed_fds(self) -> None:
        """close() removes an fd's knotes: drop those whose fd no longer refers to the same file."""
        for fd, (identity, _) in list(self._knotes.items()):
            if _identity(fd) != identity:
                del self._knotes[fd]
                with contextlib.suppress(OSError):  # epoll dropped it with the last reference
                    self._epoll.unregister(fd)

    def _apply(self, change: EmulatedKevent) -> int:
        """Apply one change; return 0 or the errno kevent() would report for it."""
        if change.filter not in (KQ_FILTER_READ, KQ_FILTER_WRITE):
            raise NotImplementedError(f"kqueue emulation: filter {change.filter} is not emulated")
        action = change.flags & (KQ_EV_ADD | KQ_EV_DELETE)
        if change.flags & ~(KQ_EV_ADD | KQ_EV_DELETE) or action not in (KQ_EV_ADD, KQ_EV_DELETE):
            raise NotImplementedError(f"kqueue emulation: flags {change.flags:#x} are not emulated")
        fd = change.ident
        injected = self._injected.pop((fd, change.filter), 0)
        if injected:
            return injected
        identity = _identity(fd)
        if identity is None:
            return errno.EBADF
        _, filters = self._knotes.get(fd, (identity, set()))
        had = set(filters)
        if action == KQ_EV_ADD:
            filters.add(change.filter)
        elif change.filter in filters:
            filters.discard(change.filter)
        else:
            return errno.ENOENT
        self._sync_epoll(fd, had, filters)
        if filters:
            self._knotes[fd] = (identity, filters)
        else:
            self._knotes.pop(fd, None)
        return 0

    def _sync_epoll(self, fd: int, had: set[int], filters: set[int]) -> None:
        mask = (_READ_BITS if KQ_FILTER_READ in filters else 0) | (select.EPOLLOUT if KQ_FILTER_WRITE in filters else 0)
        if not had:
            try:
                self._epoll.register(fd, mask)
            except PermissionError:
                raise NotImplementedError("kqueue emulation: regular files are not emulated") from None
        elif mask:
            self._epoll.modify(fd, mask)
        else:
            self._epoll.unregister(fd)

    # -- the system call ------------------------------------------------------------

    def control(self, changelist, max_events: int, timeout: float | None = None) -> list[EmulatedKevent]:
        if self.closed:
            raise ValueError("I/O operation on closed kqueue object")
        if max_events < 0:
            raise ValueError(f"Length of eventlist must be 0 or positive, got {max_events}")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be positive or None, got {timeout}")
        self._forget_closed_fds()
        errors: list[EmulatedKevent] = []
        for change in changelist or ():
            if not isinstance(change, EmulatedKevent):
                raise TypeError("changelist must be an iterable of select.kevent objects")
            error = self._apply(change)
            if error:
                if len(errors) >= max_events:
                    raise OSError(error, os.strerror(error))
                errors.append(EmulatedKevent(change.ident, change.filter, KQ_EV_ERROR, 0, error, change.udata))
        if errors:
            return errors  # kern_event.c: errors come back at once, without waiting for events
        if max_events == 0:
            return []
        ready = self._epoll.poll(-1 if timeout is None else timeout, max(1, max_events))
        events: list[EmulatedKevent] = []
        for fd, mask in ready:
            _, filters = self._knotes.get(fd, (None, set()))
            if KQ_FILTER_READ in filters and mask & _READ_READY:
                flags = KQ_EV_EOF if mask & _READ_EOF else 0
                events.append(EmulatedKevent(fd, KQ_FILTER_READ, flags, 0, _bytes_buffered(fd)))
            if KQ_FILTER_WRITE in filters and mask & _WRITE_READY:
                flags = KQ_EV_EOF if mask & _WRITE_EOF else 0
                events.append(EmulatedKevent(fd, KQ_FILTER_WRITE, flags, 0, 0))
        # Level-triggered: what does not fit now is reported by the next call.
        return events[:max_events]

    def __repr__(self) -> str:
        return f"<select.kqueue (emulated on epoll) closed={self.closed}>"


def install() -> None:
    """Put the emulation into the select module, where pollserve's kqueue backend looks."""
    if hasattr(select, "kqueue") and select.kqueue is not EmulatedKqueue:
        raise RuntimeError("this system has a real kqueue; the emulation will not shadow it")
    if _EPOLL is None:
        raise RuntimeError("the kqueue emulation needs epoll (Linux)")
    select.kqueue = EmulatedKqueue
    select.kevent = EmulatedKevent
    for name, value in CONSTANTS.items():
        setattr(select, name, value)
