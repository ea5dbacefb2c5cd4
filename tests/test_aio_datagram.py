"""create_datagram_endpoint and its transport over real sockets (UDP on 127.0.0.1 and ::1, UNIX
datagram sockets), each test on asyncio's own loop and on pollserve's on every backend, debug mode
and not (the ``aio_loop`` fixture)."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import os
import shutil
import socket
import sys
import tempfile
from array import array

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pollserve.aio import AsyncioLoop

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

HANG = 10
variable: contextvars.ContextVar[str] = contextvars.ContextVar("variable", default="unset")


class Recorder(asyncio.DatagramProtocol):
    """Keeps what it is told; ``got`` wakes a waiter for each datagram."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.datagrams: asyncio.Queue = asyncio.Queue()
        self.lost: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.lost = asyncio.get_running_loop().create_future()
        self.events.append(("made",))

    def datagram_received(self, data: bytes, addr) -> None:
        self.datagrams.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        self.events.append(("error", type(exc)))

    def pause_writing(self) -> None:
        self.events.append(("pause",))

    def resume_writing(self) -> None:
        self.events.append(("resume",))

    def connection_lost(self, exc) -> None:
        self.events.append(("lost", exc))
        assert self.lost is not None
        self.lost.set_result(exc)


def run(loop, coro):
    return loop.run_until_complete(asyncio.wait_for(coro, HANG))


@pytest.fixture
def short_dir():
    """A directory with a path short enough for UNIX socket names."""
    path = tempfile.mkdtemp(prefix="pd", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_an_echo_between_two_endpoints_and_the_extra_info(aio_loop, host) -> None:
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def main() -> None:
        server_tr, server = await aio_loop.create_datagram_endpoint(Recorder, local_addr=(host, 0))
        address = server_tr.get_extra_info("sockname")
        client_tr, client = await aio_loop.create_datagram_endpoint(Recorder, remote_addr=address[:2])
        for transport in (server_tr, client_tr):
            assert isinstance(transport, asyncio.Transport)
            # the standard loop's is a DatagramTransport from 3.12 on
            assert isinstance(transport, asyncio.DatagramTransport) or sys.version_info < (3, 12)
            assert transport.get_extra_info("socket").fileno() >= 0
        assert client_tr.get_extra_info("peername")[:2] == address[:2]
        assert server_tr.get_extra_info("peername") is None
        client_tr.sendto("ping é".encode())
        data, peer = await server.datagrams.get()
        assert data == "ping é".encode() and peer[:2] == client_tr.get_extra_info("sockname")[:2]
        server_tr.sendto(b"pong:" + data, peer)
        assert (await client.datagrams.get())[0] == "pong:ping é".encode()
        with pytest.raises(ValueError, match="Invalid address"):
            client_tr.sendto(b"x", ("127.0.0.2", 9))
        with pytest.raises(TypeError, match="bytes-like"):
            client_tr.sendto("text")
        client_tr.close()
        server_tr.close()
        assert await client.lost is None and await server.lost is None
        assert client_tr.get_extra_info("socket") is not None

    run(aio_loop, main())


def test_sendto_takes_a_memoryview_that_is_not_of_bytes(aio_loop) -> None:
    async def main() -> None:
        server_tr, server = await aio_loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        client_tr, _ = await aio_loop.create_datagram_endpoint(Recorder, family=socket.AF_INET)
        address = server_tr.get_extra_info("sockname")
        numbers = array("i", range(50))
        client_tr.sendto(memoryview(numbers), address)
        client_tr.sendto(memoryview(bytes(range(24))).cast("B", (4, 6)), address)
        assert (await server.datagrams.get())[0] == numbers.tobytes()
        assert (await server.datagrams.get())[0] == bytes(range(24))
        if isinstance(aio_loop, AsyncioLoop):
            assert aio_loop.counts.bytes_out == 200 + 24 and aio_loop.counts.bytes_in == 200 + 24
        client_tr.close()
        server_tr.close()
        await asyncio.sleep(0)

    run(aio_loop, main())


def test_the_sock_argument_and_the_standard_errors(aio_loop) -> None:
    async def main() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        transport, protocol = await aio_loop.create_datagram_endpoint(Recorder, sock=sock)
        assert transport.get_extra_info("sockname") == sock.getsockname() and sock.gettimeout() == 0
        transport.close()
        await protocol.lost
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with other, pytest.raises(ValueError, match="can not be used when sock is specified"):
            await aio_loop.create_datagram_endpoint(Recorder, sock=other, local_addr=("127.0.0.1", 0))
        stream = socket.socket()
        with stream, pytest.raises(ValueError, match="was expected"):
            await aio_loop.create_datagram_endpoint(Recorder, sock=stream)
        with pytest.raises(ValueError, match="unexpected address family"):
            await aio_loop.create_datagram_endpoint(Recorder)
        with pytest.raises(TypeError if sys.version_info >= (3, 11) else AssertionError):
            await aio_loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0, 0))
        with pytest.raises(OSError):  # a port taken, without reuse_port
            taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            taken.bind(("127.0.0.1", 0))
            try:
                await aio_loop.create_datagram_endpoint(Recorder, local_addr=taken.getsockname())
            finally:
                taken.close()

    run(aio_loop, main())


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT")
def test_reuse_port_and_allow_broadcast(aio_loop) -> None:
    async def main() -> None:
        first, _ = await aio_loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0), reuse_port=True)
        address = first.get_extra_info("sockname")
        second, _ = await aio_loop.create_datagram_endpoint(Recorder, local_addr=address, reuse_port=True)
        broadcast, _ = await aio_loop.create_datagram_endpoint(Recorder, remote_addr=address, allow_broadcast=True)
        sock = broadcast.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST)
        assert broadcast.get_extra_info("peername") is None  # not connected: each sendto names the peer
        for transport in (first, second, broadcast):
            transport.close()
        await asyncio.sleep(0)

    run(aio_loop, main())


def test_unix_datagram_endpoints_and_a_stale_socket_file(aio_loop, short_dir) -> None:
    server_path, client_path = os.path.join(short_dir, "s"), os.path.join(short_dir, "c")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(server_path)
    stale.close()  # the file stays

    async def main() -> None:
        server_tr, server = await aio_loop.create_datagram_endpoint(
            Recorder, local_addr=server_path, family=socket.AF_UNIX
        )
        client_tr, client = await aio_loop.create_datagram_endpoint(
            Recorder, local_addr=client_path, remote_addr=server_path, family=socket.AF_UNIX
        )
        client_tr.sendto(b"over unix")
        assert await server.datagrams.get() == (b"over unix", client_path)
        server_tr.sendto(b"back", client_path)
        assert await client.datagrams.get() == (b"back", server_path)
        with pytest.raises(TypeError, match="string is expected"):
            await aio_loop.create_datagram_endpoint(Recorder, local_addr=("x", 1), family=socket.AF_UNIX)
        client_tr.close()
        server_tr.close()
        await client.lost

    run(aio_loop, main())


def test_error_received_for_a_peer_that_is_not_listening(aio_loop) -> None:
    refused = ("error", ConnectionRefusedError)

    def closed_port() -> tuple:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
            gone.bind(("127.0.0.1", 0))
            return gone.getsockname()

    async def main() -> None:
        # Up to three closed ports, two seconds each: a freed port can be bound again by anyone before
        # the first send, and Linux rate-limits "port unreachable" across the host (icmp_msgs_per_sec,
        # icmp_ratemask), so on a busy machine the answer can be late or never come for one port.
        for _ in range(3):
            transport, protocol = await aio_loop.create_datagram_endpoint(Recorder, remote_addr=closed_port())
            deadline = aio_loop.time() + 2
            while refused not in protocol.events and aio_loop.time() < deadline:
                transport.sendto(b"anyone?")  # the ICMP answer comes back on a later send or read
                await asyncio.sleep(0.01)
            if refused in protocol.events:
                break
            transport.close()
            await protocol.lost
        assert refused in protocol.events
        assert not transport.is_closing()
        transport.close()
        await protocol.lost

    run(aio_loop, main())


def test_an_error_in_datagram_received_goes_to_the_handler_and_the_endpoint_goes_on(aio_loop) -> None:
    class Failing(Recorder):
        def datagram_received(self, data: bytes, addr) -> None:
            if data == b"fail":
                raise ZeroDivisionError
            super().datagram_received(data, addr)

    async def main() -> None:
        transport, protocol = await aio_loop.create_datagram_endpoint(Failing, local_addr=("127.0.0.1", 0))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"fail", transport.get_extra_info("sockname"))
            sender.sendto(b"next", transport.get_extra_info("sockname"))
            assert (await protocol.datagrams.get())[0] == b"next"
        transport.close()
        await protocol.lost

    run(aio_loop, main())
    (context,) = aio_loop.handler.expect(1)
    assert isinstance(context["exception"], ZeroDivisionError)


def test_protocol_callbacks_run_in_the_contexts_of_the_standard_loop(aio_loop) -> None:
    seen = []

    class Watching(Recorder):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            seen.append(("made", variable.get()))
            variable.set("set in connection_made")

        def datagram_received(self, data: bytes, addr) -> None:
            seen.append(("received", variable.get()))
            variable.set("set in datagram_received")
            super().datagram_received(data, addr)

    async def main() -> None:
        variable.set("the caller's")
        transport, protocol = await aio_loop.create_datagram_endpoint(Watching, local_addr=("127.0.0.1", 0))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(2):
                sender.sendto(b"x", transport.get_extra_info("sockname"))
                await protocol.datagrams.get()
        transport.close()
        await protocol.lost
        assert variable.get() == "the caller's"

    run(aio_loop, main())
    assert seen == [("made", "the caller's"), ("received", "the caller's"), ("received", "set in datagram_received")]


def test_a_transports_fd_is_refused_to_add_reader(aio_loop) -> None:
    async def main() -> None:
        transport, protocol = await aio_loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        fd = transport.get_extra_info("socket").fileno()
        with pytest.raises(RuntimeError, match="is used by transport"):
            aio_loop.add_reader(fd, print)
        transport.close()
        await protocol.lost

    run(aio_loop, main())


# -- the write buffer, flow control, close and abort: a UNIX datagram peer that does not read ------------


@pytest.fixture
def unread_peer(short_dir):
    """A bound UNIX datagram socket that reads only when told: sends to it block once its queue is full."""
    path = os.path.join(short_dir, "peer")
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(path)
    peer.setblocking(False)
    yield peer, path
    peer.close()


def read_all(peer: socket.socket) -> list[bytes]:
    got = []
    for _ in range(100_000):
        try:
            got.append(peer.recv(65536))
        except BlockingIOError:
            return got
    raise AssertionError("the peer never ran dry")


async def endpoint_to(loop, path: str, high: int = 4096):
    transport, protocol = await loop.create_datagram_endpoint(Recorder, remote_addr=path, family=socket.AF_UNIX)
    transport.set_write_buffer_limits(high=high)
    return transport, protocol


async def fill_until_buffered(transport, count: int = 10_000) -> list[bytes]:
    sent = []
    for i in range(count):
        datagram = f"{i:08d}".encode() * 64  # 512 bytes
        transport.sendto(datagram)
        sent.append(datagram)
        if transport.get_write_buffer_size() > 0:
            break
    return sent


def test_a_full_peer_buffers_pauses_writing_and_resumes_once_drained(aio_loop, unread_peer) -> None:
    peer, path = unread_peer

    async def main() -> None:
        transport, protocol = await endpoint_to(aio_loop, path)
        sent = await fill_until_buffered(transport)
        assert transport.get_write_buffer_size() > 0
        while ("pause",) not in protocol.events:
            datagram = b"more" * 128
            transport.sendto(datagram)
            sent.append(datagram)
        size = transport.get_write_buffer_size()
        assert size > 4096
        if isinstance(aio_loop, AsyncioLoop):
            assert aio_loop.counts.write_buffer_bytes == size
        got = []
        for _ in range(1000):
            got += await aio_loop.run_in_executor(None, read_all, peer)
            await asyncio.sleep(0.005)
            if transport.get_write_buffer_size() == 0 and len(got) == len(sent):
                break
        assert got == sent
        assert protocol.events[-2:] == [("pause",), ("resume",)]
        if isinstance(aio_loop, AsyncioLoop):
            assert aio_loop.counts.write_buffer_bytes == 0
        transport.close()
        await protocol.lost

    run(aio_loop, main())


def test_close_flushes_the_buffer_first_and_abort_drops_it(aio_loop, unread_peer) -> None:
    peer, path = unread_peer

    async def main() -> None:
        transport, protocol = await endpoint_to(aio_loop, path, high=1 << 20)
        sent = await fill_until_buffered(transport)
        transport.close()
        assert transport.is_closing()
        await asyncio.sleep(0.01)
        assert not protocol.lost.done()  # waits for the buffer
        got = []
        for _ in range(1000):
            got += await aio_loop.run_in_executor(None, read_all, peer)
            if protocol.lost.done():
                break
            await asyncio.sleep(0.005)
        assert await protocol.lost is None
        got += read_all(peer)
        assert got == sent

        transport, protocol = await endpoint_to(aio_loop, path, high=1 << 20)
        await fill_until_buffered(transport)
        transport.abort()
        assert await protocol.lost is None
        if isinstance(aio_loop, AsyncioLoop):  # the standard loop (3.11+) keeps counting what abort() dropped
            assert transport.get_write_buffer_size() == 0 and aio_loop.counts.write_buffer_bytes == 0

    run(aio_loop, main())


def test_write_buffer_limits_are_checked(aio_loop) -> None:
    async def main() -> None:
        transport, protocol = await aio_loop.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0))
        transport.set_write_buffer_limits(high=100)
        assert transport.get_write_buffer_limits() == (25, 100)
        transport.set_write_buffer_limits(low=10)
        assert transport.get_write_buffer_limits() == (10, 40)
        with pytest.raises(ValueError):
            transport.set_write_buffer_limits(high=1, low=2)
        transport.close()
        await protocol.lost

    run(aio_loop, main())


# -- a state machine: sends, reads, pauses and closes in any order -----------------------------------------


class DatagramLifecycle(RuleBasedStateMachine):
    """An endpoint sending to a UNIX datagram peer that reads when the machine says so, on
    pollserve's loop (epoll, poll and select in turn).  Invariants: every datagram the peer got was
    sent, in order, none twice; the buffer's size is what the counts say; connection_lost comes once,
    after close() only once the buffer is empty, at once after abort()."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="pm", dir="/tmp")
        self.loop = AsyncioLoop(BACKENDS[len(self.dir) % len(BACKENDS)])
        self.loop.set_exception_handler(lambda loop, context: self.errors.append(context))
        self.errors: list[dict] = []
        path = os.path.join(self.dir, "peer")
        self.peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.peer.bind(path)
        self.peer.setblocking(False)
        self.transport, self.protocol = self.loop.run_until_complete(endpoint_to(self.loop, path, high=8192))
        self.sent: list[bytes] = []
        self.got: list[bytes] = []
        self.number = 0
        self.closed = False

    def spin(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0.001))

    @precondition(lambda self: not self.closed)
    @rule(count=st.integers(1, 300), size=st.integers(0, 2048))
    def send(self, count: int, size: int) -> None:
        for _ in range(count):
            self.number += 1
            datagram = self.number.to_bytes(4, "big") * (size // 4 + 1)
            self.transport.sendto(datagram)
            self.sent.append(datagram)

    @rule()
    def peer_reads(self) -> None:
        self.got += read_all(self.peer)
        self.spin()

    @precondition(lambda self: not self.closed)
    @rule()
    def pause_and_resume_reading(self) -> None:
        self.transport.pause_reading()
        assert not self.transport.is_reading()
        self.spin()
        self.transport.resume_reading()

    @precondition(lambda self: not self.closed)
    @rule(abort=st.booleans())
    def close(self, abort: bool) -> None:
        self.closed = True
        buffered = self.transport.get_write_buffer_size()
        (self.transport.abort if abort else self.transport.close)()
        self.spin()
        if abort or not buffered:
            assert self.protocol.lost.done()
        if abort:
            self.sent = self.got + read_all(self.peer)  # what was buffered is dropped
            self.got = list(self.sent)

    @invariant()
    def consistent(self) -> None:
        assert not self.errors
        assert self.got == self.sent[: len(self.got)]
        assert self.loop.counts.write_buffer_bytes == self.transport.get_write_buffer_size()
        assert [event for event in self.protocol.events if event[0] == "lost"] in ([], [("lost", None)])
        paused = [event for event in self.protocol.events if event[0] in ("pause", "resume")]
        assert all(a != b for a, b in itertools.pairwise(paused))

    def teardown(self) -> None:
        try:
            if not self.closed:
                self.transport.close()
            for _ in range(1000):
                self.got += read_all(self.peer)
                if self.protocol.lost.done():
                    break
                self.spin()
            assert self.protocol.lost.done()
            self.got += read_all(self.peer)
            assert self.got == self.sent
        finally:
            self.peer.close()
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)


BACKENDS = ["epoll", "poll", "select"] if hasattr(__import__("select"), "epoll") else ["poll", "select"]

TestDatagramLifecycle = DatagramLifecycle.TestCase
TestDatagramLifecycle.settings = settings(
    max_examples=30, stateful_step_count=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
