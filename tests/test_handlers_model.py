"""The handler app's life (pollserve.handlers) under random sequences: clients connect, send, close,
make their handler raise, and the server drains, on the command's server in-process (its loop on a
thread of its own, the test thread the clients).

Invariants after every step, once the loop has settled: each client still open has exactly one
running handler and one connection; every other handler has ended and its connection is gone; a
handler that raised was logged once.  After the drain: no handler runs, every client got EOF, and
the server said it was done.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading

import pytest
from clients import connect, recv_exactly
from inprocess import in_loop, serving, wait_until

from pollserve.aio.loop import AsyncioLoop
from pollserve.handlers import Drain, HandlerApp, HandlerServer

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402

#: the most clients open at once in a run
MAX_OPEN = 6


async def echo_or_raise(reader, writer):
    while data := await reader.read(1000):
        if data == b"boom":
            raise ValueError("boom")
        writer.write(data)
        await writer.drain()


class Errors(logging.Handler):
    """The app errors the server logs."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("app error in"):
            self.messages.append(record.getMessage())


class HandlerModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = AsyncioLoop("poll")
        self.app = HandlerApp(echo_or_raise, self.loop, "model:echo_or_raise")
        self.server = HandlerServer(self.app, self.loop, self.app, "127.0.0.1", 0, linger_timeout=1.0)
        self.server.start()
        self.address = self.server.address
        self.errors = Errors()
        logging.getLogger("pollserve").addHandler(self.errors)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.clients: list[socket.socket] = []
        self.raised: list[str] = []
        self.drained = threading.Event()
        self.draining = False

    def settled(self) -> bool:
        """What the loop holds matches the clients: read on the loop's thread."""
        open_count = len(self.clients)

        def look() -> bool:
            return len(self.app.running) == open_count and len(self.server.connections) == open_count

        return in_loop(self.server, look)

    @invariant()
    def consistent(self) -> None:
        if self.draining:
            return
        wait_until(self.settled, timeout=10)
        assert self.errors.messages == self.raised

    @precondition(lambda self: not self.draining and len(self.clients) < MAX_OPEN)
    @rule(first=st.binary(min_size=1, max_size=200).filter(lambda data: data != b"boom"))
    def connect(self, first: bytes) -> None:
        sock = connect(self.server.address)
        sock.sendall(first)
        assert recv_exactly(sock, len(first)) == first
        self.clients.append(sock)

    @precondition(lambda self: not self.draining and self.clients)
    @rule(which=st.integers(min_value=0), data=st.binary(min_size=1, max_size=5000))
    def send(self, which: int, data: bytes) -> None:
        sock = self.clients[which % len(self.clients)]
        if data == b"boom":
            data += b"!"
        sock.sendall(data)
        assert recv_exactly(sock, len(data)) == data

    @precondition(lambda self: not self.draining and self.clients)
    @rule(which=st.integers(min_value=0), half=st.booleans())
    def close(self, which: int, half: bool) -> None:
        sock = self.clients.pop(which % len(self.clients))
        if half:  # EOF first: the handler ends, the server closes, the client reads that
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(100) == b""
        sock.close()

    @precondition(lambda self: not self.draining and self.clients)
    @rule(which=st.integers(min_value=0))
    def make_it_raise(self, which: int) -> None:
        sock = self.clients.pop(which % len(self.clients))
        name = "{}:{}".format(*sock.getsockname()[:2])
        sock.sendall(b"boom")
        assert sock.recv(100) == b""  # closed after the error
        sock.close()
        self.raised.append(f"app error in model:echo_or_raise for {name}; closing it")

    @precondition(lambda self: not self.draining)
    @rule(timeout=st.sampled_from([0.0, 30.0]))
    def drain(self, timeout: float) -> None:
        """What SIGTERM does (service.AppServer.stop_serving)."""
        self.draining = True
        self.loop.call_soon_threadsafe(self.server.shutdown, timeout, self.drained.set)
        for sock in self.clients:
            sock.settimeout(10)
            try:
                assert sock.recv(100) == b""  # EOF: the handler ended (or, with no time, was cancelled)
            except ConnectionResetError:
                assert timeout == 0.0
            sock.close()
        self.clients.clear()
        assert self.drained.wait(10), "the server did not drain"
        assert in_loop(self.server, lambda: (len(self.app.running), len(self.server.connections))) == (0, 0)
        assert self.app.state is Drain.DONE
        assert not self.server.sockets

    @precondition(lambda self: self.draining)
    @rule()
    def nobody_is_accepted_after_the_drain(self) -> None:
        with pytest.raises(ConnectionRefusedError):
            connect(self.address).close()

    def teardown(self) -> None:
        for sock in self.clients:
            sock.close()
        logging.getLogger("pollserve").removeHandler(self.errors)
        self.loop.call_soon_threadsafe(lambda: (self.server.close(), self.loop.stop()))
        self.thread.join(10)
        assert not self.thread.is_alive(), "the loop did not stop"
        self.server.close()  # the loop stopped: the handlers cancelled by the close end now
        self.loop.close()


HandlerModel.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
TestHandlerModel = HandlerModel.TestCase


@pytest.mark.skipif(sys.platform == "win32", reason="FD_SETSIZE is a limit on fd numbers on POSIX only")
def test_a_client_select_cannot_watch_is_refused_and_the_server_goes_on() -> None:
    """On the asyncio face add_reader() says a backend at its capacity with an OSError, not the
    core's CapacityError: the handler server refuses that client as the core's server does."""
    from pollserve.backends.select import FD_SETSIZE

    resource = pytest.importorskip("resource")
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < FD_SETSIZE + 64:
        pytest.skip("the fd limit is too low to reach FD_SETSIZE")
    loop = AsyncioLoop("select")
    app = HandlerApp(echo_or_raise, loop, "model:echo_or_raise")
    server = HandlerServer(app, loop, app, "127.0.0.1", 0)
    with serving("select", app, loop=loop, server=server):
        fillers = []
        try:
            while not fillers or fillers[-1] < FD_SETSIZE - 1:  # every fd below FD_SETSIZE taken
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            with connect(server.address) as sock:  # accepted above FD_SETSIZE
                assert sock.recv(100) == b""
            assert in_loop(server, lambda: (server.connections_refused, len(server.connections))) == (1, 0)
        finally:
            for fd in fillers:
                os.close(fd)
        with connect(server.address) as sock:
            sock.sendall(b"served")
            assert recv_exactly(sock, 6) == b"served"
        wait_until(lambda: in_loop(server, lambda: not app.running))
