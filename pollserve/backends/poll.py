"""poll(2): no fd-number limit, still O(n) per call (the whole array is passed in).

READ and WRITE equal POLLIN and POLLOUT, and the error bits are in read_bits
and write_bits, so a result is handed through as the kernel returned it.
"""

from __future__ import annotations

import math
import select
from typing import Any

from .base import READ, WRITE, Backend

# POLLHUP, POLLERR and POLLNVAL are reported even when not asked for (poll(2)).
# They mean "the next recv()/send() will tell you": readiness of what was
# registered, so they are in read_bits and write_bits.
_ERROR_BITS = getattr(select, "POLLHUP", 0x10) | getattr(select, "POLLERR", 0x8) | getattr(select, "POLLNVAL", 0x20)


def _milliseconds(timeout: float | None) -> int | None:
    """poll() and devpoll take milliseconds; round up so a 0.1 ms timer is not a busy loop."""
    if timeout is None:
        return None
    if timeout <= 0:
        return 0
    return math.ceil(timeout * 1000)


class PollBackend(Backend):
    name = "poll"
    read_bits = READ | _ERROR_BITS
    write_bits = WRITE | _ERROR_BITS

    def __init__(self) -> None:
        super().__init__()
        self._poller = self._create()

    @staticmethod
    def _create() -> Any:
        return select.poll()

    def register(self, fd: int, events: int) -> None:
        self._add(fd, events)
        self._poller.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self._change(fd, events)
        self._poller.modify(fd, events)

    def unregister(self, fd: int) -> None:
        self._remove(fd)
        self._poller.unregister(fd)

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        return self._poller.poll(_milliseconds(timeout))

    def close(self) -> None:
        super().close()
        self._poller = None
