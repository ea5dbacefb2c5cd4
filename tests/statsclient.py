"""Reading a pollserve subprocess's stats endpoint from the tests."""

from __future__ import annotations

import http.client
import json
import time


def stats_address(server) -> tuple[str, int]:
    found = server.wait_for_log(r"stats on http://(\[[^\]]+\]|[^:\s]+):(\d+)")
    return found[1].strip("[]"), int(found[2])


def http_get(address: tuple[str, int], path: str, timeout: float = 10) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def get_stats(address: tuple[str, int]) -> dict:
    status, content_type, body = http_get(address, "/stats")
    assert status == 200 and content_type == "application/json"
    return json.loads(body)


def wait_for(predicate, timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.05)
