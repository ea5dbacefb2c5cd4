"""The asyncio face's streams: the transport, servers, connections, sendfile, asyncio streams on top.

Each test runs on asyncio's own loop (the reference) and on pollserve's on every backend, in debug
mode and not (the ``aio_loop`` fixture); an exception-handler call the test did not expect fails it.
Every wait is bounded (``run``), so a hang fails the test instead of holding the suite."""

from __future__ import annotations

import array
import asyncio
import contextvars
import gc
import os
import socket
import sys
import tempfile
import weakref

import pytest
from conftest import TESTED_BUILD

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

variable: contextvars.ContextVar[str] = contextvars.ContextVar("variable", default="unset")

LIMIT = 10.0  # seconds any one step may take before the test counts it as a hang


def run(loop: asyncio.AbstractEventLoop, coro):
    return loop.run_until_complete(asyncio.wait_for(coro, LIMIT))


def is_pollserve(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.startswith("pollserve")


class Recorder(asyncio.Protocol):
    """Keeps what it is told; ``lost`` is done when connection_lost has run (the count says how often)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()
        self.eofs = 0
        self.lost_calls = 0
        self.keep_open_on_eof: bool | None = None
        loop = asyncio.get_running_loop()
        self.made = loop.create_future()
        self.lost = loop.create_future()
        self.got_eof = loop.create_future()
        self.paused = 0
        self.resumed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.made.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool | None:
        self.eofs += 1
        if not self.got_eof.done():
            self.got_eof.set_result(None)
        return self.keep_open_on_eof

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_calls += 1
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1

    async def received(self, size: int) -> bytes:
        while len(self.data) < size and not self.lost.done() and not self.got_eof.done():
            await asyncio.sleep(0.001)
        return bytes(self.data)


async def tcp_pair(loop, server_protocol=Recorder, client_protocol=Recorder):
    """A server on 127.0.0.1 and one client connected to it: (server, server's protocol, client transport,
    client's protocol)."""
    made: asyncio.Queue = asyncio.Queue()

    def factory():
        protocol = server_protocol()
        made.put_nowait(protocol)
        return protocol

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, client = await loop.create_connection(client_protocol, "127.0.0.1", port)
    accepted = await made.get()
    await accepted.made
    return server, accepted, transport, client


async def finish(server, *transports) -> None:
    for transport in transports:
        transport.close()
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0.01)


# -- the transport ------------------------------------------------------------------------------------


def test_echo_through_create_server_and_create_connection_with_the_standard_extra_info(aio_loop) -> None:
    class Echo(Recorder):
        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

    async def main():
        server, accepted, transport, client = await tcp_pair(aio_loop, server_protocol=Echo)
        assert isinstance(transport, asyncio.Transport)
        transport.write(b"hello, world")
        assert await client.received(12) == b"hello, world"
        peer = accepted.transport.get_extra_info("peername")
        assert peer == transport.get_extra_info("sockname")
        assert transport.get_extra_info("peername") == accepted.transport.get_extra_info("sockname")
        sock = transport.get_extra_info("socket")
        assert sock.fileno() >= 0 and sock.getpeername() == transport.get_extra_info("peername")
        assert transport.get_extra_info("no such key", "default") == "default"
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        # The transport's fd is its own: the public add_reader refuses it, as the standard loop does.
        with pytest.raises(RuntimeError):
            aio_loop.add_reader(sock.fileno(), lambda: None)
        await finish(server, transport)
        assert await client.lost is None and client.lost_calls == 1

    run(aio_loop, main())


def test_write_buffer_limits_pause_and_resume_the_writer(aio_loop) -> None:
    async def main():
        server, accepted, transport, client = await tcp_pair(aio_loop)
        writer = accepted.transport
        assert writer.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
        writer.set_write_buffer_limits(high=4096)
        assert writer.get_write_buffer_limits() == (1024, 4096)
        with pytest.raises(ValueError):
            writer.set_write_buffer_limits(high=1, low=2)
        transport.pause_reading()  # the client reads nothing: the server's writes pile up
        assert not transport.is_reading()
        chunk = b"x" * 65536
        sent = 0
        while not accepted.paused and sent < 256 * 1024 * 1024:
            writer.write(chunk)
            sent += len(chunk)
        assert accepted.paused == 1 and writer.get_write_buffer_size() > 4096
        transport.resume_reading()
        assert transport.is_reading()
        assert len(await client.received(sent)) == sent
        assert accepted.resumed == 1 and writer.get_write_buffer_size() == 0
        await finish(server, transport, writer)

    run(aio_loop, main())


def test_close_flushes_the_buffer_first_and_abort_drops_it(aio_loop) -> None:
    size = 8 * 1024 * 1024

    async def main():
        server, accepted, transport, client = await tcp_pair(aio_loop)
        transport.pause_reading()
        accepted.transport.write(b"a" * size)
        accepted.transport.close()
        assert accepted.transport.is_closing()
        await asyncio.sleep(0.01)
        assert not accepted.lost.done()  # still flushing
        transport.resume_reading()
        await client.got_eof
        assert len(client.data) == size
        assert await accepted.lost is None and accepted.lost_calls == 1

        server2, accepted2, transport2, client2 = await tcp_pair(aio_loop)
        transport2.pause_reading()
        accepted2.transport.write(b"b" * size)
        accepted2.transport.abort()
        accepted2.transport.close()
        accepted2.transport.abort()
        assert await accepted2.lost is None
        transport2.resume_reading()
        await client2.lost
        assert len(client2.data) < size
        await asyncio.sleep(0.01)
        assert accepted2.lost_calls == 1
        await finish(server, transport)
        await finish(server2, transport2)

    run(aio_loop, main())


def test_write_eof_and_the_eof_received_answer(aio_loop) -> None:
    async def main():
        server, accepted, transport, client = await tcp_pair(aio_loop)
        accepted.keep_open_on_eof = True  # half-close: the server may still write
        assert transport.can_write_eof()
        transport.write(b"question")
        transport.write_eof()
        with pytest.raises(RuntimeError):
            transport.write(b"more")
        await accepted.got_eof
        assert bytes(accepted.data) == b"question" and not accepted.transport.is_closing()
        accepted.transport.write(b"answer")
        accepted.transport.close()
        await client.lost
        assert bytes(client.data) == b"answer"

        accepted.keep_open_on_eof = None  # the default: the transport closes itself at EOF
        _, accepted2, transport2, _client2 = await tcp_pair(aio_loop)
        transport2.write_eof()
        assert await accepted2.lost is None
        await finish(server, transport, transport2)

    run(aio_loop, main())


def test_a_protocol_that_pauses_and_resumes_reading_after_eof_hears_of_eof_once(aio_loop) -> None:
    class PausesAtEof(Recorder):
        def eof_received(self) -> bool:
            super().eof_received()
            self.transport.pause_reading()
            self.transport.resume_reading()
            return True

    async def main():
        server, accepted, transport, client = await tcp_pair(aio_loop, server_protocol=PausesAtEof)
        transport.write(b"last words")
        transport.write_eof()
        await accepted.got_eof
        await asyncio.sleep(0.05)
        accepted.transport.pause_reading()
        accepted.transport.resume_reading()
        await asyncio.sleep(0.05)
        # asyncio's own loop (3.10 to 3.13) reads again after a resume and calls eof_received once
        # more for every pause and resume; pollserve's reads nothing more past EOF (docs/asyncio.md).
        assert accepted.eofs == 1 if is_pollserve(aio_loop) else accepted.eofs >= 1
        assert bytes(accepted.data) == b"last words"
        accepted.transport.write(b"still writable")
        accepted.transport.close()
        await client.lost
        assert bytes(client.data) == b"still writable"
        await finish(server, transport)

    run(aio_loop, main())


def test_write_takes_any_buffer_a_memoryview_of_ints_or_two_dimensions_and_bytes_that_are_not_ascii(aio_loop) -> None:
    ints = array.array("i", range(1000))
    grid = memoryview(bytes(range(256)) * 4).cast("B", shape=[32, 32])
    text = "naïve café, Grüße, 日本語, 🙂".encode()

    async def main():
        server, accepted, transport, client = await tcp_pair(aio_loop)
        expected = ints.tobytes() + grid.tobytes() + text + bytes(bytearray(b"\xff\x00\x80"))
        transport.write(memoryview(ints))
        transport.write(grid)
        transport.write(text)
        transport.writelines([bytearray(b"\xff\x00"), memoryview(b"\x80")])
        assert await accepted.received(len(expected)) == expected
        # Buffered too: the client stops reading, so the bytes wait in the transport's buffer.
        accepted.transport.set_write_buffer_limits(high=1 << 30)
        transport.pause_reading()
        big = array.array("q", range(200_000))
        accepted.transport.write(memoryview(big))
        accepted.transport.write(memoryview(big))
        transport.resume_reading()
        assert await client.received(2 * len(big.tobytes())) == big.tobytes() * 2
        await finish(server, transport)

    run(aio_loop, main())


def test_write_refuses_what_is_not_bytes(aio_loop) -> None:
    async def main():
        server, _accepted, transport, _client = await tcp_pair(aio_loop)
        with pytest.raises(TypeError):
            transport.write("text")
        await finish(server, transport)

    run(aio_loop, main())


def test_a_megabyte_arrives_whole_and_in_order_and_reads_grow_past_the_first_small_one(aio_loop) -> None:
    payload = os.urandom(1 << 20)

    class Chunks(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.sizes: list[int] = []

        def data_received(self, data: bytes) -> None:
            self.sizes.append(len(data))
            super().data_received(data)

    async def main():
        server, accepted, transport, _client = await tcp_pair(aio_loop, server_protocol=Chunks)
        transport.write(payload)
        assert await accepted.received(len(payload)) == payload
        # Reads start small and grow while they come back full: far fewer reads than 479-byte ones.
        assert max(accepted.sizes) > 4096 and len(accepted.sizes) < len(payload) // 4096, accepted.sizes[:20]
        accepted.transport.write(b"small")
        await finish(server, transport, accepted.transport)

    run(aio_loop, main())


def test_a_closed_transport_is_freed_without_the_garbage_collector(aio_loop) -> None:
    """pollserve's transport and its compiled core refer to each other until the close: no cycle
    may be left after it, or every closed connection would wait for a collection to be freed."""
    if not is_pollserve(aio_loop):
        pytest.skip("asyncio's own loop keeps a closed client transport referenced (no promise there)")

    async def main():
        server, accepted, transport, client = await tcp_pair(aio_loop)
        transport.write(b"hi")
        assert await accepted.received(2) == b"hi"
        gone = weakref.ref(transport)
        transport.close()
        await client.lost
        await asyncio.sleep(0.01)
        del transport
        client.transport = None
        assert gone() is None
        await finish(server, accepted.transport)

    gc.disable()
    try:
        run(aio_loop, main())
    finally:
        gc.enable()


def test_a_transport_closed_from_inside_its_own_data_received(aio_loop) -> None:
    class ClosesAtOnce(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.transport.write(b"bye")
            self.transport.close()
            self.transport.close()
            self.transport.write(b"dropped")

    async def main():
        server, accepted, transport, client = await tcp_pair(aio_loop, server_protocol=ClosesAtOnce)
        transport.write(b"hi")
        assert await accepted.lost is None
        await client.lost
        assert bytes(client.data) == b"bye" and accepted.lost_calls == 1
        await finish(server, transport)

    run(aio_loop, main())


def test_a_client_that_keeps_sending_while_the_server_closes(aio_loop) -> None:
    async def main():
        server, accepted, transport, client = await tcp_pair(aio_loop)
        for _ in range(50):
            transport.write(b"z" * 65536)
            await asyncio.sleep(0)
        accepted.transport.close()
        server.close()
        for _ in range(200):
            if transport.is_closing():
                break
            transport.write(b"z" * 65536)
            await asyncio.sleep(0.001)
        assert await accepted.lost is None
        await client.lost  # reset or EOF: either way the client's transport ends, once
        await server.wait_closed()
        assert client.lost_calls == 1 and accepted.lost_calls == 1

    run(aio_loop, main())


def test_an_error_in_data_received_is_the_standard_fatal_error(aio_loop) -> None:
    class Fails(Recorder):
        def data_received(self, data: bytes) -> None:
            raise ZeroDivisionError("bad protocol")

    async def main():
        server, accepted, transport, client = await tcp_pair(aio_loop, server_protocol=Fails)
        transport.write(b"boom")
        error = await accepted.lost
        assert isinstance(error, ZeroDivisionError)
        (context,) = aio_loop.handler.expect(1)
        assert context["message"] == "Fatal error: protocol.data_received() call failed."
        assert context["exception"] is error and context["protocol"] is accepted
        assert context["transport"] is accepted.transport
        await client.lost
        await finish(server, transport)

    run(aio_loop, main())


def test_buffered_protocol_reads_into_its_own_buffer(aio_loop) -> None:
    class Buffered(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buffer = bytearray(7)  # small, so a message takes several reads
            self.data = bytearray()
            self.sizes = []
            self.done = asyncio.get_running_loop().create_future()
            self.made = asyncio.get_running_loop().create_future()

        def connection_made(self, transport) -> None:
            self.transport = transport
            self.made.set_result(None)

        def get_buffer(self, sizehint: int) -> bytearray:
            self.sizes.append(sizehint)
            return self.buffer

        def buffer_updated(self, nbytes: int) -> None:
            self.data += self.buffer[:nbytes]

        def eof_received(self) -> None:
            self.done.set_result(bytes(self.data))

    async def main():
        server, accepted, transport, _client = await tcp_pair(aio_loop, server_protocol=Buffered)
        message = bytes(range(256)) * 10
        transport.write(message)
        transport.write_eof()
        assert await accepted.done == message
        assert len(accepted.sizes) >= len(message) // 7
        await finish(server, transport)

    run(aio_loop, main())


def test_protocol_callbacks_run_in_the_context_of_create_server(aio_loop) -> None:
    seen = []

    class Contexts(Recorder):
        def connection_made(self, transport) -> None:
            seen.append(("made", variable.get()))
            variable.set("set in connection_made")
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            seen.append(("data", variable.get()))
            super().data_received(data)

    async def main():
        variable.set("the server's")
        server, accepted, transport, _client = await tcp_pair(aio_loop, server_protocol=Contexts)
        variable.set("changed afterwards")
        transport.write(b"x")
        await accepted.received(1)
        assert seen == [("made", "the server's"), ("data", "the server's")]
        await finish(server, transport)

    asyncio_context = contextvars.copy_context()
    asyncio_context.run(run, aio_loop, main())


# -- servers --------------------------------------------------------------------------------------------


def test_the_server_object_start_serving_sockets_and_async_with(aio_loop) -> None:
    async def main():
        server = await aio_loop.create_server(Recorder, "127.0.0.1", 0, start_serving=False)
        assert isinstance(server, asyncio.AbstractServer)
        assert server.get_loop() is aio_loop and not server.is_serving()
        port = server.sockets[0].getsockname()[1]
        await server.start_serving()
        assert server.is_serving()
        transport, _client = await aio_loop.create_connection(Recorder, "127.0.0.1", port)
        async with server:
            assert server.is_serving()
            transport.close()
        assert not server.is_serving() and server.sockets == ()
        await server.wait_closed()  # closed, and its one connection is gone

    run(aio_loop, main())


def test_serve_forever_cancelled_closes_the_server(aio_loop) -> None:
    async def main():
        server = await aio_loop.create_server(Recorder, "127.0.0.1", 0, start_serving=False)
        task = asyncio.ensure_future(server.serve_forever())
        await asyncio.sleep(0.01)
        assert server.is_serving()
        with pytest.raises(RuntimeError):
            await server.serve_forever()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not server.is_serving()
        with pytest.raises(RuntimeError):
            await server.serve_forever()

    run(aio_loop, main())


def test_wait_closed_waits_for_the_connections_from_3_12_1(aio_loop) -> None:
    async def main():
        server, accepted, transport, _client = await tcp_pair(aio_loop)
        server.close()
        waiting = asyncio.ensure_future(server.wait_closed())
        await asyncio.sleep(0.05)
        if sys.version_info >= (3, 12, 1):
            assert not waiting.done()  # a connection is still open
        else:
            assert waiting.done()  # the old rule: closed is enough
        transport.close()
        accepted.transport.close()
        await waiting
        await accepted.lost

    run(aio_loop, main())


@pytest.mark.skipif(sys.version_info < (3, 13), reason="close_clients and abort_clients are 3.13's")
def test_close_clients_and_abort_clients(aio_loop) -> None:
    async def main():
        server, accepted, transport, client = await tcp_pair(aio_loop)
        _, _accepted2, transport2, client2 = await tcp_pair_on(aio_loop, server)
        server.close()
        accepted.transport.write(b"flushed first")
        server.close_clients()
        await client.lost
        assert bytes(client.data) == b"flushed first"
        server.abort_clients()
        await client2.lost
        await server.wait_closed()
        transport.close()
        transport2.close()

    run(aio_loop, main())


async def tcp_pair_on(loop, server):
    """One more client of ``server``, whose protocols are Recorders."""
    port = server.sockets[0].getsockname()[1]
    before = set(server._clients) if hasattr(server, "_clients") else set()
    transport, client = await loop.create_connection(Recorder, "127.0.0.1", port)
    for _ in range(1000):
        new = set(server._clients) - before
        if new:
            (accepted_transport,) = new
            return server, accepted_transport.get_protocol(), transport, client
        await asyncio.sleep(0.001)
    raise AssertionError("the server did not accept")


def test_a_server_closed_while_clients_connect(aio_loop) -> None:
    async def main():
        server = await aio_loop.create_server(Recorder, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def connect():
            try:
                transport, _ = await aio_loop.create_connection(Recorder, "127.0.0.1", port)
            except OSError:
                return None
            return transport

        attempts = [asyncio.ensure_future(connect()) for _ in range(30)]
        await asyncio.sleep(0)
        server.close()
        transports = [t for t in await asyncio.gather(*attempts) if t is not None]
        for transport in transports:
            transport.close()
        await server.wait_closed()
        with pytest.raises(OSError):
            await aio_loop.create_connection(Recorder, "127.0.0.1", port)

    run(aio_loop, main())


def test_unix_server_and_connection(aio_loop) -> None:
    class Echo(Recorder):
        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

    async def main():
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "sock")
            server = await aio_loop.create_unix_server(Echo, path)
            transport, client = await aio_loop.create_unix_connection(Recorder, path)
            assert transport.get_extra_info("peername") == path
            transport.write(b"over a unix socket")
            assert await client.received(18) == b"over a unix socket"
            assert transport.can_write_eof()
            transport.close()
            server.close()
            await server.wait_closed()
            if sys.version_info >= (3, 13):
                assert not os.path.exists(path)  # cleanup_socket

    run(aio_loop, main())


def test_connect_accepted_socket_and_sock_accept_and_sock_connect(aio_loop) -> None:
    async def main():
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        client = socket.socket()
        client.setblocking(False)
        try:
            connecting = asyncio.ensure_future(aio_loop.sock_connect(client, listener.getsockname()))
            conn, address = await aio_loop.sock_accept(listener)
            await connecting
            assert address == client.getsockname()
            transport, protocol = await aio_loop.connect_accepted_socket(Recorder, conn)
            client.sendall(b"accepted elsewhere")
            assert await protocol.received(18) == b"accepted elsewhere"
            transport.close()
            await protocol.lost
        finally:
            client.close()
            listener.close()

    run(aio_loop, main())


@pytest.mark.parametrize("step", range(6))
def test_a_connect_cancelled_at_every_await_leaves_no_fd_and_no_error(aio_loop, step: int) -> None:
    """create_connection to a name (getaddrinfo in the executor), cancelled after ``step`` passes."""

    async def main():
        server = await aio_loop.create_server(Recorder, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        task = asyncio.ensure_future(aio_loop.create_connection(Recorder, "localhost", port, family=socket.AF_INET))
        for _ in range(step):
            await asyncio.sleep(0)
        task.cancel()
        try:
            transport, _ = await task
        except asyncio.CancelledError:
            pass
        else:
            transport.close()
        # asyncio's own loop reports a connection accepted just before close() as an error (in debug
        # mode): let the accept finish first.
        await asyncio.sleep(0.02)
        server.close()
        await server.wait_closed()

    run(aio_loop, main())
    if is_pollserve(aio_loop):
        assert not aio_loop._transports or all(t.is_closing() for t in aio_loop._transports.values())


def test_sock_accept_cancelled_leaves_the_listener_usable(aio_loop) -> None:
    async def main():
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        try:
            task = asyncio.ensure_future(aio_loop.sock_accept(listener))
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            client = socket.create_connection(listener.getsockname())
            conn, _ = await aio_loop.sock_accept(listener)
            conn.close()
            client.close()
        finally:
            listener.close()

    run(aio_loop, main())


def test_create_connection_errors_and_local_addr(aio_loop) -> None:
    async def main():
        closed = socket.create_server(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        with pytest.raises(ConnectionRefusedError):
            await aio_loop.create_connection(Recorder, "127.0.0.1", port)
        with pytest.raises(ValueError):
            await aio_loop.create_connection(Recorder)
        server = await aio_loop.create_server(Recorder, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await aio_loop.create_connection(
            Recorder, "127.0.0.1", port, local_addr=("127.0.0.1", 0), happy_eyeballs_delay=0.05
        )
        assert transport.get_extra_info("sockname")[0] == "127.0.0.1"
        await finish(server, transport)

    run(aio_loop, main())


def refused_connection_error_referrers(loop: asyncio.AbstractEventLoop) -> list:
    """What refers to the error a refused create_connection() raised, once its except clause is left,
    as anyio's test_happy_eyeballs_refcycles looks at it."""

    async def main():
        closed = socket.create_server(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        error = None
        try:
            await loop.create_connection(Recorder, "127.0.0.1", port)
        except ConnectionRefusedError as exc:
            error = exc
        assert error is not None, "the connection was not refused"
        for _ in range(3):  # the callbacks the failure scheduled run, and let go of it
            await asyncio.sleep(0)
        return gc.get_referrers(error)

    return run(loop, main())


def test_a_refused_connections_error_is_held_by_no_list_of_its_attempts_errors(aio_loop) -> None:
    """create_connection() keeps its attempts' errors in lists while it tries, which the frames its
    error's traceback holds would keep with the error in a reference cycle (CPython gh-124859): the
    error goes when its last reference does, with no collection."""
    assert [referrer for referrer in refused_connection_error_referrers(aio_loop) if isinstance(referrer, list)] == []


@pytest.mark.skipif(
    TESTED_BUILD != "compiled",
    reason="pure Python: the core's dispatch frame, which the error's traceback holds, keeps the last callback",
)
def test_a_refused_connections_error_is_held_by_no_future_it_was_set_on(aio_loop) -> None:
    """Nor by the future sock_connect() waited on, which the frames of the wait and of the writable
    callback that set the error would keep in a cycle with it (asyncio's loop lets go of it the same way)."""
    referrers = refused_connection_error_referrers(aio_loop)
    assert [referrer for referrer in referrers if isinstance(referrer, asyncio.Future)] == []


# -- sendfile and asyncio streams ----------------------------------------------------------------------


@pytest.mark.parametrize("fallback_only", [False, True], ids=["native", "fallback"])
def test_sendfile_sends_the_file_and_leaves_its_position_after_it(aio_loop, fallback_only: bool) -> None:
    content = os.urandom(1024 * 1024 + 17)

    async def main():
        server, accepted, transport, _client = await tcp_pair(aio_loop)
        with tempfile.TemporaryFile() as file:
            file.write(content)
            file.flush()
            file.seek(0)
            source = file if not fallback_only else _Unregular(content)
            transport.write(b"before;")
            sent = await aio_loop.sendfile(transport, source, offset=10, count=len(content) - 20)
            transport.write(b";after")
            assert sent == len(content) - 20 and source.tell() == len(content) - 10
            expected = b"before;" + content[10:-10] + b";after"
            assert await accepted.received(len(expected)) == expected
        await finish(server, transport)

    run(aio_loop, main())


class _Unregular:
    """A file with no fileno(): sendfile takes the fallback."""

    def __init__(self, content: bytes) -> None:
        self._content = content
        self._position = 0

    def seek(self, position: int) -> None:
        self._position = position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer) -> int:
        chunk = self._content[self._position : self._position + len(buffer)]
        buffer[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)


def test_asyncio_streams_work_unchanged(aio_loop) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line.upper())
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(100):
            writer.write(f"line {i}\n".encode())
            await writer.drain()
            assert await reader.readline() == f"LINE {i}\n".encode()
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(aio_loop, main())
