"""Reading a pollserve subprocess's stats endpoint from the tests."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import threading
import time
from collections.abc import Iterator


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


@contextlib.contextmanager
def stand_in_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[tuple[str, int]]:
    """An HTTP server on loopback answering with ``handler`` on a thread of its own, for as long as
    the block runs: a stand-in for a stats endpoint that answers what a test needs."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server.server_address[:2]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
