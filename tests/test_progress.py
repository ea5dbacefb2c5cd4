"""Idle means no progress in either direction: a client reading a large reply slowly keeps its
connection, one that stops reading loses it (even while closing), in-process over loopback."""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import ClassVar

import pytest
from clients import connect
from inprocess import in_loop, serving, wait_until
from test_server import open_fds
from tlshelpers import small_buffer_client

from pollserve.apps import Echo, Protocol
from pollserve.sendqueue import unsent_bytes


def kernel_queue_measurable() -> bool:
    with socket.socket() as sock:
        return unsent_bytes(sock.fileno()) is not None


needs_queue_size = pytest.mark.skipif(
    not kernel_queue_measurable(),
    reason=f"pollserve cannot read the kernel's send queue on {sys.platform} (platform_notes.md)",
)


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
    total, rate, timeout = 2_000_000, 400_000.0, 0.5
    with serving(backend_name, Echo, idle_timeout=timeout) as server:
        with small_buffer_client(server.address) as sock:
            sender = threading.Thread(target=sock.sendall, args=(b"x" * total,), daemon=True)
            sender.start()
            started = time.monotonic()
            assert read_slowly(sock, total, rate, seconds=30) == total
            assert time.monotonic() - started > 4 * timeout  # it did read for longer than the timeout
            sender.join(10)
            sock.sendall(b"still here")  # the connection is open: the echo goes on
            assert sock.recv(100) == b"still here"
        assert server.connections_idle_closed == 0


def test_a_client_that_stops_reading_is_closed_with_a_full_buffer(backend_name: str) -> None:
    total, timeout = 8_000_000, 0.5
    with serving(backend_name, Echo, idle_timeout=timeout) as server, connect(server.address, timeout=10) as sock:
        sender = threading.Thread(target=sock.sendall, args=(b"x" * total,), daemon=True)
        sender.start()
        assert read_slowly(sock, 200_000, 400_000.0, seconds=10) == 200_000
        wait_until(lambda: server.write_buffer_bytes > 0)  # then it reads nothing more
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
