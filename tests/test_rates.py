"""rates.py on a real loop: episodes of trouble logged a few lines at a time, and the token bucket."""

from __future__ import annotations

import logging
import time

import pytest

from pollserve.loop import EventLoop
from pollserve.rates import EpisodeLog, RateLimit


@pytest.fixture
def loop() -> EventLoop:
    with EventLoop() as loop:
        yield loop


def run_events(loop: EventLoop, episode: EpisodeLog, every: float, until: float, stop_at: float) -> int:
    """Count an event every `every` s until `until` s, run the loop to `stop_at` s; events counted."""
    sent = 0

    def tick() -> None:
        nonlocal sent
        episode.event("the limit of 5")
        sent += 1
        if loop.time() - started + every < until:
            loop.call_later(every, tick)

    started = loop.time()
    loop.call_soon(tick)
    loop.call_later(stop_at, loop.stop)
    loop.run_forever()
    return sent


def test_an_episode_is_one_warning_then_counts_then_one_closing_line(loop: EventLoop, caplog) -> None:
    episode = EpisodeLog(logging.getLogger("test.rates"), loop, "connections refused", interval=0.3, quiet=0.2)
    with caplog.at_level(logging.INFO, logger="test.rates"):
        sent = run_events(loop, episode, every=0.01, until=0.8, stop_at=1.4)
    lines = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert lines[0] == ("WARNING", "connections refused: the limit of 5")
    counts = [message for level, message in lines[1:-1]]
    # Every 0.3 s while it goes on: two or three lines in 0.8 s, never one per event.
    assert 1 <= len(counts) <= 3 and all("still going" in message for message in counts), lines
    assert lines[-1][0] == "INFO" and lines[-1][1].startswith(f"connections refused: {sent} in all over ")
    assert lines[-1][1].endswith("; it has stopped")
    assert sent > 50 and not episode.active


def test_a_new_episode_starts_with_a_new_warning(loop: EventLoop, caplog) -> None:
    episode = EpisodeLog(logging.getLogger("test.rates"), loop, "accept failed", interval=10, quiet=0.1)
    with caplog.at_level(logging.INFO, logger="test.rates"):
        run_events(loop, episode, every=0.01, until=0.05, stop_at=0.3)
        run_events(loop, episode, every=0.01, until=0.05, stop_at=0.3)
    warnings = [record for record in caplog.records if record.levelname == "WARNING"]
    closing = [record for record in caplog.records if "it has stopped" in record.getMessage()]
    assert len(warnings) == 2 and len(closing) == 2


def test_close_cancels_the_episode_timer(loop: EventLoop) -> None:
    episode = EpisodeLog(logging.getLogger("test.rates"), loop, "x", quiet=100)
    episode.event("why")
    assert episode.active
    episode.close()
    assert not episode.active


def test_rate_limit_allows_a_burst_then_its_rate() -> None:
    limit = RateLimit(rate=100.0, burst=10)
    assert all(limit.take() for _ in range(10))
    assert not limit.take() and limit.refused == 1
    assert 0 < limit.wait() <= 0.01 + 1e-9
    time.sleep(0.05)  # about 5 tokens come back, never more than the burst
    taken = sum(limit.take() for _ in range(20))
    assert 3 <= taken <= 10, taken
