"""Loop health: utilization, lag and slow callbacks, over a fixed recent window.

Node.js is the model: ``performance.eventLoopUtilization()`` (the share of time
the loop is not idle in the poller) and ``monitorEventLoopDelay()`` (how late
a timer fires).  The loop itself only sums its busy seconds and names a slow
handler (loop.py); this module turns those into figures:

- utilization: busy seconds over wall seconds in the last ``WINDOW`` seconds,
  from a reading of the loop's busy total at every probe tick;
- lag: a probe timer due every ``PROBE_PERIOD`` seconds records how late it
  runs.  Its ticks are at fixed times, and a tick missed while the loop was
  held counts as late as it was (a loop held 300 ms makes the ticks inside
  that time 300, 200 and 100 ms late), so the figures are those of a timer
  due at any moment, not only of the ones that happened to fire.  An idle
  server reports the true small lateness of its wakeups.  The histogram since
  start counts every tick a stall missed, however long it was; the window's
  figures, the ticks due within the window;
- slow callbacks: counted, logged in episodes (rates.EpisodeLog), and the
  slowest of the window kept with its name and its own time;
- slow passes, of several handlers the loop did not time one by one: counted
  and logged apart, with the pass's time and the handlers' names.  None of
  them is the slowest callback: which of them held the loop is not known.

100 ms between probes: ten wakeups a second cost an idle server about 0.02%
of a core, a lag as short as the probe period is still measured exactly when a
tick falls inside it, and anything longer is always seen.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque

from .loop import EventLoop, Handle
from .rates import EpisodeLog

#: seconds over which utilization, lag percentiles and the slowest callback are figured
WINDOW = 10.0
#: seconds between the lag probe's ticks
PROBE_PERIOD = 0.1
#: upper bounds of the lag histogram's buckets, seconds (Prometheus' ``le``), +Inf implied
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: slow callbacks kept for the window's slowest, at most
MAX_SLOW_KEPT = 1024


def held_for(seconds: float) -> str:
    """A slow callback's time for the log: milliseconds as three decimals, and below a millisecond
    (a --slow-callback that small) the microseconds too, rather than "0.000 s"."""
    return f"{seconds:.3f} s" if seconds >= 0.001 else f"{seconds:.6f} s"


def percentile(ordered: list[float], share: float) -> float:
    """The nearest-rank percentile of sorted values (the smallest value with ``share`` at or below it)."""
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


class LoopHealth:
    """The probe timer and the figures of one loop; ``start()`` arms it, ``close()`` disarms it."""

    def __init__(
        self,
        loop: EventLoop,
        log: logging.Logger | None,
        slow_callback: float,
        window: float = WINDOW,
        period: float = PROBE_PERIOD,
    ) -> None:
        self.loop = loop
        self.window = window
        self.period = period
        self.slow_callback = slow_callback
        loop.slow_callback = slow_callback
        loop.on_slow_callback = self.slow
        loop.on_slow_pass = self.slow_pass
        # No log: the figures only (the asyncio face logs slow callbacks in debug mode, as asyncio does).
        self._slow_log = (
            EpisodeLog(log, loop, f"loop held by a slow callback (over {slow_callback:g} s, --slow-callback)")
            if log is not None
            else None
        )
        self._slow_pass_log = (
            EpisodeLog(log, loop, f"loop held by a slow pass (over {slow_callback:g} s, --slow-callback)")
            if log is not None
            else None
        )
        #: slow callbacks since start, and slow passes of handlers not timed one by one
        self.slow_callbacks = 0
        self.slow_passes = 0
        self._slow: deque[tuple[float, str, float]] = deque(maxlen=MAX_SLOW_KEPT)
        #: (when, seconds late) of every tick in the window
        self._lags: deque[tuple[float, float]] = deque()
        #: lag histogram since start: counts per bucket (not cumulative; the last is +Inf), sum
        self.lag_counts = [0] * (len(LAG_BUCKETS) + 1)
        self.lag_sum = 0.0
        #: (when, busy seconds) at each tick, for utilization over the window
        self._busy: deque[tuple[float, float]] = deque()
        self._due = 0.0
        self._timer: Handle | None = None

    def start(self) -> None:
        now = time.monotonic()
        self._busy.append((now, self.loop.busy_seconds()))
        self._due = now + self.period
        self._timer = self.loop.call_at(self._due, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._slow_log is not None:
            self._slow_log.close()
        if self._slow_pass_log is not None:
            self._slow_pass_log.close()

    def _tick(self) -> None:
        now = time.monotonic()
        due = self._due
        if now >= due:  # always, as the loop runs a timer no earlier than it is due
            # Every tick due by now, however many the loop missed: each as late as it is.
            missed = int((now - due) / self.period) + 1
            self._record_lags(now, now - due, missed)
            due += missed * self.period
            self._due = due
        self._timer = self.loop.call_at(due, self._tick)
        self._busy.append((now, self.loop.busy_seconds()))
        self._forget(now)

    def _record_lags(self, now: float, first: float, count: int) -> None:
        """``count`` ticks, as late as ``first``, then each a period less: all in the histogram
        since start, and the last of them, at most a window's worth, in the window's figures (the
        ones before were due before the window began).  Each bucket's share of an arithmetic
        sequence is a division, so a stall of any length costs the same."""
        period = self.period
        counted = 0
        for index, bound in enumerate(LAG_BUCKETS):
            at_or_below = count - self._later_than(first, count, bound)
            self.lag_counts[index] += at_or_below - counted
            counted = at_or_below
        self.lag_counts[-1] += count - counted
        self.lag_sum += count * first - period * count * (count - 1) / 2
        kept = min(count, int(self.window / period) + 1)
        for k in range(count - kept, count):
            self._lags.append((now, max(0.0, first - k * period)))

    def _later_than(self, first: float, count: int, bound: float) -> int:
        """How many of the ``count`` lags ``first - k * period`` are above ``bound`` (Prometheus'
        ``le``: a lag equal to a bound is in its bucket)."""
        period = self.period
        if first <= bound:
            return 0
        later = min(count, math.ceil((first - bound) / period))
        # The division may round across the bound: settle it on the lags themselves.
        while later < count and first - later * period > bound:
            later += 1
        while later > 0 and first - (later - 1) * period <= bound:
            later -= 1
        return later

    def _forget(self, now: float) -> None:
        """Drop what is older than the window (keeping one busy reading from before it)."""
        horizon = now - self.window
        while self._lags and self._lags[0][0] < horizon:
            self._lags.popleft()
        while len(self._busy) > 1 and self._busy[1][0] <= horizon:
            self._busy.popleft()
        while self._slow and self._slow[0][0] < horizon:
            self._slow.popleft()

    def slow(self, name: str, seconds: float) -> None:
        """The loop's report of a slow callback: count it, keep it, log it in episodes."""
        self.slow_callbacks += 1
        self._slow.append((time.monotonic(), name, seconds))
        if self._slow_log is not None:
            self._slow_log.event(f"{name} took {held_for(seconds)}")

    def slow_pass(self, what: str, seconds: float) -> None:
        """The loop's report of a slow pass of several handlers: count it, log it in episodes."""
        self.slow_passes += 1
        if self._slow_pass_log is not None:
            self._slow_pass_log.event(f"{held_for(seconds)} over {what}")

    # -- figures ------------------------------------------------------------------

    def busy_seconds(self) -> float:
        """The loop's busy seconds since start, as of the last tick (at most a period and a pass old:
        the loop publishes its total when it runs timers, not on every pass)."""
        return self._busy[-1][1] if self._busy else self.loop.busy_time

    def utilization(self) -> float:
        """Busy seconds over wall seconds in the window (since start, while that is shorter), up
        to the last tick."""
        if not self._busy:
            return 0.0
        now, busy = self._busy[-1]
        horizon = now - self.window
        since, busy_then = self._busy[0]
        for when, value in self._busy:
            if when > horizon:
                break
            since, busy_then = when, value
        if now - since <= 0:
            return 0.0
        return min(1.0, max(0.0, (busy - busy_then) / (now - since)))

    def lag(self) -> tuple[float, float, float] | None:
        """(p50, p99, max) of the window's ticks, seconds; None before the first tick."""
        horizon = time.monotonic() - self.window
        ordered = sorted(late for when, late in self._lags if when >= horizon)
        if not ordered:
            return None
        return percentile(ordered, 0.5), percentile(ordered, 0.99), ordered[-1]

    def slowest(self) -> tuple[str, float] | None:
        """The window's slowest callback: (name, seconds)."""
        horizon = time.monotonic() - self.window
        kept = [(seconds, name) for when, name, seconds in self._slow if when >= horizon]
        if not kept:
            return None
        seconds, name = max(kept)
        return name, seconds

    def lag_histogram(self) -> list[int]:
        """Cumulative counts per bucket of LAG_BUCKETS, and last the count of all (+Inf)."""
        out, total = [], 0
        for count in self.lag_counts:
            total += count
            out.append(total)
        return out
