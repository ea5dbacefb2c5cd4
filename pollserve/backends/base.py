"""The backend interface: one readiness primitive of the operating system.

A backend maps raw file descriptors to an interest mask of READ and WRITE and
reports which of them are ready.  It is deliberately smaller than
``selectors.BaseSelector``: no key objects, no attached data, so ``poll()``
allocates nothing beyond the list of ``(fd, events)`` pairs it returns -- for
poll, epoll and /dev/poll not even that: the kernel's list is handed through.

Error and hang-up conditions (``POLLHUP``, ``EPOLLERR``, ``EV_EOF``...) are
readiness of whatever was registered, so the handler's own ``recv()``/``send()``
meets the error.  Backends whose kernel reports them as bits of their own say
so in ``read_bits`` and ``write_bits``: a mask with any of ``read_bits`` means
"call the reader", any of ``write_bits`` "call the writer" (a handler that is
not registered is simply not called).  Rewriting every mask in Python to spare
the reader of the result two class attributes cost a pass over each result.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import ClassVar

# READ and WRITE have the values of POLLIN and POLLOUT on every POSIX system
# (and of EPOLLIN/EPOLLOUT on Linux), so the poll and epoll backends can hand
# the kernel's masks through without translating them bit by bit.
READ = getattr(select, "POLLIN", 1)
WRITE = getattr(select, "POLLOUT", 4)


class BackendError(Exception):
    """Base class of every error raised by a backend or the registry."""


class BackendUnavailableError(BackendError):
    """The backend asked for does not exist on this OS (or cannot be created here)."""


class CapacityError(BackendError, ValueError):
    """The fd cannot be watched by this backend (e.g. select's FD_SETSIZE)."""


class AlreadyRegisteredError(BackendError, KeyError):
    """register() for an fd that is already registered: use modify()."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotRegisteredError(BackendError, KeyError):
    """modify() or unregister() for an fd that was never registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _check_events(events: int) -> None:
    if not events or events & ~(READ | WRITE):
        raise ValueError(f"events must be a non-empty mask of READ and WRITE, got {events!r}")


class Backend:
    """Base class of the backends; subclasses implement the five operations.

    The base keeps the registry of interest masks (``self._interest``) because
    every backend needs it: to reject double registration, to compute
    modifications, and to turn an error condition into readiness of what was
    registered.
    """

    #: the name used by ``--backend`` and ``POLLSERVE_BACKEND``
    name: ClassVar[str] = ""
    #: fds must be below this number (select's FD_SETSIZE); None means unbounded
    capacity: ClassVar[int | None] = None
    #: what to suggest when the capacity is exceeded
    capacity_hint: ClassVar[str] = ""
    #: bits of a poll() mask that mean "readable": READ, and the backend's error and hang-up bits
    read_bits: ClassVar[int] = READ
    #: bits of a poll() mask that mean "writable": WRITE, and the backend's error and hang-up bits
    write_bits: ClassVar[int] = WRITE
    #: a plugin that should be tried before the built-ins by ``auto`` says so here; auto takes
    #: it only when the user also names it in POLLSERVE_AUTO_PLUGINS
    auto_candidate: ClassVar[bool] = False

    def __init__(self) -> None:
        self._interest: dict[int, int] = {}
        self._closed = False
        #: the event loop's way in: poll() for a timeout that is None or >= 0, with nothing to
        #: check, so a backend may point it at the kernel call itself (epoll does)
        self.wait: Callable[[float | None], list[tuple[int, int]]] = self.poll
        #: a kernel call that also takes a bound on the events it returns, as its second positional
        #: argument (epoll.poll's maxevents), and that bound.  While ``wait`` is this very call the
        #: loop calls ``kernel_wait(timeout, wait_max_events)``; a subclass that puts its own
        #: ``wait`` in front is called as ``wait(timeout)``, as before.
        self.kernel_wait: Callable[[float | None, int], list[tuple[int, int]]] | None = None
        self.wait_max_events = 0

    @classmethod
    def is_available(cls) -> bool:
        """True if the primitive exists here *and* can be created.

        Like CPython's selectors since bpo-41182: a kernel or sandbox may offer
        the Python function but fail the system call (ENOSYS, EPERM).
        """
        try:
            backend = cls()
        except (OSError, AttributeError, BackendError):
            return False
        backend.close()
        return True

    # -- bookkeeping shared by every backend ---------------------------------

    def __len__(self) -> int:
        """How many fds are registered."""
        return len(self._interest)

    def interest(self, fd: int) -> int:
        """The mask registered for fd, or 0."""
        return self._interest.get(fd, 0)

    def _add(self, fd: int, events: int) -> None:
        _check_events(events)
        if fd < 0:
            raise ValueError(f"invalid file descriptor {fd}")
        if self._closed:
            raise RuntimeError(f"the {self.name} backend is closed")
        if fd in self._interest:
            raise AlreadyRegisteredError(f"fd {fd} is already registered with the {self.name} backend")
        if self.capacity is not None and fd >= self.capacity:
            raise CapacityError(
                f"fd {fd} is beyond the {self.name} backend's capacity "
                f"(fds must be below {self.capacity}); {self.capacity_hint}"
            )
        self._interest[fd] = events

    def _change(self, fd: int, events: int) -> int:
        """Record the new mask and return the old one."""
        _check_events(events)
        try:
            old = self._interest[fd]
        except KeyError:
            raise NotRegisteredError(f"fd {fd} is not registered with the {self.name} backend") from None
        self._interest[fd] = events
        return old

    def _remove(self, fd: int) -> int:
        try:
            return self._interest.pop(fd)
        except KeyError:
            raise NotRegisteredError(f"fd {fd} is not registered with the {self.name} backend") from None

    # -- the interface --------------------------------------------------------

    def register(self, fd: int, events: int) -> None:
        """Start watching fd for events (READ, WRITE or both)."""
        raise NotImplementedError

    def modify(self, fd: int, events: int) -> None:
        """Replace the interest mask of a registered fd."""
        raise NotImplementedError

    def unregister(self, fd: int) -> None:
        """Stop watching fd.  Call it *before* closing the fd."""
        raise NotImplementedError

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        """Wait up to timeout seconds (None: forever, 0: not at all).

        Returns ``(fd, events)`` pairs: ``events & read_bits`` means readable,
        ``events & write_bits`` writable (an error or hang-up sets bits of both).
        An fd may appear twice (once per direction) on backends with one
        filter per direction.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release the kernel object, if any.  Idempotent."""
        self._closed = True
        self._interest.clear()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fds={len(self._interest)} closed={self._closed}>"
