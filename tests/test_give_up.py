"""How pollserve gives up on a connection: a client whose bytes were not all delivered sees a reset,
never a clean EOF after a truncated reply; one that got everything sees a clean EOF.

The give-up paths are the idle timeout, the deadline of a closing connection's flush (the idle
timeout's rule, or flush_timeout) and the shutdown timeout; the bytes may wait in pollserve's own
buffer or only in the kernel's send queue.  In-process, over loopback, on every backend."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar

import pytest
from clients import connect, recv_exactly
from inprocess import in_loop, serving, wait_until
from test_progress import needs_queue_size
from tlshelpers import small_buffer_client

from pollserve.apps import Protocol
from pollserve.sendqueue import unsent_bytes
from pollserve.server import Server

#: more than loopback's socket buffers take: most of it waits in pollserve's own buffer
BIG = 16 << 20
#: what a socket with a 1 MiB send buffer takes whole: it waits in the kernel's send queue only
SMALL = 256 << 10


def read_to_the_end(sock: socket.socket, limit: int = 64 << 20) -> tuple[int, str]:
    """Read until EOF or a reset (bounded): the bytes that arrived, and "eof" or "reset"."""
    sock.settimeout(10)
    got = 0
    while got <= limit:
        try:
            data = sock.recv(1 << 20)
        except ConnectionResetError:
            return got, "reset"
        if not data:
            return got, "eof"
        got += len(data)
    raise AssertionError(f"more than {limit} bytes without an end")


class Reply(Protocol):
    """Answers the first bytes it receives with ``size`` bytes; with ``close``, then closes.  A
    reply that should wait in the kernel only gets a send buffer that takes it whole.  Records
    its transports, and how much each left in pollserve's buffer."""

    size = BIG
    close = False
    made: ClassVar[list[Reply]] = []

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        Reply.made.append(self)
        if self.size <= SMALL:
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.buffered = -1

    def data_received(self, data: bytes) -> None:
        if self.buffered >= 0:
            return
        self.transport.write(bytes(self.size))
        self.buffered = self.transport.get_write_buffer_size()
        if self.close:
            self.transport.close()


def reply(size: int, *, close: bool = False) -> Callable[[], Reply]:
    Reply.made = []
    return type("SizedReply", (Reply,), {"size": size, "close": close})


@contextmanager
def pending_reply(server: Server, size: int) -> Iterator[socket.socket]:
    """A client that asks for the reply and reads none of it, with the reply's bytes where the size
    puts them: mostly in pollserve's buffer (BIG), or all in the kernel's send queue (SMALL; the
    client's receive buffer is the kernel's minimum, so that it cannot take the reply)."""
    with small_buffer_client(server.address) as sock:
        sock.sendall(b"go")
        wait_until(lambda: bool(Reply.made) and Reply.made[0].buffered >= 0)
        app = Reply.made[0]
        if size <= SMALL:
            assert app.buffered == 0, "the reply should have gone to the kernel whole"
            fd = app.transport.get_extra_info("fd")
            assert in_loop(server, lambda: unsent_bytes(fd)) > SMALL // 2
        else:
            assert app.buffered > 0
        yield sock


def idle_counts(server: Server) -> tuple[int, int]:
    """(connections_idle_closed, connections_idle_reset), read on the loop's thread: a client can
    see its reset before the sweep that sent it has returned and counted it."""
    return in_loop(server, lambda: (server.connections_idle_closed, server.connections_idle_reset))


WHERE = [pytest.param(BIG, id="pollserve-buffer"), pytest.param(SMALL, id="kernel-queue", marks=needs_queue_size)]


@pytest.mark.parametrize("size", WHERE)
def test_the_idle_timeout_resets_a_client_with_bytes_undelivered(backend_name: str, size: int) -> None:
    with serving(backend_name, reply(size), idle_timeout=0.3) as server, pending_reply(server, size) as sock:
        wait_until(lambda: server.connections_idle_closed == 1)
        got, end = read_to_the_end(sock)
        assert end == "reset", f"{got} of {size} bytes, then a clean EOF"
        assert got < size
        assert idle_counts(server) == (1, 1)
        wait_until(lambda: not server.connections)


@pytest.mark.parametrize("size", WHERE)
def test_the_shutdown_timeout_resets_a_client_with_bytes_undelivered(backend_name: str, size: int) -> None:
    drained = threading.Event()
    with serving(backend_name, reply(size), linger_timeout=30) as server, pending_reply(server, size) as sock:
        in_loop(server, lambda: server.shutdown(0.3, drained.set))
        assert drained.wait(10)
        got, end = read_to_the_end(sock)
        assert end == "reset", f"{got} of {size} bytes, then a clean EOF"
        assert got < size


@pytest.mark.parametrize("size", WHERE)
def test_closing_the_server_now_resets_a_client_with_bytes_undelivered(backend_name: str, size: int) -> None:
    """Server.close(), which a second stop signal calls: every connection ends at once."""
    with serving(backend_name, reply(size), linger_timeout=30) as server, pending_reply(server, size) as sock:
        in_loop(server, server.close)
        got, end = read_to_the_end(sock)
        assert end == "reset", f"{got} of {size} bytes, then a clean EOF"
        assert got < size


@pytest.mark.parametrize(
    "options", [{"idle_timeout": 0.3}, {"idle_timeout": 0, "flush_timeout": 0.3}], ids=["idle-timeout", "flush-timeout"]
)
@pytest.mark.parametrize("size", WHERE)
def test_a_closing_flush_cut_short_resets(backend_name: str, size: int, options: dict) -> None:
    """The app wrote its reply and closed; the client reads none of it.  From pollserve's buffer the
    flush stalls; from the kernel's queue pollserve's part is done and the linger ends with the
    kernel's part still queued.  Either way the bytes are not delivered: a reset."""
    with (
        serving(backend_name, reply(size, close=True), linger_timeout=0.2, **options) as server,
        pending_reply(server, size) as sock,
    ):
        wait_until(lambda: not server.connections)
        got, end = read_to_the_end(sock)
        assert end == "reset", f"{got} of {size} bytes, then a clean EOF"
        assert got < size
        assert idle_counts(server) == (1, 1)


# -- what stays clean ----------------------------------------------------------------------------


def test_an_idle_client_that_read_everything_gets_a_clean_eof(backend_name: str) -> None:
    with serving(backend_name, reply(1 << 20), idle_timeout=0.3) as server, connect(server.address) as sock:
        sock.sendall(b"go")
        assert recv_exactly(sock, 1 << 20) == bytes(1 << 20)
        wait_until(lambda: server.connections_idle_closed == 1)
        assert read_to_the_end(sock) == (0, "eof")
        assert idle_counts(server) == (1, 0)


def test_a_close_that_flushes_to_a_reader_ends_with_a_clean_eof(backend_name: str) -> None:
    with (
        serving(backend_name, reply(BIG, close=True), idle_timeout=0.3, linger_timeout=0.2) as server,
        connect(server.address) as sock,
    ):
        sock.sendall(b"go")
        assert read_to_the_end(sock) == (BIG, "eof")
        wait_until(lambda: not server.connections)
        assert idle_counts(server) == (0, 0)


@needs_queue_size
def test_a_slow_reader_of_the_last_bytes_after_the_linger_gets_them_all(backend_name: str) -> None:
    """The app's close flushed into the kernel, and the client takes longer than the linger and
    the flush limit together to read what the kernel holds: it is reading, so it keeps the
    connection until the last byte, then gets the EOF."""
    with (
        serving(backend_name, reply(SMALL, close=True), linger_timeout=0.1, idle_timeout=0.4) as server,
        pending_reply(server, SMALL) as sock,
    ):
        # A bigger buffer than the minimum it connected with: the window it advertises grows too.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)
        started = time.monotonic()
        got = 0
        while got < SMALL:
            data = sock.recv(8 << 10)
            assert data, f"EOF after {got} of {SMALL} bytes"
            got += len(data)
            time.sleep(0.02)  # at most 400 KB/s: most of a second for the whole reply
        assert time.monotonic() - started > 0.5
        assert read_to_the_end(sock) == (0, "eof")
        wait_until(lambda: not server.connections)
        assert idle_counts(server) == (0, 0)


@pytest.mark.parametrize("size", WHERE)
def test_the_apps_abort_is_no_reset(backend_name: str, size: int) -> None:
    """abort() drops pollserve's buffer and closes, as asyncio's does: what the kernel holds is
    still delivered, then EOF."""
    with serving(backend_name, reply(size)) as server, pending_reply(server, size) as sock:
        in_loop(server, Reply.made[0].transport.abort)
        got, end = read_to_the_end(sock)
        assert end == "eof"
        assert 0 < got <= size
        if size == SMALL:
            assert got == size


# -- what the idle timeout can see ---------------------------------------------------------------


def test_reads_too_small_to_reopen_the_window_are_no_progress(backend_name: str) -> None:
    """A client that reads a byte every 50 ms, with a reply pending, is cut by a 0.5 s timeout:
    its kernel reopens the window it advertises only once a segment's worth (64 KiB on loopback)
    or more of its receive buffer is free, so the server's send queue never moves.  It is told
    with a reset, and the reset is counted."""
    with serving(backend_name, reply(BIG), idle_timeout=0.5) as server, connect(server.address) as sock:
        sock.sendall(b"go")
        deadline = time.monotonic() + 10
        while server.connections_idle_closed == 0:
            assert time.monotonic() < deadline, "a client reading a byte at a time was kept for 10 s"
            assert sock.recv(1)
            time.sleep(0.05)
        got, end = read_to_the_end(sock)
        assert end == "reset", f"{got} more bytes, then a clean EOF"
        assert idle_counts(server) == (1, 1)
