"""The figures of an asyncio program's loop: the snapshot ``/stats`` serves, without debug mode.

The core measures what it always measures (busy time for utilization, every callback against the
slow-callback limit); this adds the lag probe, armed while the loop runs (a loop that does not run is
not late), and the stats collector over the loop's transports (``counts.py``).  The stats endpoint
(``/stats``, ``/metrics``, ``/healthz``, the dashboard) is the server's own, started on the same loop
when the program asks for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..health import LoopHealth
from ..stats import StatsCollector

if TYPE_CHECKING:
    from ..server import Server
    from .loop import AsyncioLoop


class LoopFigures:
    """One loop's health probe, its collector, and its stats endpoint once started."""

    def __init__(self, loop: AsyncioLoop) -> None:
        self.loop = loop
        # No log of its own: slow callbacks are logged in debug mode, by the loop, as asyncio does.
        self.health = LoopHealth(loop, None, loop.slow_callback)
        self.collector = StatsCollector(loop, loop.counts, health=self.health)
        self.endpoint: Server | None = None
        self._probing = False

    def running(self) -> None:
        """The loop runs: probe its lag."""
        if not self._probing:
            self._probing = True
            self.health.start()

    def stopped(self) -> None:
        """The loop returned: no probe while it does not run, so the next run shows no lag for the pause."""
        if self._probing:
            self._probing = False
            self.health.close()

    def snapshot(self) -> dict[str, Any]:
        return self.collector.snapshot().to_dict()

    def start_endpoint(self, host: str, port: int) -> Any:
        """Serve the stats endpoint on this loop; its address (the real port after port 0)."""
        from ..service import Health, stats_endpoint  # the server's own endpoint, imported when wanted

        if self.endpoint is not None:
            raise RuntimeError(f"the stats endpoint is already served on {self.endpoint.address}")
        endpoint = stats_endpoint(self.loop, self.collector, Health(), host, port)
        endpoint.start()
        self.endpoint = endpoint
        return endpoint.address

    def close(self) -> None:
        self.stopped()
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            endpoint.close()
