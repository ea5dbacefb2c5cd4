"""pollserve's options on asyncio servers: ``idle_timeout``, ``max_connections`` and ``linger_timeout``
on ``create_server``/``create_unix_server``, and through ``asyncio.start_server``.

Each option's effect runs on pollserve's loop per backend (debug mode and not); the same scenario
without the option runs on asyncio's loop and on pollserve's, and behaves alike.  Real sockets on
127.0.0.1; blocking clients run in the loop's executor, bounded by timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
from collections.abc import Callable
from typing import ClassVar

import pytest
import test_give_up as give_up
from conftest import RecordingHandler, aio_loop_params
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from test_give_up import BIG, SMALL, Reply, read_to_the_end
from test_progress import needs_queue_size
from tlshelpers import small_buffer_client

from pollserve.aio import AsyncioLoop
from pollserve.sendqueue import unsent_bytes

LIMIT = 10.0

#: the aio_loop fixture on pollserve's loops only: the options are pollserve's
pollserve_only = pytest.mark.parametrize(
    "aio_loop", [p for p in aio_loop_params() if not str(p.id).startswith("asyncio")], indirect=True
)


async def until(predicate: Callable[[], bool], what: str = "condition") -> None:
    """Run the loop until ``predicate()`` (bounded: a hang fails)."""
    for _ in range(int(LIMIT / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} not reached within {LIMIT} s")


def blocking(loop: asyncio.AbstractEventLoop, func: Callable, *args):
    return loop.run_in_executor(None, func, *args)


class Served(asyncio.Protocol):
    """Echoes; records every server-side connection, how it ended, and the most open at once."""

    open = 0
    peak = 0
    made: list[Served]

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.lost: list = []
        Served.made.append(self)
        Served.open += 1
        Served.peak = max(Served.peak, Served.open)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def connection_lost(self, exc) -> None:
        self.lost.append(exc)
        Served.open -= 1


@pytest.fixture(autouse=True)
def fresh_records():
    Served.made, Served.open, Served.peak = [], 0, 0


def address_of(server) -> tuple[str, int]:
    return server.sockets[0].getsockname()


async def close_server(server) -> None:
    server.close()
    await asyncio.wait_for(server.wait_closed(), LIMIT)


# -- passing through asyncio.start_server ------------------------------------------------------------


def test_start_server_passes_the_options_through_and_asyncios_loop_refuses_them(aio_loop) -> None:
    async def handler(reader, writer) -> None:
        writer.write(await reader.read(100))
        await reader.read()  # until the connection ends
        writer.close()

    async def main():
        if not isinstance(aio_loop, AsyncioLoop):
            with pytest.raises(TypeError, match="idle_timeout"):
                await asyncio.start_server(handler, "127.0.0.1", 0, idle_timeout=0.2)
            return
        server = await asyncio.start_server(handler, "127.0.0.1", 0, idle_timeout=0.3)
        reader, writer = await asyncio.open_connection(*address_of(server))
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        assert await reader.read() == b""  # closed for idleness
        counts = aio_loop.counts
        assert (counts.connections_idle_closed, counts.connections_idle_reset) == (1, 0)
        stats = aio_loop.stats()
        assert (stats["connections_idle_closed"], stats["connections_idle_reset"]) == (1, 0)
        writer.close()
        await writer.wait_closed()
        await close_server(server)

    aio_loop.run_until_complete(asyncio.wait_for(main(), LIMIT))


@pollserve_only
def test_start_unix_server_passes_the_options_through(aio_loop, tmp_path) -> None:
    path = str(tmp_path / "limited.sock")

    async def handler(reader, writer) -> None:
        writer.write(await reader.read(100))
        await reader.read()
        writer.close()

    async def main():
        server = await asyncio.start_unix_server(handler, path, max_connections=1)
        first = await asyncio.open_unix_connection(path)
        first[1].write(b"one")
        assert await first[0].readexactly(3) == b"one"
        second = await asyncio.open_unix_connection(path)
        assert await second[0].read() == b""  # refused: one is open
        assert aio_loop.counts.connections_refused == 1
        for _, writer in (first, second):
            writer.close()
        await close_server(server)

    aio_loop.run_until_complete(asyncio.wait_for(main(), LIMIT))


# -- invalid values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"idle_timeout": -1}, ValueError, "idle_timeout"),
        ({"idle_timeout": math.nan}, ValueError, "idle_timeout"),
        ({"idle_timeout": math.inf}, ValueError, "idle_timeout"),
        ({"idle_timeout": "30"}, TypeError, "idle_timeout"),
        ({"idle_timeout": True}, TypeError, "idle_timeout"),
        ({"linger_timeout": -0.5}, ValueError, "linger_timeout"),
        ({"linger_timeout": math.nan}, ValueError, "linger_timeout"),
        ({"linger_timeout": b"2"}, TypeError, "linger_timeout"),
        ({"max_connections": -3}, ValueError, "max_connections"),
        ({"max_connections": 0}, ValueError, "max_connections"),
        ({"max_connections": math.nan}, ValueError, "max_connections"),
        ({"max_connections": "10"}, TypeError, "max_connections"),
        ({"max_connections": False}, TypeError, "max_connections"),
    ],
)
def test_invalid_values_are_refused_naming_the_option(options: dict, error: type, match: str) -> None:
    loop = AsyncioLoop()
    try:
        with pytest.raises(error, match=match):
            loop.run_until_complete(loop.create_server(asyncio.Protocol, "127.0.0.1", 0, **options))
        with pytest.raises(error, match=match):
            loop.run_until_complete(loop.create_unix_server(asyncio.Protocol, "\0pollserve-limits-test", **options))
    finally:
        loop.close()


# -- idle_timeout ------------------------------------------------------------------------------------


async def quiet_client(loop, quiet: float = 0.4, **options) -> tuple[bytes, bytes]:
    """A client that echoes, says nothing for ``quiet`` seconds, then echoes again: what its two reads got."""
    server = await loop.create_server(Served, "127.0.0.1", 0, **options)
    reader, writer = await asyncio.open_connection(*address_of(server))
    writer.write(b"first")
    first = await reader.readexactly(5)
    await asyncio.sleep(quiet)
    with contextlib.suppress(ConnectionError):
        writer.write(b"again")
    try:
        second = await reader.read(5)
    except ConnectionError:
        second = b"reset"
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    await close_server(server)
    return first, second


def test_without_idle_timeout_a_quiet_connection_stays_open(aio_loop) -> None:
    assert aio_loop.run_until_complete(asyncio.wait_for(quiet_client(aio_loop), LIMIT)) == (b"first", b"again")
    if isinstance(aio_loop, AsyncioLoop):
        assert aio_loop.counts.connections_idle_closed == 0


@pollserve_only
def test_idle_timeout_closes_a_quiet_connection_with_a_clean_eof(aio_loop) -> None:
    result = aio_loop.run_until_complete(asyncio.wait_for(quiet_client(aio_loop, quiet=0.6, idle_timeout=0.25), LIMIT))
    # 0.25 s: the first exchange has that long on a busy machine before the connection counts as quiet
    assert result == (b"first", b"")
    assert (aio_loop.counts.connections_idle_closed, aio_loop.counts.connections_idle_reset) == (1, 0)
    assert Served.made[0].lost == [None]


@pollserve_only
def test_a_connection_moving_bytes_is_not_idle(aio_loop) -> None:
    async def main():
        server = await aio_loop.create_server(Served, "127.0.0.1", 0, idle_timeout=0.3)
        reader, writer = await asyncio.open_connection(*address_of(server))
        for _ in range(12):  # 0.6 s of traffic, two timeouts
            writer.write(b"tick")
            assert await reader.readexactly(4) == b"tick"
            await asyncio.sleep(0.05)
        assert aio_loop.counts.connections_idle_closed == 0
        writer.close()
        await writer.wait_closed()
        await close_server(server)

    aio_loop.run_until_complete(asyncio.wait_for(main(), LIMIT))


class Lost:
    """Records how the connection ended, for the protocols here."""

    lost: tuple = ()

    def connection_lost(self, exc) -> None:
        self.lost = (*self.lost, exc)


def reply(size: int, close: bool = False) -> type:
    """test_give_up's Reply (a pollserve Protocol, which asyncio's loop takes as it is): answers
    the first bytes with ``size`` bytes, then closes with ``close``; recorded in Reply.made."""
    return type("RecordedReply", (Lost, give_up.reply(size, close=close)), {})


@pollserve_only
@pytest.mark.parametrize(
    ("size", "close"),
    [
        pytest.param(BIG, False, id="transport-buffer"),
        pytest.param(SMALL, False, id="kernel-queue", marks=needs_queue_size),
        pytest.param(BIG, True, id="closing-flush"),
    ],
)
def test_a_client_that_stops_reading_a_big_reply_is_reset_and_counted(aio_loop, size: int, close: bool) -> None:
    """The client asks and reads nothing; the reply waits in the transport's buffer or, whole, in
    the kernel's send queue; or the app closed the connection and its flush stalls.  A FIN would
    let the client take the part it got for the whole reply: a reset.  (A transport closed with its
    buffer flushed is gone, as on asyncio's loop: what the kernel still holds is the kernel's.)"""

    async def main():
        server = await aio_loop.create_server(reply(size, close), "127.0.0.1", 0, idle_timeout=0.3)
        with small_buffer_client(address_of(server)) as sock:
            sock.sendall(b"go")
            await until(lambda: bool(Reply.made) and Reply.made[0].buffered >= 0, "the reply")
            app = Reply.made[0]
            if size == SMALL:
                assert app.buffered == 0, "the reply should have gone to the kernel whole"
                assert unsent_bytes(app.transport.get_extra_info("socket").fileno()) > SMALL // 2
            else:
                assert app.buffered > 0
            await until(lambda: aio_loop.counts.connections_idle_closed == 1, "the idle close")
            got, end = await blocking(aio_loop, read_to_the_end, sock)
        assert end == "reset", f"{got} of {size} bytes, then a clean EOF"
        assert got < size
        assert aio_loop.counts.connections_idle_reset == 1
        await until(lambda: app.lost == (None,), "connection_lost")
        await close_server(server)

    aio_loop.run_until_complete(asyncio.wait_for(main(), LIMIT))


class Unread(Lost, asyncio.Protocol):
    """Reads nothing: the client's bytes stay in the kernel."""

    made: ClassVar[list[Unread]] = []

    def connection_made(self, transport) -> None:
        transport.pause_reading()
        Unread.made.append(self)


@pollserve_only
def test_an_idle_close_lingers_for_a_client_still_sending(aio_loop) -> None:
    """The server reads nothing, so nothing moves and the connection goes idle with the client's
    bytes unread; the close lingers (a FIN, the bytes read and dropped), so the client sees a
    clean EOF, can go on sending, and ends it with its own EOF."""
    Unread.made = []

    def client(address) -> tuple[bytes, int]:
        with socket.create_connection(address, timeout=LIMIT) as sock:
            sock.sendall(b"x" * 65536)
            end = sock.recv(1)  # the idle close
            sent = 0
            for _ in range(16):
                sock.sendall(b"y" * 65536)  # the server still drains
                sent += 65536
            sock.shutdown(socket.SHUT_WR)
            return end, sent

    async def main():
        server = await aio_loop.create_server(Unread, "127.0.0.1", 0, idle_timeout=0.2)
        end, sent = await blocking(aio_loop, client, address_of(server))
        assert end == b""
        await until(lambda: bool(Unread.made) and Unread.made[0].lost == (None,), "the end of the linger")
        assert (aio_loop.counts.connections_idle_closed, aio_loop.counts.connections_idle_reset) == (1, 0)
        assert aio_loop.counts.bytes_in >= sent
        await close_server(server)

    aio_loop.run_until_complete(asyncio.wait_for(main(), LIMIT))


# -- linger_timeout ----------------------------------------------------------------------------------

REPLY = 1 << 20


def client_sending_through(address) -> tuple[int, str]:
    """Ask for the reply, and keep sending a little after every read of it (the server stopped
    reading when it closed): what arrived, and whether it ended with "eof" or "reset"."""
    with small_buffer_client(address) as sock:
        sock.sendall(b"go")
        got = 0
        sends = 0
        while got <= REPLY:
            try:
                data = sock.recv(64 << 10)
                if data and sends < 256:
                    sock.send(b"more")
                    sends += 1
            except (ConnectionResetError, BrokenPipeError):
                return got, "reset"
            if not data:
                return got, "eof"
            got += len(data)
    raise AssertionError(f"more than {REPLY} bytes")


async def reply_and_close(loop, **options) -> tuple[int, str]:
    server = await loop.create_server(reply(REPLY, close=True), "127.0.0.1", 0, **options)
    try:
        return await blocking(loop, client_sending_through, address_of(server))
    finally:
        await close_server(server)


def test_without_linger_a_client_still_sending_resets_the_reply(aio_loop) -> None:
    """asyncio's close: the socket closes with the client's bytes unread once the buffer is
    flushed, and the kernel answers with a reset, which destroys what the client has not read of the
    reply yet: most of it, unless the client (a thread of this process) read it all before the close."""
    got, end = aio_loop.run_until_complete(asyncio.wait_for(reply_and_close(aio_loop), LIMIT))
    assert end == "reset" and got <= REPLY, (got, end)


@pollserve_only
def test_linger_timeout_delivers_the_whole_reply_to_a_client_still_sending(aio_loop) -> None:
    got, end = aio_loop.run_until_complete(asyncio.wait_for(reply_and_close(aio_loop, linger_timeout=LIMIT), LIMIT))
    assert (got, end) == (REPLY, "eof")
    # The client's EOF (its socket closed) ended the linger well before the timeout.
    aio_loop.run_until_complete(asyncio.wait_for(until(lambda: Reply.made[0].lost == (None,)), LIMIT))


@pollserve_only
def test_a_linger_ends_at_the_clients_eof_at_abort_or_at_its_timeout(aio_loop) -> None:
    async def lingering(server) -> tuple[socket.socket, Served]:
        """A client whose server side closed and lingers: the client saw the EOF, and the
        server's connection is not lost yet."""
        sock = socket.create_connection(address_of(server), timeout=LIMIT)
        count = len(Served.made)
        await until(lambda: len(Served.made) > count, "the connection")
        served = Served.made[-1]
        served.transport.close()
        assert await blocking(aio_loop, sock.recv, 1) == b""  # the write side is shut at once
        await asyncio.sleep(0.05)
        assert served.lost == [] and served.transport.is_closing()
        return sock, served

    async def main():
        server = await aio_loop.create_server(Served, "127.0.0.1", 0, linger_timeout=LIMIT * 10)
        sock, served = await lingering(server)
        sock.shutdown(socket.SHUT_WR)
        await until(lambda: served.lost == [None], "the end at the client's EOF")
        sock.close()
        sock, served = await lingering(server)
        served.transport.abort()
        await until(lambda: served.lost == [None], "the end at abort()")
        sock.close()
        await close_server(server)

        short = await aio_loop.create_server(Served, "127.0.0.1", 0, linger_timeout=0.2)
        sock, served = await lingering(short)
        await until(lambda: served.lost == [None], "the end at the timeout")  # the client never sends EOF
        sock.close()
        await close_server(short)

    aio_loop.run_until_complete(asyncio.wait_for(main(), 3 * LIMIT))


# -- max_connections ---------------------------------------------------------------------------------


async def ping(address) -> str:
    """Connect and ping: "served" on the echo, "refused" on EOF or a reset."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(b"ping")
        try:
            answer = await reader.read(4)
        except ConnectionError:
            answer = b""
        return "served" if answer == b"ping" else "refused"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def three_clients(loop, **options) -> list[str]:
    server = await loop.create_server(Served, "127.0.0.1", 0, **options)
    address = address_of(server)
    opened = [await asyncio.open_connection(*address) for _ in range(2)]
    await until(lambda: len(Served.made) == 2, "two connections")
    outcome = [await ping(address)]
    for _, writer in opened:
        writer.close()
    await until(lambda: Served.open == 0, "the first two gone")
    outcome.append(await ping(address))
    await close_server(server)
    return outcome


def test_without_max_connections_every_client_is_served(aio_loop) -> None:
    assert aio_loop.run_until_complete(asyncio.wait_for(three_clients(aio_loop), LIMIT)) == ["served", "served"]


@pollserve_only
def test_max_connections_refuses_a_client_past_it_at_once_and_counts_it(aio_loop) -> None:
    outcome = aio_loop.run_until_complete(asyncio.wait_for(three_clients(aio_loop, max_connections=2), LIMIT))
    assert outcome == ["refused", "served"]  # served again once the others closed
    assert aio_loop.counts.connections_refused == 1
    assert aio_loop.counts.connections_accepted == 3
    assert len(Served.made) == 3  # no protocol made for the refused one


@pollserve_only
def test_a_burst_past_max_connections_while_others_close(aio_loop) -> None:
    """40 clients at once, the served ones leaving after a moment: never more than the limit open
    on the server, and every client either served or refused at once."""
    limit = 4

    async def client(address, stay: float) -> str:
        outcome = await ping(address)
        if outcome == "served":
            await asyncio.sleep(stay)
        return outcome

    async def main():
        server = await aio_loop.create_server(Served, "127.0.0.1", 0, max_connections=limit, backlog=64)
        address = address_of(server)
        outcomes = await asyncio.gather(*(client(address, (n % 5) * 0.01) for n in range(40)))
        assert Served.peak <= limit
        counts = aio_loop.counts
        assert outcomes.count("served") == counts.connections_accepted >= limit
        assert outcomes.count("refused") == counts.connections_refused
        await until(lambda: Served.open == 0, "every connection gone")
        assert await ping(address) == "served"
        await close_server(server)

    aio_loop.run_until_complete(asyncio.wait_for(main(), LIMIT))


@pollserve_only
def test_connections_limit_sums_the_limits_of_the_servers_accepting(aio_loop) -> None:
    async def main():
        def limit():
            return aio_loop.stats()["connections_limit"]

        assert limit() is None
        first = await aio_loop.create_server(Served, "127.0.0.1", 0, max_connections=3)
        assert limit() == 3
        # an abstract name of this process: two runs at once (pytest-xdist) must not share it
        second = await aio_loop.create_unix_server(Served, f"\0pollserve-limits-sum-{os.getpid()}", max_connections=4)
        assert limit() == 7
        unlimited = await aio_loop.create_server(Served, "127.0.0.1", 0)
        assert limit() is None  # one server without a limit: no limit in all
        await close_server(unlimited)
        assert limit() == 7
        idle = await aio_loop.create_server(Served, "127.0.0.1", 0, idle_timeout=30, start_serving=False)
        assert limit() == 7  # not accepting yet
        await idle.start_serving()
        assert limit() is None
        for server in (first, second, idle):
            await close_server(server)
        assert limit() is None

    aio_loop.run_until_complete(asyncio.wait_for(main(), LIMIT))


class ClientsComeAndGo(RuleBasedStateMachine):
    """A server with max_connections while clients connect, ping and leave in random orders:
    each new client is served exactly when fewer than the limit are open, the server never has
    more open, and the counts agree with what the clients saw."""

    backend = "epoll"
    limit = 3

    def __init__(self) -> None:
        super().__init__()
        Served.made, Served.open, Served.peak = [], 0, 0
        self.loop = AsyncioLoop(self.backend)
        self.handler = RecordingHandler()
        self.loop.set_exception_handler(self.handler)
        self.server = self.step(self.loop.create_server(Served, "127.0.0.1", 0, max_connections=self.limit))
        self.address = address_of(self.server)
        self.clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.served = 0
        self.refused = 0

    def step(self, coro):
        return self.loop.run_until_complete(asyncio.wait_for(coro, LIMIT))

    @rule()
    def connect(self) -> None:
        reader, writer = self.step(asyncio.open_connection(*self.address))
        writer.write(b"ping")

        async def answer():
            try:
                return await reader.read(4)
            except ConnectionError:
                return b""

        if self.step(answer()) == b"ping":
            assert len(self.clients) < self.limit
            self.clients.append((reader, writer))
            self.served += 1
        else:
            assert len(self.clients) == self.limit
            writer.close()
            self.refused += 1

    @precondition(lambda self: bool(self.clients))
    @rule(which=st.integers(min_value=0), abort=st.booleans())
    def leave(self, which: int, abort: bool) -> None:
        _, writer = self.clients.pop(which % len(self.clients))
        if abort:
            writer.transport.abort()
        else:
            writer.close()
        self.step(until(lambda: Served.open == len(self.clients), "the server sees the client leave"))

    @precondition(lambda self: bool(self.clients))
    @rule(which=st.integers(min_value=0))
    def ping(self, which: int) -> None:
        reader, writer = self.clients[which % len(self.clients)]
        writer.write(b"again")
        assert self.step(reader.readexactly(5)) == b"again"

    @invariant()
    def agreed(self) -> None:
        assert Served.peak <= self.limit
        assert self.loop.counts.connections_refused == self.refused
        assert self.loop.counts.connections_accepted == self.served
        assert not self.handler.calls, self.handler.calls

    def teardown(self) -> None:
        try:
            for _, writer in self.clients:
                writer.close()
            self.server.close()
            self.step(self.server.wait_closed())
            assert not self.handler.calls, self.handler.calls
        finally:
            self.loop.close()


def test_clients_come_and_go_under_max_connections(backend_name: str) -> None:
    machine = type(f"ClientsComeAndGo_{backend_name}", (ClientsComeAndGo,), {"backend": backend_name})
    machine.TestCase.settings = settings(
        max_examples=8, stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)
    )
    machine.TestCase().runTest()
