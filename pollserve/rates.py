"""Bounding how often things happen: log lines about trouble (EpisodeLog) and requests (RateLimit).

EpisodeLog: one warning when trouble starts, a count while it lasts, one line when it ends.

A server refusing a flood of clients must not log a line per client: 2,000
refusals a second would fill a disk and hide everything else.  So refusals
(and the like) are grouped into episodes: the first event logs a warning
saying what is happening; while events keep coming, a line with their count
every ``interval`` seconds; once none came for ``quiet`` seconds, one line
with the total.  Counting an event is an integer increment; the only timer
runs during an episode.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .loop import EventLoop, Handle


class EpisodeLog:
    """Rate-limited logging of one kind of event (``what``: "connections refused", say)."""

    def __init__(
        self,
        log: logging.Logger,
        loop: EventLoop,
        what: str,
        *,
        interval: float = 60.0,
        quiet: float = 5.0,
    ) -> None:
        self.log = log
        self.loop = loop
        self.what = what
        self.interval = interval
        self.quiet = quiet
        #: events in the current episode, and since the last line was logged
        self.count = 0
        self._unlogged = 0
        self._started = 0.0
        self._last_event = 0.0
        self._last_line = 0.0
        self._timer: Handle | None = None

    @property
    def active(self) -> bool:
        return self._timer is not None

    def event(self, reason: str, exc: BaseException | None = None) -> None:
        """One more event; ``reason`` (and the traceback of ``exc``) is logged only if it starts an episode."""
        now = self.loop.now
        self.count += 1
        self._unlogged += 1
        self._last_event = now
        if self._timer is None:
            self._started = self._last_line = now
            self._unlogged = 0
            self.log.warning("%s: %s", self.what, reason, exc_info=exc)
            self._timer = self.loop.call_later(self.quiet, self._check)

    def _check(self) -> None:
        now = self.loop.now
        if now - self._last_event >= self.quiet:
            self._timer = None
            self.log.info(
                "%s: %d in all over %.1f s; it has stopped", self.what, self.count, self._last_event - self._started
            )
            self.count = self._unlogged = 0
            return
        if now - self._last_line >= self.interval:
            self.log.warning("%s: %d in the last %.0f s, still going", self.what, self._unlogged, now - self._last_line)
            self._last_line = now
            self._unlogged = 0
        self._timer = self.loop.call_later(min(self.quiet, self.interval), self._check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class RateLimit:
    """A token bucket: ``rate`` events a second on average, ``burst`` at once (``clock`` tells the
    seconds; a test may pass its own)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        #: events refused since creation
        self.refused = 0

    def take(self) -> bool:
        """Spend a token if there is one."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.refused += 1
        return False

    def wait(self) -> float:
        """Seconds until the next token."""
        return max(0.0, (1 - self._tokens) / self.rate)
