"""asyncio servers at the edge: a backend at its capacity, accept() out of fds, and a server's
lifecycle driven in random orders (hypothesis) while clients connect.

The limit tests change this process's fd table and RLIMIT_NOFILE for a moment and put both back,
even when they fail."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import sys

import psutil
import pytest
from conftest import AVAILABLE, RecordingHandler
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pollserve.aio import AsyncioLoop

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

LIMIT = 10.0


class Echo(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


@contextlib.contextmanager
def fds_taken_up_to(highest: int):
    """Open /dev/null until every fd up to ``highest`` is taken (the soft limit raised as needed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= highest + 16:
        if hard != resource.RLIM_INFINITY and hard <= highest + 16:
            pytest.skip(f"RLIMIT_NOFILE's hard limit {hard} is too low")
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 64, hard))
    opened: list[int] = []
    try:
        while True:
            fd = os.open(os.devnull, os.O_RDONLY)
            opened.append(fd)
            if fd >= highest:
                break
        yield opened
    finally:
        for fd in opened:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_connection_beyond_selects_capacity_is_refused_and_the_server_goes_on(aio_loop) -> None:
    if not (isinstance(aio_loop, AsyncioLoop) and aio_loop.backend.capacity is not None):
        pytest.skip("only a backend with an fd capacity (select) refuses a connection for it")
    capacity = aio_loop.backend.capacity

    async def main():
        server = await aio_loop.create_server(Echo, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        early = socket.socket()  # below the capacity, made before the fds fill up
        try:
            with fds_taken_up_to(capacity - 1):
                early.connect(address)  # the kernel completes it; the accept gets an fd >= capacity
                for _ in range(500):
                    if aio_loop.counts.connections_refused:
                        break
                    await asyncio.sleep(0.01)
            assert aio_loop.counts.connections_refused == 1
            (context,) = aio_loop.handler.expect(1)
            error = context["exception"]
            assert isinstance(error, OSError)
            assert str(capacity) in str(error) and "poll" in str(error)
            early.settimeout(LIMIT)
            assert early.recv(10) == b""  # closed by the server
            # The server goes on serving.
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"still serving")
            assert await reader.readexactly(13) == b"still serving"
            writer.close()
            await writer.wait_closed()
        finally:
            early.close()
            server.close()
            await server.wait_closed()

    aio_loop.run_until_complete(asyncio.wait_for(main(), LIMIT))


@pytest.mark.slow  # a second's rest per loop
def test_accept_out_of_fds_rests_the_listener_and_tells_the_handler(aio_loop) -> None:
    async def main():
        server = await aio_loop.create_server(Echo, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        client = socket.socket()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        opened: list[int] = []
        try:
            highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
            with contextlib.suppress(OSError):
                for _ in range(highest + 8):  # the holes below the highest fd, then up to the limit
                    opened.append(os.open(os.devnull, os.O_RDONLY))
            client.connect(address)  # the kernel completes it; accept() finds no fd left
            for _ in range(500):
                if aio_loop.handler.calls:
                    break
                await asyncio.sleep(0.01)
            # One call here; asyncio's own loop goes on trying through its backlog of 100, a call each.
            calls = aio_loop.handler.expect(len(aio_loop.handler.calls))
            assert calls and len(calls) == 1 if isinstance(aio_loop, AsyncioLoop) else len(calls) >= 1
            for context in calls:
                assert context["message"] == "socket.accept() out of system resource"
                assert isinstance(context["exception"], OSError)
        finally:
            for fd in opened:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        # After its rest (a second) the listener accepts the client, which is served.
        client.settimeout(LIMIT)
        client.sendall(b"served after the rest")
        received = b""
        while len(received) < 21:
            received += await aio_loop.run_in_executor(None, client.recv, 100)
        assert received == b"served after the rest"
        client.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)
        if not isinstance(aio_loop, AsyncioLoop):
            # asyncio's own loop set a timer per failed accept to resume the listener; those left
            # fire on the closed listener ("Invalid file descriptor: -1"), its own bug.
            handler = aio_loop.handler
            handler.calls = [c for c in handler.calls if "BaseSelectorEventLoop._start_serving" not in c["message"]]

    aio_loop.run_until_complete(asyncio.wait_for(main(), LIMIT))


# -- a server's lifecycle in random orders --------------------------------------------------------------


def loop_kinds() -> list:
    return [pytest.param("asyncio", id="asyncio")] + [pytest.param(name, id=f"pollserve-{name}") for name in AVAILABLE]


class ServerLifecycle(RuleBasedStateMachine):
    """start_serving, serve_forever, close, wait_closed and close_clients (3.13) in any order while
    raw clients connect, send and leave.  After every step: no exception-handler call.  wait_closed()
    returns within 5 s of close() once the clients are gone; at the end the process has the fds it
    had before (psutil)."""

    kind = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self.baseline = psutil.Process().num_fds()
        self.loop = asyncio.new_event_loop() if self.kind == "asyncio" else AsyncioLoop(self.kind)
        self.handler = RecordingHandler()
        self.loop.set_exception_handler(self.handler)
        self.server = self.step(self.loop.create_server(Echo, "127.0.0.1", 0, start_serving=False))
        self.address = self.server.sockets[0].getsockname()
        self.forever: asyncio.Future | None = None
        self.clients: list[socket.socket] = []

    def step(self, coro):
        return self.loop.run_until_complete(asyncio.wait_for(coro, LIMIT))

    def closed(self) -> bool:
        return not self.server.sockets

    @precondition(lambda self: not self.closed())  # after close, asyncio's own loop raises TypeError
    @rule()
    def start_serving(self) -> None:
        self.step(self.server.start_serving())

    @precondition(lambda self: self.forever is None and not self.closed())
    @rule()
    def serve_forever(self) -> None:
        self.forever = self.loop.create_task(self.server.serve_forever())
        self.step(asyncio.sleep(0.001))
        assert self.server.is_serving()

    @precondition(lambda self: self.forever is not None)
    @rule()
    def cancel_serve_forever(self) -> None:
        forever, self.forever = self.forever, None
        forever.cancel()
        # serve_forever's cancel closes the server and waits for its connections: let them go.
        self.drop_clients()
        with contextlib.suppress(asyncio.CancelledError):
            self.step(forever)
        assert self.closed()

    @rule()
    def close(self) -> None:
        self.server.close()
        assert not self.server.is_serving()

    @precondition(lambda self: len(self.clients) < 8)
    @rule(send=st.booleans())
    def connect(self, send: bool) -> None:
        client = socket.socket()
        client.setblocking(False)
        try:
            client.connect(self.address)
        except BlockingIOError:
            pass
        except OSError:
            client.close()  # refused: the server is closed
            return
        if send:
            with contextlib.suppress(OSError):
                client.send(b"hello")
        self.clients.append(client)
        self.step(asyncio.sleep(0.002))

    @precondition(lambda self: bool(self.clients))
    @rule()
    def a_client_leaves(self) -> None:
        self.clients.pop(0).close()
        self.step(asyncio.sleep(0.002))

    @precondition(lambda self: sys.version_info >= (3, 13))
    @rule(abort=st.booleans())
    def close_clients(self, abort: bool) -> None:
        if abort:
            self.server.abort_clients()
        else:
            self.server.close_clients()
        self.step(asyncio.sleep(0.002))

    @precondition(lambda self: self.closed())
    @rule()
    def wait_closed(self) -> None:
        self.drop_clients()
        self.loop.run_until_complete(asyncio.wait_for(self.server.wait_closed(), 5.0))

    def drop_clients(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()

    @invariant()
    def no_unexpected_error(self) -> None:
        assert not self.handler.calls, self.handler.calls

    def teardown(self) -> None:
        try:
            if self.forever is not None:
                self.forever.cancel()
            self.server.close()
            self.drop_clients()
            self.loop.run_until_complete(asyncio.wait_for(self.server.wait_closed(), 5.0))
            self.loop.run_until_complete(asyncio.sleep(0.01))
            assert not self.handler.calls, self.handler.calls
        finally:
            self.drop_clients()
            self.loop.close()
        assert psutil.Process().num_fds() == self.baseline


@pytest.mark.parametrize("kind", loop_kinds())
def test_a_servers_lifecycle_in_random_orders(kind: str) -> None:
    machine = type(f"ServerLifecycle_{kind}", (ServerLifecycle,), {"kind": kind})
    machine.TestCase.settings = settings(
        max_examples=12, stateful_step_count=12, deadline=None, suppress_health_check=list(HealthCheck)
    )
    machine.TestCase().runTest()
