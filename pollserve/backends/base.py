"""The backend interface: one readiness primitive of the operating system.

A backend maps raw file descriptors to an interest mask of READ and WRITE and
reports which of them are ready.  It is deliberately smaller than
``selectors.BaseSelector``: no key objects, no attached data, so ``poll()``
allocates nothing beyond the list of ``(fd, events)`` pairs it returns.

Error and hang-up conditions (``POLLHUP``, ``EPOLLERR``, ``EV_EOF``...) are
reported as readiness of whatever was registered, so the handler's own
``recv()``/``send()`` meets the error and the event loop never needs to know
about them.
"""

from __future__ import annotations

import select
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


def errors_as_interest(
    ready: list[tuple[int, int]], interest: dict[int, int], error_bits: int
) -> list[tuple[int, int]]:
    """Rewrite a poll-style result so error/hang-up bits read as the fd's registered interest.

    Called only when some entry has an error bit, so the common case (no errors)
    returns the kernel's list untouched.
    """
    return [(fd, interest.get(fd, 0) if events & error_bits else events & (READ | WRITE)) for fd, events in ready]


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

    def __init__(self) -> None:
        self._interest: dict[int, int] = {}
        #: how many times poll() returned, and how many (fd, events) pairs in all
        self.polls = 0
        self.events_total = 0
        self._closed = False

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

    def _finish_poll(self, ready: list[tuple[int, int]], error_bits: int) -> list[tuple[int, int]]:
        """Count a poll-style result and turn its error bits into interest (poll, epoll, devpoll)."""
        self.polls += 1
        self.events_total += len(ready)
        for _fd, events in ready:
            if events & error_bits:
                return errors_as_interest(ready, self._interest, error_bits)
        return ready

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

        Returns ``(fd, events)`` pairs; events is a mask of READ and WRITE.
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
