"""Idle means no progress in either direction: a client reading a large reply slowly keeps its
connection, one that stops reading loses it (even while closing), in-process over loopback."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from clients import connect
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from inprocess import in_loop, serving, wait_until
from test_server import open_fds
from tlshelpers import small_buffer_client, small_send_buffers

from pollserve.apps import Echo, Protocol
from pollserve.sendqueue import unsent_bytes


def kernel_queue_measurable() -> bool:
    with socket.socket() as sock:
        return unsent_bytes(sock.fileno()) is not None


needs_queue_size = pytest.mark.skipif(
    not kernel_queue_measurable(),
    reason=f"pollserve cannot read the kernel's send queue on {sys.platform} (platform_notes.md)",
)


@contextlib.contextmanager
def sending(sock: socket.socket, data: bytes) -> Iterator[None]:
    """sendall(data) on a thread of its own, joined before the block ends (and so before the socket
    is closed); an error ends it quietly: the server may close first."""

    def send() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(10)


def read_slowly(sock: socket.socket, total: int, rate: float, seconds: float) -> int:
    """Read at about ``rate`` bytes/s until ``total`` bytes, EOF or ``seconds``: what it read."""
    got = 0
    chunk = max(int(rate / 20), 1)
    deadline = time.monotonic() + seconds
    while got < total and time.monotonic() < deadline:
        data = sock.recv(min(chunk, total - got))
        if not data:
            break
        got += len(data)
        time.sleep(len(data) / rate)
    return got


@needs_queue_size
def test_a_slow_reader_of_a_large_echo_is_never_idle(backend_name: str) -> None:
    """It reads steadily for several idle timeouts while the server's send() seldom succeeds:
    with a full send buffer the backend reports writable only once a large part has drained.
    Its receive buffer is small, so that what it has yet to read waits at the server's side:
    bytes in the client's own kernel buffer are delivered, and no business of the server's."""
    total, rate, timeout = 1_600_000, 400_000.0, 1.0
    with serving(backend_name, Echo, idle_timeout=timeout) as server:
        with small_buffer_client(server.address) as sock:
            with sending(sock, b"x" * total):
                started = time.monotonic()
                assert read_slowly(sock, total, rate, seconds=30) == total
                assert time.monotonic() - started > 3 * timeout  # it did read for longer than the timeout
            sock.sendall(b"still here")  # the connection is open: the echo goes on
            assert sock.recv(100) == b"still here"
        assert server.connections_idle_closed == 0


def test_a_client_that_stops_reading_is_closed_with_a_full_buffer(backend_name: str) -> None:
    total, timeout = 8_000_000, 1.0
    with (
        serving(backend_name, Echo, idle_timeout=timeout) as server,
        small_buffer_client(server.address) as sock,
        sending(sock, b"x" * total),
    ):
        assert read_slowly(sock, 100_000, 10_000_000.0, seconds=10) == 100_000  # then it reads nothing more
        wait_until(lambda: in_loop(server, lambda: server.write_buffer_bytes) > 0)
        assert len(server.connections) == 1  # still open: the timeout is longer than the read took
        wait_until(lambda: not server.connections, timeout=10)
        assert server.connections_idle_closed == 1
        assert server.write_buffer_bytes == 0


class ReplyThenClose(Protocol):
    """A large reply, then close(): the close must flush it, to a client that reads nothing."""

    reply_size = 8_000_000
    buffered: ClassVar[list[int]] = []

    def data_received(self, data: bytes) -> None:
        self.transport.write(bytes(self.reply_size))
        ReplyThenClose.buffered.append(self.transport.get_write_buffer_size())
        self.transport.close()


@pytest.mark.parametrize(
    "options", [{"idle_timeout": 0.5}, {"idle_timeout": 0, "flush_timeout": 0.5}], ids=["idle-timeout", "flush-timeout"]
)
def test_a_closing_flush_to_a_client_that_stopped_reading_is_reclaimed(backend_name: str, options: dict) -> None:
    """Bounded by the idle timeout's rule, and without an idle timeout by the flush timeout."""
    ReplyThenClose.buffered = []
    with serving(backend_name, ReplyThenClose, **options) as server:
        before = open_fds()
        with connect(server.address, timeout=10) as sock:
            sock.sendall(b"go")
            wait_until(lambda: bool(ReplyThenClose.buffered))
            assert ReplyThenClose.buffered[0] > 0  # the close had bytes to flush
            wait_until(lambda: not server.connections, timeout=10)
            assert server.write_buffer_bytes == 0
            assert open_fds() == before + 1  # the server's end is closed; the client's is open
            assert server.connections_closed == 1


def test_a_closing_flush_to_a_reader_completes(backend_name: str) -> None:
    """The same close to a client that reads slowly: it gets every byte, then EOF."""
    ReplyThenClose.buffered = []
    with serving(backend_name, ReplyThenClose, idle_timeout=0, flush_timeout=0.5) as server:
        with connect(server.address, timeout=10) as sock:
            sock.sendall(b"go")
            wait_until(lambda: bool(ReplyThenClose.buffered))
            size = ReplyThenClose.reply_size
            assert read_slowly(sock, size + 1, 4_000_000.0, seconds=30) == size
        wait_until(lambda: not server.connections)
        assert server.connections_idle_closed == 0
        assert in_loop(server, lambda: server._idle_timer) is None  # the sweep stopped with nothing to watch


class Controlled(Protocol):
    """An app the model drives from the test thread (through in_loop)."""


#: the stream the app writes: byte i is PATTERN[i % 251], so a reordering or a gap shows
PATTERN = bytes(range(251)) * 9000


class FlushModel(RuleBasedStateMachine):
    """Random app writes and closes against a client that reads some, pauses, and stops, with small
    socket buffers on both sides so that the server buffers too.  Invariants: the client gets a prefix
    of what the app wrote, in order; once it stops reading, the connection is gone within the idle
    timeout plus two sweeps (a linger, if the close got that far, within its own timer), and the
    client sees a clean EOF only after every byte the app wrote (else a reset)."""

    LIMIT = 0.4

    def __init__(self, backend_name: str) -> None:
        super().__init__()
        self.stack = contextlib.ExitStack()
        self.apps: list[Controlled] = []

        def factory() -> Controlled:
            app = Controlled()
            self.apps.append(app)
            return app

        self.server = self.stack.enter_context(
            serving(backend_name, factory, idle_timeout=self.LIMIT, linger_timeout=0.2)
        )
        small_send_buffers(self.server)
        self.sock = self.stack.enter_context(small_buffer_client(self.server.address))
        wait_until(lambda: bool(self.apps) and hasattr(self.apps[0], "transport"))
        self.app = self.apps[0]
        self.written = 0
        self.received = bytearray()
        self.closed_by_app = False
        self.ended = False  # the client saw EOF or a reset

    def in_loop(self, action: Callable[[], Any]) -> None:
        in_loop(self.server, action)

    @precondition(lambda self: not self.closed_by_app)
    @rule(size=st.integers(1, 200_000))
    def app_writes(self, size: int) -> None:
        """A write counts only if the transport took it: once the idle timeout has closed the
        connection (the client waited too long), write() ignores data, as documented."""
        start = self.written % 251
        transport = self.app.transport

        def write() -> bool:
            if transport.is_closing():
                return False
            transport.write(PATTERN[start : start + size])
            return True

        if in_loop(self.server, write):
            self.written += size

    @precondition(lambda self: not self.closed_by_app)
    @rule()
    def app_closes(self) -> None:
        self.in_loop(self.app.transport.close)
        self.closed_by_app = True

    @precondition(lambda self: not self.ended)
    @rule(size=st.integers(1, 100_000))
    def client_reads(self, size: int) -> None:
        self.sock.settimeout(0.05)
        try:
            data = self.sock.recv(size)
        except TimeoutError:
            return
        except ConnectionResetError:
            self.ended = True
            return
        self.ended = not data
        self.received += data
        if self.ended:
            self.whole_at_eof()

    def whole_at_eof(self) -> None:
        """A clean EOF comes only after every byte the app wrote: a server that gives up with
        bytes undelivered resets the connection instead."""
        assert len(self.received) == self.written, f"EOF after {len(self.received)} of {self.written} bytes"

    @rule(seconds=st.sampled_from([0.0, 0.05, 0.15]))
    def client_waits(self, seconds: float) -> None:
        time.sleep(seconds)

    @invariant()
    def a_prefix_in_order(self) -> None:
        assert len(self.received) <= self.written
        assert self.received == PATTERN[: len(self.received)]

    def read_what_is_left(self) -> None:
        """The server has let go: what the client can still read is a prefix, then a reset or EOF."""
        self.sock.settimeout(5)
        while not self.ended and len(self.received) <= self.written:
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:
                return
            self.received += data
            self.a_prefix_in_order()
            if not data:
                self.whole_at_eof()
                return

    def teardown(self) -> None:
        try:
            # The client stops reading: the server must let go within the limit and two sweeps
            # (plus a linger), here with a generous margin for a loaded machine.
            bound = self.LIMIT + 2 * self.server._sweep_interval() + 0.2 + 2.0
            wait_until(lambda: not self.server.connections, timeout=bound)
            assert self.server.write_buffer_bytes == 0
            self.read_what_is_left()
        finally:
            self.stack.close()


def test_model_of_writes_closes_and_a_client_that_stops(backend_name: str) -> None:
    run_state_machine_as_test(
        lambda: FlushModel(backend_name),
        settings=settings(max_examples=10, stateful_step_count=10, deadline=None),
    )


def test_a_flush_cut_short_is_logged_with_both_reasons(backend_name: str, caplog: pytest.LogCaptureFixture) -> None:
    """At --log-level debug the close line says the app closed, the server then aborted the flush,
    and reset the connection, with how many bytes the client had not received."""
    ReplyThenClose.buffered = []
    with (
        caplog.at_level(logging.DEBUG, logger="pollserve"),
        serving(backend_name, ReplyThenClose, idle_timeout=0.3) as server,
        connect(server.address) as sock,
    ):
        sock.sendall(b"go")
        wait_until(lambda: server.connections_closed == 1, timeout=10)
    closes = [r.getMessage() for r in caplog.records if " closed 127.0.0.1:" in r.getMessage()]
    assert len(closes) == 1
    ending = re.search(
        r"closed by the app, then aborted: flushing, no progress for 0\.3 s; reset, (\d+) bytes undelivered$", closes[0]
    )
    assert ending, closes[0]
    assert int(ending[1]) > 0


@needs_queue_size
def test_the_command_line_keeps_a_slow_reader(start_server) -> None:
    """The reproduction, scaled down: `--idle-timeout` small, a large echo read steadily for several
    timeouts by a client with a small receive buffer, through the real command."""
    total, rate = 1_500_000, 400_000.0
    server = start_server("--app", "echo", "--idle-timeout", "1")
    with small_buffer_client(server.address) as sock:
        with sending(sock, PATTERN[:total]):
            received = bytearray()
            deadline = time.monotonic() + 30
            while len(received) < total and time.monotonic() < deadline:
                data = sock.recv(20_000)
                if not data:
                    break
                received += data
                time.sleep(len(data) / rate)
        assert received == PATTERN[:total]
        sock.sendall(b"still here")
        assert sock.recv(100) == b"still here"
    assert server.alive()
