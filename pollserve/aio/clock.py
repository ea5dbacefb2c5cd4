"""Timers set while ``loop.time()`` is a clock of its own: patched on the loop (as tests do) or
overridden by a subclass.

The core's heap runs on ``time.monotonic()``; such a timer goes there at the real clock's distance
to its deadline (``AsyncioLoop._arm``), which is right while the other clock keeps time.  A test's
clock does not: it stands still, then jumps (aiohttp's ``test_keepalive_expires_on_time`` sets it to
a deadline and expects the timer in the next pass).  asyncio's loop compares each timer with
``time()`` at every pass; these timers are compared so too, in a heap of their own that the core
looks at after the poll (``EventLoop._own_clock_timers``), only while it holds any.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Any

from ..loop import Handle as CoreHandle

if TYPE_CHECKING:
    from .handles import TimerHandle


class OwnClockTimers:
    """The timers of one loop set by its own clock, by deadline on that clock."""

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, TimerHandle]] = []

    def add(self, timer: TimerHandle) -> None:
        """Watch ``timer`` too; the core checks the heap at each pass from now on."""
        loop = self._loop
        # The core's sequence number just taken by its entry: a timer set in this pass's callbacks
        # waits for the next pass, as the core's own do (_timers_settled).
        heapq.heappush(self._heap, (timer._when, loop._timer_seq, timer))
        loop._own_clock_timers = self.collect_due

    def collect_due(self) -> int:
        """Queue the timers due by ``loop.time()`` at the head of the ready queue, their core entries
        cancelled; how many.  Timers that ran from the core's heap or were cancelled are let go."""
        loop = self._loop
        heap = self._heap
        now = loop.time()
        settled = loop._timers_settled
        due: list[CoreHandle] = []
        later: list[tuple[float, int, TimerHandle]] = []
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            timer = entry[2]
            core = timer._core
            if core is None or timer._cancelled:  # ran already, or cancelled: nothing to do
                continue
            if 0 <= settled < entry[1]:
                later.append(entry)
                continue
            timer._core = None
            core.cancel()
            due.append(CoreHandle(timer._run_from_core, ()))
        for entry in later:
            heapq.heappush(heap, entry)
        if not heap:
            loop._own_clock_timers = None
        due.reverse()
        loop._ready.extendleft(due)
        return len(due)
