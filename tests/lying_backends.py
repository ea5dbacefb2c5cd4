"""Backends that lie subtly, each in one way, for tests/test_testing_kit.py: the kit must catch them.

Each is the poll backend (or, for capacity, the select backend) with one bug a real backend could
have.  They are importable as MODULE:CLASS with tests/ on the path (no pytest here).
"""

from __future__ import annotations

from pollserve.backends.poll import PollBackend
from pollserve.backends.select import FD_SETSIZE, SelectBackend


class WrongDirection(PollBackend):
    """Reports an fd ready for everything it is registered for as soon as it is ready for anything
    (a loop on it calls the reader of a socket that is only writable)."""

    name = "wrong-direction"

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        return [(fd, self._interest.get(fd, events)) for fd, events in super().poll(timeout)]


class DropsAfterModify(PollBackend):
    """Loses an fd in the kernel when modify() takes a direction away (the connection's path once
    its buffered bytes are sent)."""

    name = "drops-after-modify"

    def modify(self, fd: int, events: int) -> None:
        old = self._change(fd, events)
        if old & ~events:
            self._poller.unregister(fd)
        else:
            self._poller.modify(fd, events)


class ReportsUnregistered(PollBackend):
    """Forgets its record of an fd on unregister() but leaves it in the kernel's set."""

    name = "reports-unregistered"

    def unregister(self, fd: int) -> None:
        self._remove(fd)


class ClaimsOneFdTooMany(SelectBackend):
    """Declares its capacity one too high ("fds up to FD_SETSIZE"): it takes fd FD_SETSIZE, which
    select() cannot watch, and the loop's next wait fails for every fd."""

    name = "claims-one-fd-too-many"
    capacity = FD_SETSIZE + 1


class LetsInTheFdAtCapacity(SelectBackend):
    """Checks fds against its capacity with ``>`` where ``>=`` is meant: fd FD_SETSIZE is taken."""

    name = "lets-in-the-fd-at-capacity"

    def _add(self, fd: int, events: int) -> None:
        if fd == self.capacity:  # what `fd > capacity` lets through
            self._interest[fd] = events
            return
        super()._add(fd, events)
