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

import pytest
from clients import connect, exchange, recv_exactly, recv_until_eof, request_rounds, reset
from inprocess import in_loop, serving, wait_until

from pollserve.apps import Echo, Hello, Protocol
from pollserve.backends.select import FD_SETSIZE
from pollserve.loop import EventLoop
from pollserve.server import MAX_READ, MIN_READ, Server, format_address


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

    def connected(self, count: int = 1) -> bool:
        """True once `count` protocols have had connection_made: the factory runs first, on the
        loop's thread, so a protocol in `made` may not have its transport yet."""
        return sum("made" in protocol.calls for protocol in list(self.made)) >= count


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
        wait_until(factory.connected)
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
            wait_until(factory.connected)
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


# -- EOF, closing and lingering --------------------------------------------------------


class AnswerAtEof(Recorder):
    """Answers the client's EOF with a reply far larger than the socket buffers, and stays open."""

    size = 16 << 20

    def eof_received(self):
        self.calls.append("eof")
        self.transport.write(b"e" * self.size)
        return True


def test_eof_received_runs_once_when_backpressure_lifts(backend_name: str) -> None:
    """Draining the big answer resumes reading; a socket at EOF must not report EOF again."""
    factory = Recorded(AnswerAtEof)
    with serving(backend_name, factory) as server, connect(server.address) as sock:
        sock.shutdown(socket.SHUT_WR)
        assert recv_exactly(sock, AnswerAtEof.size) == b"e" * AnswerAtEof.size
        protocol = factory.made[0]
        wait_until(lambda: in_loop(server, protocol.transport.get_write_buffer_size) == 0)
        assert protocol.calls.count("eof") == 1, protocol.calls.count("eof")
        assert in_loop(server, protocol.transport.is_reading) is False
        sock.settimeout(0.3)
        with pytest.raises((TimeoutError, socket.timeout)):
            sock.recv(1)  # nothing beyond the one answer


class PauseResumeAtEof(Recorder):
    def eof_received(self):
        self.calls.append("eof")
        self.transport.pause_reading()
        self.transport.resume_reading()
        if self.calls.count("eof") >= 1000:  # bounds the spin when the bug is present
            self.transport.abort()
        return True


def test_pause_and_resume_inside_eof_received_do_not_repeat_it(backend_name: str) -> None:
    factory = Recorded(PauseResumeAtEof)
    with serving(backend_name, factory) as server, connect(server.address) as sock:
        sock.shutdown(socket.SHUT_WR)
        wait_until(lambda: factory.made and "eof" in factory.made[0].calls)
        transport = factory.made[0].transport
        time.sleep(0.2)  # room for a repeat to show
        in_loop(server, transport.resume_reading)  # from outside the callback too
        in_loop(server, lambda: None)
        assert factory.made[0].calls.count("eof") == 1
        assert in_loop(server, transport.is_reading) is False
        assert in_loop(server, transport.is_closing) is False  # still open for writing
        in_loop(server, lambda: transport.write(b"late answer"))
        assert recv_exactly(sock, 11) == b"late answer"


class EchoRecorder(Recorder):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.transport.write(data)


def fill_until_pushed_back(sock: socket.socket, limit: int = 64 << 20) -> int:
    """Send until the server stops reading (bounded); returns the bytes sent."""
    sock.settimeout(0.5)
    sent = 0
    chunk = b"x" * 65536
    with contextlib.suppress(TimeoutError, socket.timeout):
        while sent < limit:
            sent += sock.send(chunk)
    assert sent < limit, "the server never pushed back"
    return sent


def test_shutdown_lingers_so_unread_client_bytes_cannot_reset_the_reply(backend_name: str) -> None:
    """Closing with unread bytes makes the kernel send RST and drop what send() accepted."""
    factory = Recorded(EchoRecorder)
    drained = threading.Event()
    with serving(backend_name, factory, linger_timeout=30) as server, connect(server.address) as sock:
        fill_until_pushed_back(sock)
        protocol = factory.made[0]
        assert "pause" in protocol.calls
        in_loop(server, lambda: server.shutdown(30, drained.set))
        sock.settimeout(10)
        received = recv_until_eof(sock)  # ECONNRESET here is the bug
        assert len(received) == in_loop(server, lambda: server.bytes_out)
        assert received == b"x" * len(received)
        # Lingering: the server reads and drops until the client's EOF; still open, not yet lost.
        assert in_loop(server, lambda: len(server.connections)) == 1
        assert "lost" not in protocol.calls
        sock.shutdown(socket.SHUT_WR)
        assert drained.wait(10)
    assert protocol.lost == [None]


def test_linger_is_bounded(backend_name: str) -> None:
    """A client that never sends its EOF holds the connection for linger_timeout, no longer."""
    factory = Recorded(EchoRecorder)
    with serving(backend_name, factory, linger_timeout=0.3) as server, connect(server.address) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        in_loop(server, factory.made[0].transport.close)
        sock.settimeout(10)
        assert recv_until_eof(sock) == b""  # the write side is shut at once
        assert in_loop(server, lambda: len(server.connections)) == 1  # lingering
        wait_until(lambda: "lost" in factory.made[0].calls)
        assert server.connections_closed == 1


def test_shutdown_answers_the_clients_still_in_the_backlog(backend_name: str) -> None:
    """Closing a listener resets the connections queued on it: shutdown accepts them first, and
    what they had sent gets its answer before the close."""
    drained = threading.Event()
    with serving(backend_name, Hello, max_connections=1, refuse_excess=False) as server:
        with connect(server.address) as first:
            wait_until(lambda: in_loop(server, lambda: len(server.connections)) == 1)
            queued = [connect(server.address) for _ in range(3)]  # the server is full: they wait in the backlog
            try:
                for sock in queued:
                    sock.sendall(b"hi")
                time.sleep(0.2)
                assert in_loop(server, lambda: len(server.connections)) == 1
                in_loop(server, lambda: server.shutdown(10, drained.set))
                for sock in queued:
                    sock.settimeout(10)
                    assert recv_until_eof(sock) == b"Hello world\n"  # answered, then EOF: not reset
            finally:
                for sock in queued:
                    sock.close()
            first.close()
            assert drained.wait(10)
        assert server.connections_accepted == 4


def test_shutdown_timeout_cuts_a_linger_short(backend_name: str) -> None:
    """A connection already flushed and lingering (its client never sends EOF) is closed when the
    shutdown timeout ends, well before its own linger bound."""
    factory = Recorded(EchoRecorder)
    drained = threading.Event()
    with serving(backend_name, factory, linger_timeout=60) as server, connect(server.address) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        in_loop(server, factory.made[0].transport.close)
        sock.settimeout(10)
        assert recv_until_eof(sock) == b""  # flushed, write side shut: lingering now
        assert in_loop(server, lambda: len(server.connections)) == 1
        started = time.monotonic()
        in_loop(server, lambda: server.shutdown(0.3, drained.set))
        assert drained.wait(30), "shutdown waited for the 60 s linger"
        assert time.monotonic() - started < 30
        wait_until(lambda: "lost" in factory.made[0].calls)
        assert in_loop(server, lambda: len(server.connections)) == 0


def test_close_after_the_clients_eof_does_not_linger(backend_name: str) -> None:
    factory = Recorded()
    with serving(backend_name, factory, linger_timeout=30) as server, connect(server.address) as sock:
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""  # eof_received returned None: closed at once
        wait_until(lambda: "lost" in factory.made[0].calls, timeout=5)


def test_is_reading_is_false_once_closed_even_when_the_fd_is_reused(backend_name: str) -> None:
    factory = Recorded()
    with serving(backend_name, factory) as server, connect(server.address):
        wait_until(factory.connected)
        first = factory.made[0].transport
        fd = first.get_extra_info("fd")
        later = socket.socket()  # takes its fd now, so the server's next accept reuses the freed one
        with later:
            in_loop(server, first.abort)
            later.connect(server.address)
            wait_until(lambda: factory.connected(2))
            second = factory.made[1].transport
            assert second.get_extra_info("fd") == fd, "the kernel did not reuse the fd number"
            assert in_loop(server, first.is_reading) is False
            assert in_loop(server, second.is_reading) is True


# -- write(): bytes, not items --------------------------------------------------------------


def test_write_counts_bytes_of_wide_and_odd_buffers(backend_name: str) -> None:
    import array

    wide = array.array("I", range(1 << 20))  # 4 MiB, items of 4 bytes
    doubles = array.array("d", [1.5] * 4096)
    grid = memoryview(bytes(range(256)) * 64).cast("B", shape=[64, 256])  # 2-D
    strided = memoryview(bytes(range(256)) * 4)[::3]  # not contiguous
    expected = wide.tobytes() * 2 + doubles.tobytes() + grid.tobytes() + strided.tobytes()

    class WritesBuffers(Recorder):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            transport.write(memoryview(wide))  # partly sent at once
            transport.write(wide)  # appended to the buffer
            transport.write(doubles)
            transport.write(grid)
            transport.write(strided)
            transport.close()

    factory = Recorded(WritesBuffers)
    with serving(backend_name, factory) as server, connect(server.address) as sock:
        assert recv_until_eof(sock) == expected
        wait_until(lambda: server.connections_closed == 1)
        assert server.bytes_out == len(expected)
    assert factory.made[0].lost == [None]


def test_write_refuses_text_with_a_clear_error(backend_name: str) -> None:
    errors = []

    class WritesText(Recorder):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            try:
                transport.write("héllo")
            except TypeError as exc:
                errors.append(str(exc))
            transport.write(b"bytes still work")
            transport.close()

    with serving(backend_name, Recorded(WritesText)) as server, connect(server.address) as sock:
        assert recv_until_eof(sock) == b"bytes still work"
    assert errors and "str" in errors[0]


# -- timers do not keep protocols alive --------------------------------------------------------


def test_cancelled_idle_timers_release_their_protocols(backend_name: str) -> None:
    import gc
    import weakref

    refs = []

    class WithIdleTimer(Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.timer = loop.call_later(300, transport.abort)
            refs.append(weakref.ref(self))

        def connection_lost(self, exc) -> None:
            self.timer.cancel()

    with serving(backend_name, WithIdleTimer) as server:
        loop = server.loop
        for _ in range(200):
            with connect(server.address):
                pass
        wait_until(lambda: server.connections_closed == 200)
        in_loop(server, lambda: None)  # the last connection_lost calls have run
        in_loop(server, gc.collect)
        alive = sum(ref() is not None for ref in refs)
        assert alive == 0, f"{alive} protocols kept alive by cancelled timers"
        assert in_loop(server, lambda: len(loop._timers)) < 200


# -- the accept batch -----------------------------------------------------------------------------


def hold_loop(server: Server) -> threading.Event:
    """Block the loop's thread until the returned event is set (at most 10 s)."""
    release = threading.Event()
    entered = threading.Event()
    server.loop.call_soon_threadsafe(lambda: (entered.set(), release.wait(10)))
    assert entered.wait(5)
    return release


def test_connection_made_that_stops_accepting_ends_the_batch(backend_name: str, caplog) -> None:
    class StopsAccepting(Recorder):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            server.stop_accepting()

    factory = Recorded(StopsAccepting)
    with caplog.at_level(logging.ERROR, logger="pollserve"), serving(backend_name, factory) as server:
        release = hold_loop(server)
        socks = [connect(server.address) for _ in range(3)]  # queued in the backlog together
        release.set()
        try:
            wait_until(lambda: factory.made)
            assert in_loop(server, lambda: server.sockets) == []
            socks[0].sendall(b"hi")
            wait_until(lambda: factory.made[0].received == b"hi")
        finally:
            for sock in socks:
                sock.close()
    assert server.connections_accepted == 1
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []


def test_socket_setup_failure_closes_that_client_only(backend_name: str, monkeypatch, caplog) -> None:
    """macOS: setsockopt(TCP_NODELAY) on an accepted socket the client already reset fails
    with EINVAL.  Linux does not fail there, so the failure is injected for the second client."""
    import errno

    calls = []
    real_setsockopt = socket.socket.setsockopt
    test_thread = threading.get_ident()

    def setsockopt(self, level, option, value, *rest):
        # The loop's thread sets the accepted sockets' options; this thread, the clients'.
        if level == socket.IPPROTO_TCP and option == socket.TCP_NODELAY and threading.get_ident() != test_thread:
            calls.append(self.fileno())
            if len(calls) == 2:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_setsockopt(self, level, option, value, *rest)

    factory = Recorded()
    with caplog.at_level(logging.ERROR, logger="pollserve"), serving(backend_name, factory) as server:
        monkeypatch.setattr(socket.socket, "setsockopt", setsockopt)
        release = hold_loop(server)
        socks = [connect(server.address) for _ in range(3)]
        release.set()
        try:
            wait_until(lambda: len(factory.made) == 2)
            assert recv_until_eof(socks[1]) == b""  # closed, not left hanging
            for sock in (socks[0], socks[2]):
                sock.sendall(b"ok")
            wait_until(lambda: [bytes(p.received) for p in factory.made] == [b"ok", b"ok"])
        finally:
            monkeypatch.undo()
            for sock in socks:
                sock.close()
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []


# -- the transport's socket --------------------------------------------------------------------------


def test_app_cannot_close_the_transport_socket_behind_the_loops_back(backend_name: str) -> None:
    """A closed registered fd kills select() with EBADF and vanishes silently from epoll and
    kqueue: the socket the transport hands out does not offer close()."""

    class ClosesItsSocket(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.transport.get_extra_info("socket").close()

    factory = Recorded(ClosesItsSocket)
    with serving(backend_name, factory) as server:
        with connect(server.address) as sock:
            sock.sendall(b"x")
            assert recv_until_eof(sock) == b""  # the app's error closed this connection
        wait_until(lambda: "lost" in factory.made[0].calls)
        assert isinstance(factory.made[0].lost[0], AttributeError)
        with connect(server.address) as other:  # the loop lives on and serves the next client
            other.sendall(b"z")
            wait_until(lambda: len(factory.made) == 2 and factory.made[1].received == b"z")


# -- addresses ------------------------------------------------------------------------------------


def test_format_address_keeps_the_ipv6_scope() -> None:
    """getsockname() of a link-local address gives the scope as a number apart from the host."""
    if not hasattr(socket, "if_nameindex"):
        pytest.skip("no socket.if_nameindex here")
    index, name = socket.if_nameindex()[0]
    address = ("fe80::1", 5001, 0, index)
    assert format_address(address) == f"[fe80::1%{name}]:5001"
    assert format_address(address, url=True) == f"[fe80::1%25{name}]:5001"  # RFC 6874
    assert format_address(("fe80::1", 5001, 0, 0)) == "[fe80::1]:5001"
    assert format_address(("::1", 5001, 0, 0), url=True) == "[::1]:5001"
    assert format_address(("127.0.0.1", 5001)) == "127.0.0.1:5001"
    unknown = max(index for index, _ in socket.if_nameindex()) + 1000
    assert format_address(("fe80::1", 80, 0, unknown)) == f"[fe80::1%{unknown}]:80"


class HalfCloser(Recorder):
    """Answers, sends its FIN with write_eof(), and keeps the connection open at the client's EOF."""

    reply = b"r" * (4 << 20)  # buffered: the FIN waits for the flush

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.transport.write(self.reply)
        self.transport.write_eof()

    def eof_received(self):
        self.calls.append("eof")
        return True


def test_connection_closes_itself_once_both_sides_are_shut(backend_name: str) -> None:
    factory = Recorded(HalfCloser)
    with serving(backend_name, factory) as server:
        for index, client_eof_first in enumerate((False, True)):
            with connect(server.address) as sock:
                sock.sendall(b"go")
                # This round's protocol, not the last round's: wait until it exists and has the bytes.
                wait_until(lambda index=index: len(factory.made) > index and factory.made[index].received)
                if client_eof_first:
                    sock.shutdown(socket.SHUT_WR)
                assert recv_until_eof(sock) == HalfCloser.reply
                if not client_eof_first:
                    sock.shutdown(socket.SHUT_WR)
                wait_until(lambda index=index: "lost" in factory.made[index].calls)
                assert factory.made[index].lost == [None]
        assert server.connections_closed == 2


class CloseFromResumeWriting(Recorder):
    """Calls back into its transport from inside the transport's own callback."""

    size = 32 << 20  # more than loopback's socket buffers take at once

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.write(b"w" * self.size)  # over the high-water mark: pause_writing

    def resume_writing(self) -> None:
        super().resume_writing()
        self.transport.write_eof()
        self.transport.close()


def test_close_and_write_eof_inside_resume_writing(backend_name: str) -> None:
    factory = Recorded(CloseFromResumeWriting)
    with serving(backend_name, factory, linger_timeout=30) as server:
        with connect(server.address) as sock:
            # Not a byte read before the write paused: a client reading meanwhile can take all of
            # it within one send(), and there is then no resume_writing to call back from.
            wait_until(lambda: factory.made and "pause" in factory.made[0].calls)
            assert recv_until_eof(sock) == b"w" * CloseFromResumeWriting.size
            assert factory.made[0].calls[1:3] == ["pause", "resume"]
            assert in_loop(server, lambda: len(server.connections)) == 1  # lingering, once
        wait_until(lambda: "lost" in factory.made[0].calls)
        live_timers = in_loop(server, lambda: [entry for entry in server.loop._timers if not entry[2].cancelled])
        assert live_timers == []  # the linger timer went with the connection
    assert factory.made[0].lost == [None]


def test_write_buffer_bytes_is_the_sum_of_the_buffers(backend_name: str) -> None:
    factory = Recorded(EchoRecorder)
    with serving(backend_name, factory) as server, connect(server.address) as a, connect(server.address) as b:
        fill_until_pushed_back(a)
        fill_until_pushed_back(b)
        total, buffers = in_loop(
            server,
            lambda: (server.write_buffer_bytes, [p.transport.get_write_buffer_size() for p in factory.made]),
        )
        assert total == sum(buffers) > 0
        in_loop(server, factory.made[0].transport.abort)  # dropped, not sent
        assert in_loop(server, lambda: server.write_buffer_bytes) == buffers[1]
        # Draining b lets the server read (and echo) the rest b sent; once b has shut its side and
        # read everything to EOF, nothing waits for any socket.  (Reading a fixed amount was racy: the
        # server resumed reading and buffered new echoes meanwhile.)
        b.shutdown(socket.SHUT_WR)
        b.settimeout(30)
        assert len(recv_until_eof(b)) > buffers[1]
        wait_until(lambda: in_loop(server, lambda: server.write_buffer_bytes) == 0)


# -- what users reach for ------------------------------------------------------------------------------


def test_a_server_listens_on_every_address_it_is_given(backend_name: str) -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    loop = EventLoop(backend_name)
    server = Server(loop, Hello, ["127.0.0.1", "::1"], 0)
    with serving(backend_name, Hello, loop=loop, server=server):
        hosts = [address[0] for address in server.addresses]
        ports = {address[1] for address in server.addresses}
        assert hosts == ["127.0.0.1", "::1"] and len(ports) == 1  # port 0: the first one's port for all
        (port,) = ports
        for host in hosts:
            assert request_rounds((host, port), 2, 2, b"hi", b"Hello world\n") == 4
        v6 = next(sock for sock in server.sockets if sock.family == socket.AF_INET6)
        assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


def test_a_failed_bind_keeps_no_listener_and_names_the_address(backend_name: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken, EventLoop(backend_name) as loop:
        port = taken.getsockname()[1]
        server = Server(loop, Hello, ["127.0.0.1"], port)
        with pytest.raises(OSError) as caught:
            server.start()
        assert caught.value.filename == f"127.0.0.1:{port}"
        assert server.sockets == [] and len(loop.backend) == 1  # only the loop's wakeup socket


def test_protocol_reaches_the_loop_to_resume_later(backend_name: str) -> None:
    class Sleepy(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.transport.pause_reading()
            self.transport.get_extra_info("loop").call_later(0.05, self.wake)

        def wake(self) -> None:
            self.calls.append("woke")
            self.transport.write(b"awake")
            self.transport.resume_reading()

    factory = Recorded(Sleepy)
    with serving(backend_name, factory) as server, connect(server.address) as sock:
        sock.sendall(b"one")
        assert recv_exactly(sock, 5) == b"awake"
        sock.sendall(b"two")
        assert recv_exactly(sock, 5) == b"awake"
    assert factory.made[0].calls.count("woke") == 2


def test_lowering_the_write_buffer_limits_pauses_at_once(backend_name: str) -> None:
    class Buffered(Recorder):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            transport.set_write_buffer_limits(high=1 << 30)  # no pause while filling
            transport.write(b"b" * (32 << 20))  # far more than the socket buffers take

    factory = Recorded(Buffered)
    with serving(backend_name, factory) as server, connect(server.address) as sock:
        wait_until(factory.connected)
        transport = factory.made[0].transport
        assert "pause" not in factory.made[0].calls
        buffered = in_loop(server, transport.get_write_buffer_size)
        assert buffered > 1 << 20
        in_loop(server, lambda: transport.set_write_buffer_limits(high=1 << 20))
        assert "pause" in factory.made[0].calls  # before any further write()
        assert in_loop(server, transport.is_reading) is False
        sock.settimeout(10)
        assert recv_exactly(sock, 32 << 20) == b"b" * (32 << 20)
        wait_until(lambda: "resume" in factory.made[0].calls)


class BufferedAtResume(Recorder):
    """4 MiB / 1 MiB limits and a reply far above them; records what is buffered at each call."""

    high, low = 4 << 20, 1 << 20
    size = 24 << 20

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.at_pause: list[int] = []
        self.at_resume: list[int] = []
        # A fixed send buffer (no autotuning) makes each send() a few hundred KiB at most, so the
        # buffer passes the marks in small steps.
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 << 10)
        transport.set_write_buffer_limits(high=self.high, low=self.low)
        transport.write(b"r" * self.size)

    def pause_writing(self) -> None:
        super().pause_writing()
        self.at_pause.append(self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        super().resume_writing()
        self.at_resume.append(self.transport.get_write_buffer_size())


def test_resume_writing_comes_at_or_below_the_low_water_mark(backend_name: str) -> None:
    """Paused above the high-water mark, resumed only once the buffer has drained to the low one:
    a client that stopped reading, then drains the whole reply."""
    factory = Recorded(BufferedAtResume)
    with serving(backend_name, factory) as server, connect(server.address) as sock:
        wait_until(factory.connected)
        protocol = factory.made[0]
        time.sleep(0.1)  # the client reads nothing for a while
        assert in_loop(server, lambda: protocol.at_pause) != [] and protocol.at_resume == []
        assert protocol.at_pause[0] > BufferedAtResume.high
        sock.settimeout(10)
        assert recv_exactly(sock, BufferedAtResume.size) == b"r" * BufferedAtResume.size
        assert protocol.calls.count("resume") == 1
        (buffered,) = protocol.at_resume
        assert 0 < buffered <= BufferedAtResume.low, f"resumed at {buffered} bytes buffered"


def test_a_failing_factory_is_logged_once_per_episode(backend_name: str, caplog) -> None:
    def factory() -> Protocol:
        raise RuntimeError("no protocol today")

    with caplog.at_level(logging.WARNING, logger="pollserve"), serving(backend_name, factory) as server:
        for _ in range(5):
            with connect(server.address) as sock:
                assert recv_until_eof(sock) == b""
        wait_until(lambda: server.connections_refused == 5)
    lines = [record for record in caplog.records if "failed to make a protocol" in record.getMessage()]
    assert len(lines) == 1 and "RuntimeError: no protocol today" in lines[0].getMessage()
    assert lines[0].exc_info is not None  # the traceback, once


def test_the_transport_protocol_declares_what_connection_offers() -> None:
    """Users type against apps.Transport: it must list every public method of the real transport."""
    from pollserve.apps import Transport
    from pollserve.server import Connection

    public = {name for name in dir(Connection) if not name.startswith("_") and callable(getattr(Connection, name))}
    declared = {name for name in dir(Transport) if not name.startswith("_")}
    assert public <= declared, f"missing from Transport: {sorted(public - declared)}"


def test_the_package_ships_its_type_hints() -> None:
    """PEP 561: py.typed tells users' type checkers to read the package's own hints."""
    import importlib.resources

    assert importlib.resources.files("pollserve").joinpath("py.typed").is_file()


class ChunkSizes(Protocol):
    """Echoes every chunk and keeps its size: what each recv() returned."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def data_received(self, data: bytes) -> None:
        self.sizes.append(len(data))
        self.transport.write(data)


def test_the_read_size_grows_for_bulk_and_comes_back_for_small_requests(backend_name: str) -> None:
    """Reads start small (a small request's bytes object stays in the interpreter's own
    allocator), grow 8x at each read that filled the size, and come back 8x at each read that used
    an eighth of it; no byte is lost or reordered on the way."""
    factory = Recorded(ChunkSizes)
    bulk = os.urandom(2 << 20)
    with serving(backend_name, factory) as server, connect(server.address) as sock:
        sender = threading.Thread(target=sock.sendall, args=(bulk,), daemon=True)
        sender.start()
        assert recv_exactly(sock, len(bulk)) == bulk
        sender.join(10)
        sizes = factory.made[0].sizes
        assert sizes[0] <= MIN_READ, sizes[:5]
        assert max(sizes) == MAX_READ, "a sender that keeps the buffer full is read at the largest size"
        # Each small request is read alone (its echo comes back before the next is sent): every
        # one shrinks the size, down to the smallest, and a burst after them starts small again.
        for _ in range(4):
            sock.sendall(b"x" * 10)
            assert recv_exactly(sock, 10) == b"x" * 10
        seen = len(sizes)
        burst = os.urandom(256 << 10)
        sender = threading.Thread(target=sock.sendall, args=(burst,), daemon=True)
        sender.start()
        assert recv_exactly(sock, len(burst)) == burst
        sender.join(10)
        assert sizes[seen] <= MIN_READ, sizes[seen - 5 : seen + 5]
        assert sum(sizes) == len(bulk) + 40 + len(burst)


def test_more_clients_ready_at_once_than_one_wait_returns_are_all_served(backend_name: str) -> None:
    """epoll's wait is bounded (42 events a call): 200 clients whose requests wait while the loop
    is held are all answered once it runs, the ones a call left out by the next calls."""
    with serving(backend_name, Echo) as server:
        clients = [connect(server.address) for _ in range(200)]
        try:
            wait_until(lambda: server.connections_accepted == len(clients))
            release = hold_loop(server)
            for index, sock in enumerate(clients):
                sock.sendall(b"%d\n" % index)
            release.set()
            for index, sock in enumerate(clients):
                assert recv_exactly(sock, len(b"%d\n" % index)) == b"%d\n" % index
        finally:
            for sock in clients:
                sock.close()
