"""pollserve's figures for asyncio programs: ``loop.stats()`` and the stats endpoint on the loop."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest

from pollserve.aio import AsyncioLoop


@pytest.fixture
def loop(backend_name: str) -> Iterator[AsyncioLoop]:
    instance = AsyncioLoop(backend_name)
    yield instance
    instance.close()


def http_get(address: tuple, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}{path}", timeout=10) as response:
        return response.status, response.read()


def test_stats_name_the_backend_and_count_fds_against_the_limit(loop: AsyncioLoop, backend_name: str) -> None:
    async def main() -> dict:
        await asyncio.sleep(0.25)  # two ticks of the lag probe
        return loop.stats()

    stats = loop.run_until_complete(main())
    assert stats["backend"] == backend_name
    assert stats["registered_fds"] >= 1  # the loop's wakeup socket
    assert stats["process_fds"] > 0 and stats["fd_soft_limit"] > 0
    assert 0 < stats["fd_usage"] <= 1
    assert stats["loop_lag_p99_s"] is not None and stats["loop_lag_max_s"] >= 0
    assert 0 <= stats["loop_utilization"] <= 1
    assert stats["loop_iterations"] > 0


def test_the_slowest_callback_is_the_task_by_its_name_and_coroutine(loop: AsyncioLoop, caplog) -> None:
    async def holds_the_loop() -> None:
        time.sleep(0.15)  # a blocking call in a coroutine: what the figure is for

    async def main() -> dict:
        await asyncio.create_task(holds_the_loop(), name="the-blocker")
        return loop.stats()

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        stats = loop.run_until_complete(main())
    assert stats["slowest_callback"] == (
        "task the-blocker (test_the_slowest_callback_is_the_task_by_its_name_and_coroutine.<locals>.holds_the_loop)"
    )
    assert stats["slowest_callback_s"] >= 0.15
    assert stats["slow_callbacks"] == 1
    # Not in debug mode: counted and shown, not logged, as asyncio's own loop logs nothing then.
    assert not [record for record in caplog.records if "took" in record.getMessage()]


def test_in_debug_mode_a_slow_callback_is_logged_by_its_name(loop: AsyncioLoop, caplog) -> None:
    loop.set_debug(True)
    loop.slow_callback_duration = 0.05

    def a_plain_callback() -> None:
        time.sleep(0.08)

    loop.call_soon(a_plain_callback)
    loop.call_soon(loop.stop)
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        loop.run_forever()
    messages = [record.getMessage() for record in caplog.records if "took" in record.getMessage()]
    assert len(messages) == 1, messages
    assert "a_plain_callback" in messages[0] and messages[0].startswith("Executing ")
    assert "_run_from_core" not in messages[0]


def test_no_lag_is_shown_for_the_time_the_loop_did_not_run(loop: AsyncioLoop) -> None:
    loop.run_until_complete(asyncio.sleep(0.15))
    time.sleep(0.5)  # not running: no probe is due meanwhile
    stats = loop.run_until_complete(asyncio.sleep(0.15))
    stats = loop.stats()
    assert stats["loop_lag_max_s"] < 0.4, stats


def test_the_stats_endpoint_serves_this_loops_figures(loop: AsyncioLoop, backend_name: str, caplog) -> None:
    address = loop.start_stats_server("127.0.0.1", 0)

    async def main() -> tuple:
        stats = await loop.run_in_executor(None, http_get, address, "/stats")
        health = await loop.run_in_executor(None, http_get, address, "/healthz")
        metrics = await loop.run_in_executor(None, http_get, address, "/metrics")
        return stats, health, metrics

    (status, body), health, metrics = loop.run_until_complete(main())
    assert status == 200
    remote = json.loads(body)
    assert remote["backend"] == backend_name and remote["pid"] == loop.stats()["pid"]
    assert health == (200, b"ok\n")
    assert metrics[0] == 200 and b"pollserve_loop_iterations_total" in metrics[1]
    with pytest.raises(RuntimeError, match="already served"):
        loop.start_stats_server("127.0.0.1", 0)
    loop.close()
    with socket.socket() as probe:
        assert probe.connect_ex(address) != 0, "the endpoint closes with the loop"
    # Its connections' closes are the server's own callbacks, which the compiled server schedules on
    # the core whatever face the loop shows (asyncio's handles were refused there with a TypeError).
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


class SlowProtocol(asyncio.Protocol):
    """Holds the loop in data_received, as a blocking call in a protocol would."""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        time.sleep(0.15)
        self.transport.write(data)


def test_a_slow_protocol_is_named_by_its_class_and_peer_not_by_a_wrapper(loop: AsyncioLoop) -> None:
    async def main() -> tuple[dict, tuple]:
        server = await loop.create_server(SlowProtocol, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        writer.write("é".encode())
        assert await reader.readexactly(2) == "é".encode()
        peer = writer.get_extra_info("sockname")
        writer.close()
        server.close()
        await server.wait_closed()
        return loop.stats(), peer

    stats, peer = loop.run_until_complete(main())
    assert stats["slowest_callback"] == f"{__name__}:SlowProtocol.data_received on {peer}"
    assert stats["slowest_callback_s"] >= 0.15
