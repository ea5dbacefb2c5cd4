"""An in-process server whose loop runs on a background thread; the test thread is the client."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from pollserve.apps import Protocol
from pollserve.loop import EventLoop
from pollserve.server import Server


@contextlib.contextmanager
def serving(
    backend_name: str,
    factory: Callable[[], Protocol],
    *,
    loop: EventLoop | None = None,
    server: Server | None = None,
    **options,
) -> Iterator[Server]:
    """A started Server (on 127.0.0.1, port 0, unless one is given); closed with its loop when the block ends."""
    loop = loop or EventLoop(backend_name)
    server = server or Server(loop, factory, "127.0.0.1", 0, **options)
    server.start()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(lambda: (server.close(), loop.stop()))
        thread.join(10)
        assert not thread.is_alive(), "the loop did not stop"
        loop.close()


def in_loop(server: Server, function: Callable, timeout: float = 5):
    """Run function() on the loop's thread and return its result."""
    result = []
    done = threading.Event()
    server.loop.call_soon_threadsafe(lambda: (result.append(function()), done.set()))
    assert done.wait(timeout), "the loop did not answer"
    return result[0]


def wait_until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
