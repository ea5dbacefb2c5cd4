"""Backends that lie subtly, each in one way, for tests/test_testing_kit.py: the kit must catch them.

Each is the poll backend with one bug a real backend could have.  They are
importable as MODULE:CLASS with tests/ on the path (no pytest here).
"""

from __future__ import annotations

from pollserve.backends.poll import PollBackend


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
