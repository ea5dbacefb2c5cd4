"""Server and Connection in-process, over real loopback sockets, on every available backend.

The loop runs in a background thread; the test thread is the client.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from clients import connect, exchange, recv_exactly, recv_until_eof, request_rounds, reset

from pollserve.apps import Echo, Hello, Protocol
from pollserve.backends.select import FD_SETSIZE
from pollserve.loop import EventLoop
from pollserve.server import Server


@contextlib.contextmanager
def serving(backend_name: str, factory: Callable[[], Protocol], **options) -> Iterator[Server]:
    loop = EventLoop(backend_name)
    server = Server(loop, factory, "127.0.0.1", 0, **options)
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


def open_fds() -> int:
    psutil = pytest.importorskip("psutil")
    process = psutil.Process()
    return process.num_handles() if sys.platform == "win32" else process.num_fds()


class Recorder(Protocol):
    """Records every call, for tests that check what the server told the app."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.lost: list[Exception | None] = []
        self.received = bytearray()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.calls.append("made")

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.calls.append("data")

    def eof_received(self):
        self.calls.append("eof")
        return None

    def connection_lost(self, exc) -> None:
        self.calls.append("lost")
        self.lost.append(exc)

    def pause_writing(self) -> None:
        self.calls.append("pause")

    def resume_writing(self) -> None:
        self.calls.append("resume")


class Recorded:
    """A factory that keeps the protocols it made."""

    def __init__(self, cls: type[Protocol] = Recorder) -> None:
        self.cls = cls
        self.made: list = []

    def __call__(self) -> Protocol:
        protocol = self.cls()
        self.made.append(protocol)
        return protocol


def test_hello_replies_once_per_chunk(backend_name: str) -> None:
    with serving(backend_name, Hello) as server:
        assert request_rounds(server.address, 20, 10, b"hi\n", b"Hello world\n") == 200


def test_echo_large_payload_through_partial_sends(backend_name: str) -> None:
    payload = os.urandom(4 << 20)
    with serving(backend_name, Echo) as server:
        assert exchange(server.address, payload, len(payload)) == payload
        wait_until(lambda: server.connections_closed == 1)
        assert server.bytes_in == server.bytes_out == len(payload)


def test_accepted_sockets_are_non_blocking_with_tcp_nodelay(backend_name: str) -> None:
    factory = Recorded()
    with serving(backend_name, factory) as server, connect(server.address):
        wait_until(lambda: factory.made)
        sock = factory.made[0].transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert sock.getblocking() is False


def test_protocol_lifecycle(backend_name: str) -> None:
    factory = Recorded()
    with serving(backend_name, factory) as server:
        with connect(server.address) as sock:
            sock.sendall(b"abc")
            wait_until(lambda: factory.made and factory.made[0].received == b"abc")
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b""  # eof_received returned None: the server closes
        wait_until(lambda: "lost" in factory.made[0].calls)
    protocol = factory.made[0]
    assert protocol.calls[0] == "made" and protocol.calls[-2:] == ["eof", "lost"]
    assert protocol.lost == [None]
    assert server.connections_accepted == server.connections_closed == 1


def test_write_is_buffered_and_flushed_in_order(backend_name: str) -> None:
    """A reply much larger than the socket buffers arrives whole, and close() waits for it."""
    payload = os.urandom(8 << 20)

    class BigReply(Recorder):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            transport.write(payload[: 1 << 20])
            transport.write(payload[1 << 20 :])
            transport.close()

    factory = Recorded(BigReply)
    with serving(backend_name, factory) as server:
        with connect(server.address) as sock:
            wait_until(lambda: factory.made)
            time.sleep(0.1)  # let the server fill the socket buffers
            assert in_loop(server, lambda: factory.made[0].transport.get_write_buffer_size()) > 0
            assert recv_until_eof(sock) == payload
        wait_until(lambda: server.connections_closed == 1)
    assert factory.made[0].lost == [None]


def test_backpressure_stops_reading_from_a_client_that_does_not_read(backend_name: str) -> None:
    factory = Recorded(type("EchoRecorder", (Recorder,), {"data_received": Echo.data_received}))
    with serving(backend_name, factory) as server, connect(server.address) as sock:
        sock.settimeout(0.5)
        sent = 0
        chunk = b"x" * 65536
        with contextlib.suppress(TimeoutError, socket.timeout):
            while sent < (64 << 20):  # bounded: far more than any socket buffers
                sent += sock.send(chunk)
        assert sent < (64 << 20), "the server never pushed back"
        protocol = factory.made[0]
        assert "pause" in protocol.calls
        buffered = in_loop(server, protocol.transport.get_write_buffer_size)
        assert buffered <= server.high_water + 65536
        # Now read everything back: the server resumes and echoes every byte.
        sock.settimeout(10)
        assert recv_exactly(sock, sent) == b"x" * sent
        assert "resume" in protocol.calls


def test_client_reset_while_server_writes(backend_name: str) -> None:
    class Flood(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.transport.write(b"y" * (4 << 20))

    factory = Recorded(Flood)
    with serving(backend_name, factory) as server:
        before = open_fds()
        sock = connect(server.address)
        sock.send(b"go")
        wait_until(lambda: factory.made and "data" in factory.made[0].calls)
        reset(sock)
        wait_until(lambda: "lost" in factory.made[0].calls)
        assert isinstance(factory.made[0].lost[0], OSError)
        assert server.connections == set()
        assert open_fds() == before
        # Still serving.
        assert request_rounds(server.address, 1, 1, b"x", b"y" * (4 << 20)) == 1


def test_no_fd_leak_after_many_connections(backend_name: str) -> None:
    with serving(backend_name, Hello) as server:
        before = open_fds()
        socks = [connect(server.address) for _ in range(50)]
        wait_until(lambda: len(server.connections) == 50)
        assert open_fds() >= before + 100  # both ends live in this process
        assert len(server.loop.backend) >= 51
        for index, sock in enumerate(socks):
            if index % 2:
                reset(sock)
            else:
                sock.close()
        wait_until(lambda: not server.connections)
        assert open_fds() == before
        assert len(server.loop.backend) == 2  # the listener and the loop's wakeup socket


def test_app_exception_closes_only_that_connection(backend_name: str, caplog) -> None:
    class Fragile(Protocol):
        def data_received(self, data: bytes) -> None:
            if data == b"boom":
                raise ValueError("cannot parse")
            self.transport.write(data)

    with (
        caplog.at_level(logging.ERROR, logger="pollserve"),
        serving(backend_name, Fragile) as server,
        connect(server.address) as good,
        connect(server.address) as bad,
    ):
        bad.sendall(b"boom")
        assert recv_until_eof(bad) == b""
        good.sendall(b"fine")
        assert recv_exactly(good, 4) == b"fine"
    assert any("app error in data_received" in record.getMessage() for record in caplog.records)


def test_failing_factory_refuses_the_client(backend_name: str, caplog) -> None:
    def factory() -> Protocol:
        raise RuntimeError("no")

    with caplog.at_level(logging.ERROR, logger="pollserve"), serving(backend_name, factory) as server:
        with connect(server.address) as sock:
            assert recv_until_eof(sock) == b""
        wait_until(lambda: server.connections_refused == 1)
    assert server.connections_accepted == 0


def test_shutdown_flushes_then_calls_back(backend_name: str) -> None:
    payload = os.urandom(4 << 20)

    class Reply(Protocol):
        def data_received(self, data: bytes) -> None:
            self.transport.write(payload)

    drained = threading.Event()
    with serving(backend_name, Reply) as server:
        with connect(server.address) as sock:
            sock.sendall(b"go")
            first = sock.recv(1)  # the request was read and the reply has started
            in_loop(server, lambda: server.shutdown(10, drained.set))
            assert in_loop(server, lambda: server.sockets) == []  # no longer accepting
            assert first + recv_until_eof(sock) == payload
        assert drained.wait(5)


def test_shutdown_timeout_aborts_clients_that_do_not_read(backend_name: str) -> None:
    class Reply(Protocol):
        def data_received(self, data: bytes) -> None:
            self.transport.write(b"z" * (16 << 20))

    drained = threading.Event()
    with serving(backend_name, Reply) as server, connect(server.address) as sock:
        sock.sendall(b"go")
        assert sock.recv(1)
        in_loop(server, lambda: server.shutdown(0.3, drained.set))
        assert drained.wait(5)
        assert server.connections == set()


@pytest.mark.skipif(sys.platform == "win32", reason="Windows select limits the count of sockets, not fd numbers")
def test_select_refuses_clients_beyond_fd_setsize_and_serves_the_rest(caplog) -> None:
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = FD_SETSIZE + 64
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"fd limit {hard} too low")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    with (
        caplog.at_level(logging.WARNING, logger="pollserve"),
        serving("select", Hello) as server,
        connect(server.address) as early,
    ):
        wait_until(lambda: len(server.connections) == 1)  # accepted while fds are still plenty
        # Occupy every fd below FD_SETSIZE, so the next accept() gets one above it.
        fillers = []
        while True:
            fd = os.open(os.devnull, os.O_RDONLY)
            fillers.append(fd)
            if fd >= FD_SETSIZE + 2:
                break
        try:
            with connect(server.address) as refused:
                assert recv_until_eof(refused) == b""
            wait_until(lambda: server.connections_refused == 1)
            early.sendall(b"still there?")
            assert recv_exactly(early, 12) == b"Hello world\n"
        finally:
            for fd in fillers:
                os.close(fd)
        assert request_rounds(server.address, 5, 2, b"hi", b"Hello world\n") == 10
    assert any(
        "refused" in record.getMessage() and f"below {FD_SETSIZE}" in record.getMessage() for record in caplog.records
    )
