"""TLS on the asyncio face: ``ssl=``, ``start_tls``, the handshake and shutdown timeouts, and the
hostile peers (cut handshakes, silent peers, bad certificates, a peer that never answers close_notify).

Each test runs on asyncio's own loop (the reference) and on pollserve's on every backend, in debug
mode and not (the ``aio_loop`` fixture).  The hostile peers are plain sockets driven by the test
through ``sock_*`` calls, with an ``ssl.SSLObject`` on memory BIOs where they speak TLS, so the test
decides what each one sends and when."""

from __future__ import annotations

import array
import asyncio
import contextlib
import random
import select
import socket
import ssl
import sys
import time
from typing import Any

import pytest
import trustme
from conftest import REQUESTED, RecordingHandler
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from tlshelpers import HOSTNAME, Certs, make_certs

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

LIMIT = 10.0  # seconds any one step may take before the test counts it as a hang
QUICK = 0.3  # the handshake and shutdown timeouts the hostile cases set

HAS_SHUTDOWN_TIMEOUT = sys.version_info >= (3, 11)
needs_shutdown_timeout = pytest.mark.skipif(not HAS_SHUTDOWN_TIMEOUT, reason="ssl_shutdown_timeout is 3.11's")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("aio-tls"))


def server_context(certs: Certs) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert_file, certs.key_file)
    return context


def is_pollserve(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.startswith("pollserve")


def run(loop: asyncio.AbstractEventLoop, coro):
    return loop.run_until_complete(asyncio.wait_for(coro, LIMIT))


async def until(predicate, what: str = "condition", limit: float = LIMIT) -> None:
    for _ in range(int(limit / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{what} not reached within {limit} s")


def reported(loop, *messages: str) -> None:
    """Take the exception-handler calls of failed handshakes: the standard loop reports a failed
    incoming handshake in debug mode only, so there must be none otherwise."""
    calls, loop.handler.calls = loop.handler.calls, []
    if not loop.get_debug():
        assert not calls, calls
    for call in calls:
        assert call["message"].startswith(messages), call


class Peer(asyncio.Protocol):
    """Records what it is told; ``echo`` sends every byte back."""

    def __init__(self, echo: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.echo = echo
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()
        self.lost_calls = 0
        self.made = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.made.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.echo:
            self.transport.write(data)

    def eof_received(self) -> None:
        return None

    def connection_lost(self, exc) -> None:
        self.lost_calls += 1
        if not self.lost.done():
            self.lost.set_result(exc)


async def echo_server(loop, certs: Certs, made: list | None = None, echo: bool = True, **options):
    def factory():
        peer = Peer(echo=echo)
        if made is not None:
            made.append(peer)
        return peer

    server = await loop.create_server(factory, "127.0.0.1", 0, ssl=server_context(certs), **options)
    return server, server.sockets[0].getsockname()


async def served_once(loop, certs: Certs, address) -> None:
    """One whole TLS exchange with the server at ``address``: the loop and the server still work."""
    reader, writer = await asyncio.open_connection(*address, ssl=certs.client_context(), server_hostname=HOSTNAME)
    writer.write(b"still serving")
    assert await reader.readexactly(13) == b"still serving"
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


async def raw_client(loop, address) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, address)
    return sock


def listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    return sock


async def recv_until_closed(loop, sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (a reset counts as its close)."""
    data = bytearray()
    while True:
        try:
            chunk = await loop.sock_recv(sock, 65536)
        except ConnectionError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


class BIOPeer:
    """One end of TLS on a plain socket, each step taken when the test says: the hostile peer."""

    def __init__(self, loop, sock: socket.socket, context: ssl.SSLContext, server_side: bool) -> None:
        self.loop = loop
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=None if server_side else HOSTNAME
        )

    async def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def feed(self) -> None:
        data = await self.loop.sock_recv(self.sock, 65536)
        if not data:
            raise ConnectionResetError("the peer closed")
        self.incoming.write(data)

    def step(self) -> bool:
        """One try at the handshake: True when done."""
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    async def handshake(self) -> None:
        while not self.step():
            await self.flush()
            await self.feed()
        await self.flush()


def client_hello(certs: Certs) -> bytes:
    tls = certs.client_context().wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=HOSTNAME)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# -- the calls and their extra info ---------------------------------------------------------------------


def test_echo_over_tls_with_the_tls_and_socket_extra_info(aio_loop, certs: Certs) -> None:
    async def main():
        made: list[Peer] = []
        server, address = await echo_server(aio_loop, certs, made)
        context = certs.client_context()
        transport, client = await aio_loop.create_connection(Peer, *address, ssl=context, server_hostname=HOSTNAME)
        await client.made
        transport.write(b"hello")
        await until(lambda: client.data == b"hello", "the echo")
        assert transport.get_extra_info("sslcontext") is context  # the user's context, as given
        assert isinstance(transport.get_extra_info("ssl_object"), ssl.SSLObject)
        assert ("DNS", HOSTNAME) in transport.get_extra_info("peercert")["subjectAltName"]
        _, version, bits = transport.get_extra_info("cipher")
        assert version.startswith("TLS") and bits > 0
        assert transport.get_extra_info("compression") is None
        sock = transport.get_extra_info("socket")
        assert sock.getpeername() == address == transport.get_extra_info("peername")
        assert transport.get_extra_info("sockname") == sock.getsockname()
        accepted = made[0].transport
        assert accepted.get_extra_info("peername") == transport.get_extra_info("sockname")
        assert accepted.get_extra_info("peercert") is None  # no client certificate asked for
        transport.close()
        assert await client.lost is None
        await until(lambda: made[0].lost.done(), "the server's connection_lost")
        server.close()
        await server.wait_closed()
        assert client.lost_calls == 1 and made[0].lost_calls == 1

    run(aio_loop, main())


def test_ssl_true_is_asyncio_default_context_which_verifies(aio_loop, certs: Certs) -> None:
    """ssl=True: the system's CAs, which do not know the test's CA, so the handshake fails."""

    async def main():
        server, address = await echo_server(aio_loop, certs)
        with pytest.raises(ssl.SSLCertVerificationError):
            await aio_loop.create_connection(asyncio.Protocol, *address, ssl=True, server_hostname=HOSTNAME)
        await served_once(aio_loop, certs, address)
        server.close()
        await server.wait_closed()

    run(aio_loop, main())
    reported(aio_loop, "Error on transport creation")


def test_tls_over_unix_sockets_and_connect_accepted_socket(aio_loop, certs: Certs, tmp_path) -> None:
    async def main():
        path = str(tmp_path / "tls.sock")
        server = await aio_loop.create_unix_server(lambda: Peer(echo=True), path, ssl=server_context(certs))
        reader, writer = await asyncio.open_unix_connection(path, ssl=certs.client_context(), server_hostname=HOSTNAME)
        writer.write("ünïcode ✓".encode())
        assert (await reader.readexactly(len("ünïcode ✓".encode()))).decode() == "ünïcode ✓"
        writer.close()
        server.close()
        await server.wait_closed()
        # connect_accepted_socket(ssl=) on a socket accepted by hand
        with listener() as sock:
            connecting = asyncio.ensure_future(
                asyncio.open_connection(*sock.getsockname(), ssl=certs.client_context(), server_hostname=HOSTNAME)
            )
            conn, _ = await aio_loop.sock_accept(sock)
            _, peer = await aio_loop.connect_accepted_socket(lambda: Peer(echo=True), conn, ssl=server_context(certs))
            reader, writer = await connecting
            writer.write(b"accepted")
            assert await reader.readexactly(8) == b"accepted"
            writer.close()
            await until(lambda: peer.lost.done(), "connection_lost")

    run(aio_loop, main())


# -- hostile peers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["before any byte", "mid ClientHello"])
def test_a_client_closing_mid_handshake_is_closed_and_the_server_goes_on(aio_loop, certs: Certs, cut: str) -> None:
    async def main():
        made: list[Peer] = []
        server, address = await echo_server(aio_loop, certs, made)
        sock = await raw_client(aio_loop, address)
        with sock:
            if cut == "mid ClientHello":
                hello = client_hello(certs)
                await aio_loop.sock_sendall(sock, hello[: len(hello) // 2])
            sock.shutdown(socket.SHUT_WR)
            assert await recv_until_closed(aio_loop, sock) == b""  # the server closed it, saying nothing
        await served_once(aio_loop, certs, address)
        assert len(made) == 2 and not made[0].made.done()  # the cut one never reached the protocol
        server.close()
        await server.wait_closed()

    run(aio_loop, main())
    reported(aio_loop, "Error on transport creation")


def test_a_server_closing_mid_handshake_fails_create_connection(aio_loop, certs: Certs) -> None:
    async def main():
        with listener() as sock:
            connecting = asyncio.ensure_future(
                aio_loop.create_connection(
                    Peer, *sock.getsockname(), ssl=certs.client_context(), server_hostname=HOSTNAME
                )
            )
            conn, _ = await aio_loop.sock_accept(sock)
            with conn:
                assert await aio_loop.sock_recv(conn, 65536)  # its ClientHello; no answer, a close
            with pytest.raises(OSError):  # ConnectionResetError, or an SSLError where the reset lands in it
                await connecting

    run(aio_loop, main())


def test_handshake_timeout_against_a_silent_server(aio_loop, certs: Certs) -> None:
    async def main():
        with listener() as sock:  # the kernel completes the connect; nobody ever answers
            with pytest.raises(ConnectionAbortedError):
                await aio_loop.create_connection(
                    asyncio.Protocol,
                    *sock.getsockname(),
                    ssl=certs.client_context(),
                    server_hostname=HOSTNAME,
                    ssl_handshake_timeout=QUICK,
                )
            assert await aio_loop.run_in_executor(None, lambda: 1) == 1  # the loop lives

    run(aio_loop, main())


def test_handshake_timeout_against_a_silent_client(aio_loop, certs: Certs) -> None:
    async def main():
        made: list[Peer] = []
        server, address = await echo_server(aio_loop, certs, made, ssl_handshake_timeout=QUICK)
        with await raw_client(aio_loop, address) as sock:
            assert await recv_until_closed(aio_loop, sock) == b""  # closed by the server's timeout
        assert not made[0].made.done()
        await served_once(aio_loop, certs, address)
        server.close()
        await server.wait_closed()

    run(aio_loop, main())
    reported(aio_loop, "Error on transport creation")


@pytest.mark.parametrize("why", ["unknown CA", "wrong name"])
def test_a_certificate_failing_verification_reaches_the_caller(aio_loop, certs: Certs, why: str) -> None:
    async def main():
        server, address = await echo_server(aio_loop, certs)
        if why == "unknown CA":
            context = ssl.create_default_context()
            trustme.CA().configure_trust(context)
            name = HOSTNAME
        else:
            context, name = certs.client_context(), "not-the-server.example"
        with pytest.raises(ssl.SSLCertVerificationError):
            await aio_loop.create_connection(asyncio.Protocol, *address, ssl=context, server_hostname=name)
        await served_once(aio_loop, certs, address)
        server.close()
        await server.wait_closed()

    run(aio_loop, main())
    reported(aio_loop, "Error on transport creation")


def test_a_client_certificate_the_server_requires_and_verifies(aio_loop, certs: Certs) -> None:
    async def main():
        context = server_context(certs)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certs.ca_file)
        made: list[Peer] = []

        def factory():
            made.append(Peer(echo=True))
            return made[-1]

        server = await aio_loop.create_server(factory, "127.0.0.1", 0, ssl=context)
        address = server.sockets[0].getsockname()
        reader, writer = await asyncio.open_connection(
            *address, ssl=certs.client_context(certificate=True), server_hostname=HOSTNAME
        )
        writer.write(b"mine")
        assert await reader.readexactly(4) == b"mine"
        assert made[0].transport.get_extra_info("peercert")["subject"]
        writer.close()
        # without a certificate: refused (TLS 1.3 tells the client at its first read)
        reader, writer = await asyncio.open_connection(*address, ssl=certs.client_context(), server_hostname=HOSTNAME)
        writer.write(b"anonymous")
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await reader.readexactly(9)
        writer.close()
        server.close()
        await server.wait_closed()

    run(aio_loop, main())
    reported(aio_loop, "Error on transport creation")


# -- start_tls -------------------------------------------------------------------------------------------


def test_start_tls_with_the_client_hello_already_waiting(aio_loop, certs: Certs) -> None:
    """STARTTLS: the server reads a plaintext line, then the client's ClientHello is in the kernel's
    buffer before the server calls start_tls; none of it may reach the plaintext protocol."""

    async def main():
        made: list[Peer] = []

        class Plain(Peer):
            def data_received(self, data: bytes) -> None:
                super().data_received(data)
                if self.data.endswith(b"STARTTLS\n"):
                    self.transport.pause_reading()
                    self.transport.write(b"GO\n")

        def factory():
            made.append(Plain())
            return made[-1]

        server = await aio_loop.create_server(factory, "127.0.0.1", 0)
        client_raw, client = await aio_loop.create_connection(Peer, *server.sockets[0].getsockname())
        client_raw.write(b"STARTTLS\n")
        await until(lambda: client.data == b"GO\n", "the server's GO")
        upgrading = asyncio.ensure_future(
            aio_loop.start_tls(client_raw, client, certs.client_context(), server_hostname=HOSTNAME)
        )
        server_raw = made[0].transport
        fd = server_raw.get_extra_info("socket").fileno()
        await until(lambda: select.select([fd], [], [], 0)[0], "the ClientHello in the server's socket")
        inner = Peer()
        server_tls = await aio_loop.start_tls(server_raw, inner, server_context(certs), server_side=True)
        client_tls = await upgrading
        assert made[0].data == b"STARTTLS\n"  # the plaintext protocol saw nothing of TLS
        client_tls.write(b"secret")
        await until(lambda: inner.data == b"secret", "the first bytes over TLS")
        server_tls.write(b"reply")
        await until(lambda: client.data == b"GO\nreply", "the reply over TLS")
        assert server_tls.get_extra_info("peername") == client_tls.get_extra_info("sockname")
        client_tls.close()
        await until(lambda: inner.lost.done(), "the server's connection_lost")
        server.close()
        await server.wait_closed()

    run(aio_loop, main())


def test_start_tls_refuses_what_is_not_a_context_or_a_stream_transport(aio_loop) -> None:
    async def main():
        with pytest.raises(TypeError):
            await aio_loop.start_tls(None, asyncio.Protocol(), object())
        with pytest.raises(TypeError):
            await aio_loop.start_tls(asyncio.Transport(), asyncio.Protocol(), ssl.create_default_context())

    run(aio_loop, main())


def test_pausing_the_socket_mid_handshake_holds_it_until_resumed(aio_loop, certs: Certs) -> None:
    async def main():
        with listener() as sock:
            connecting = asyncio.ensure_future(aio_loop.create_connection(Peer, *sock.getsockname()))
            conn, _ = await aio_loop.sock_accept(sock)
            with conn:
                raw, client = await connecting
                upgrading = asyncio.ensure_future(
                    aio_loop.start_tls(raw, client, certs.client_context(), server_hostname=HOSTNAME)
                )
                peer = BIOPeer(aio_loop, conn, server_context(certs), server_side=True)
                await peer.feed()  # the ClientHello
                assert not peer.step()
                await until(lambda: raw.is_reading(), "start_tls resuming the socket")
                raw.pause_reading()
                await peer.flush()  # the server's whole flight, which the client must not read yet
                await asyncio.sleep(0.1)
                assert not upgrading.done()
                raw.resume_reading()
                while not peer.step():  # the client's Finished
                    await peer.feed()
                transport = await upgrading
                peer.tls.write(b"after")
                await peer.flush()
                await until(lambda: client.data == b"after", "data after the handshake")
                transport.abort()

    run(aio_loop, main())


def test_pause_reading_after_the_handshake_holds_the_data(aio_loop, certs: Certs) -> None:
    async def main():
        made: list[Peer] = []
        server, address = await echo_server(aio_loop, certs, made)

        transport, client = await aio_loop.create_connection(
            Peer, *address, ssl=certs.client_context(), server_hostname=HOSTNAME
        )
        transport.write(b"ping")  # (a TLS 1.3 client paused in connection_made would hold its Finished)
        await until(lambda: client.data == b"ping", "the first echo")
        transport.pause_reading()
        assert not transport.is_reading()
        client.data.clear()
        made[0].transport.write(b"x" * 100_000)
        await until(lambda: made[0].transport.get_write_buffer_size() == 0, "the server's flush")
        await asyncio.sleep(0.05)
        assert client.data == b""
        transport.resume_reading()
        assert transport.is_reading()
        await until(lambda: len(client.data) == 100_000, "the held data")
        transport.close()
        server.close()
        await server.wait_closed()

    run(aio_loop, main())


# -- writing and closing ---------------------------------------------------------------------------------


def test_non_ascii_bytes_and_a_memoryview_of_ints_arrive_whole(aio_loop, certs: Certs) -> None:
    if sys.version_info < (3, 11) and not is_pollserve(aio_loop):
        pytest.skip("CPython 3.10's SSLProtocol spins forever on a memoryview of ints (pollserve's loop casts it)")

    async def main():
        server, address = await echo_server(aio_loop, certs)
        transport, client = await aio_loop.create_connection(
            Peer, *address, ssl=certs.client_context(), server_hostname=HOSTNAME
        )
        ints = array.array("i", range(-5000, 5000))
        text = "żółw 🐢 ✓ — ¿qué?".encode()
        pieces = [text, memoryview(ints), bytearray(b"\x00\xff" * 3000), memoryview(b"tail")[1:]]
        for piece in pieces:
            transport.write(piece)
        transport.writelines([text, memoryview(ints)])
        expected = text + ints.tobytes() + b"\x00\xff" * 3000 + b"ail" + text + ints.tobytes()
        await until(lambda: len(client.data) >= len(expected), "the echo")
        assert client.data == expected
        transport.close()
        server.close()
        await server.wait_closed()

    run(aio_loop, main())


def test_write_after_close_is_dropped_and_connection_lost_comes_once(aio_loop, certs: Certs) -> None:
    async def main():
        made: list[Peer] = []
        server, address = await echo_server(aio_loop, certs, made, echo=False)
        transport, client = await aio_loop.create_connection(
            Peer, *address, ssl=certs.client_context(), server_hostname=HOSTNAME
        )
        transport.write(b"before")
        transport.close()
        assert transport.is_closing()
        for _ in range(3):
            transport.write(b"after")
        assert await client.lost is None
        await until(lambda: made and made[0].lost.done(), "the server's connection_lost")
        assert made[0].data == b"before"
        await asyncio.sleep(0.02)
        assert client.lost_calls == 1 and made[0].lost_calls == 1
        server.close()
        await server.wait_closed()

    run(aio_loop, main())


@needs_shutdown_timeout
def test_shutdown_timeout_against_a_server_that_never_answers_close_notify(aio_loop, certs: Certs) -> None:
    async def main():
        with listener() as sock:
            connecting = asyncio.ensure_future(
                aio_loop.create_connection(
                    Peer,
                    *sock.getsockname(),
                    ssl=certs.client_context(),
                    server_hostname=HOSTNAME,
                    ssl_shutdown_timeout=QUICK,
                )
            )
            conn, _ = await aio_loop.sock_accept(sock)
            with conn:
                await BIOPeer(aio_loop, conn, server_context(certs), server_side=True).handshake()
                transport, client = await connecting
                transport.close()  # its close_notify goes unanswered: the timeout ends it
                assert isinstance(await client.lost, (TimeoutError, asyncio.TimeoutError))
                assert await recv_until_closed(aio_loop, conn)  # the close_notify, then the close

    run(aio_loop, main())


@needs_shutdown_timeout
def test_shutdown_timeout_against_a_client_that_never_answers_close_notify(aio_loop, certs: Certs) -> None:
    async def main():
        made: list[Peer] = []
        server, address = await echo_server(aio_loop, certs, made, ssl_shutdown_timeout=QUICK)
        with await raw_client(aio_loop, address) as sock:
            context = certs.client_context()
            await BIOPeer(aio_loop, sock, context, server_side=False).handshake()
            await until(lambda: made and made[0].made.done(), "the server's connection_made")
            made[0].transport.close()
            assert await recv_until_closed(aio_loop, sock)  # close_notify, then the close at the timeout
            assert isinstance(await made[0].lost, (TimeoutError, asyncio.TimeoutError))
        server.close()
        await server.wait_closed()

    run(aio_loop, main())


def test_many_concurrent_clients_each_get_their_own_bytes_back(aio_loop, certs: Certs) -> None:
    clients, size = 24, 48 * 1024

    async def one(address, index: int) -> None:
        reader, writer = await asyncio.open_connection(*address, ssl=certs.client_context(), server_hostname=HOSTNAME)
        payload = bytes((index + position) % 251 for position in range(size))
        for start in range(0, size, 7000):
            writer.write(payload[start : start + 7000])
            await writer.drain()
        assert await reader.readexactly(size) == payload
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()

    async def main():
        server, address = await echo_server(aio_loop, certs)
        await asyncio.gather(*(one(address, index) for index in range(clients)))
        server.close()
        await server.wait_closed()

    run(aio_loop, main())


def test_a_slow_protocol_under_tls_is_named_by_its_own_class(certs: Certs) -> None:
    """The slowest callback of loop.stats() names the user's protocol, not asyncio's SSLProtocol."""
    from pollserve.aio import AsyncioLoop

    class Slow(Peer):
        def __init__(self) -> None:
            super().__init__(echo=True)

        def data_received(self, data: bytes) -> None:
            time.sleep(0.15)
            super().data_received(data)

    loop = AsyncioLoop(REQUESTED or "epoll")

    async def main():
        server = await loop.create_server(Slow, "127.0.0.1", 0, ssl=server_context(certs))
        reader, writer = await asyncio.open_connection(
            *server.sockets[0].getsockname(), ssl=certs.client_context(), server_hostname=HOSTNAME
        )
        writer.write(b"slow")
        assert await reader.readexactly(4) == b"slow"
        peer = writer.get_extra_info("sockname")
        writer.close()
        server.close()
        await server.wait_closed()
        return peer

    try:
        peer = run(loop, main())
        name = loop.stats()["slowest_callback"]
    finally:
        loop.close()
    assert name == f"{__name__}:{Slow.__qualname__}.data_received on {peer}"


# -- a TLS session in random orders ------------------------------------------------------------------------


class Side(Peer):
    """One end of the session: what it was sent and what it got, and whether it paused."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = bytearray()
        self.paused = False


MACHINE_LIMIT = 4.0

#: the sizes of the session's writes: a few bytes, a record or two, and more than a socket buffer takes at once
SIZES = st.integers(1, 100) | st.integers(100, 40_000) | st.integers(40_000, 400_000)


class TLSSession(RuleBasedStateMachine):
    """Writes from both sides, pause/resume, write_eof, close and abort from either side, in any
    order: each side gets the other's bytes in order and whole (a prefix of them once a side has
    aborted), a close delivers what was written before it, connection_lost comes exactly once on
    each side, and the loop keeps running."""

    make_loop: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.loop = self.make_loop()
        self.handler = RecordingHandler()
        self.loop.set_exception_handler(self.handler)
        self.accepted: list[Side] = []
        self.server = self.step(
            self.loop.create_server(lambda: self.accepted.append(Side()) or self.accepted[-1], "127.0.0.1", 0,
                                    ssl=server_context(self.certs))
        )  # fmt: skip
        self.open_session()

    certs: Certs

    def step(self, coro):
        """One bounded step; shorter than the other tests' bound, so that shrinking a failure is quick."""
        return self.loop.run_until_complete(asyncio.wait_for(coro, MACHINE_LIMIT))

    def open_session(self) -> None:
        address = self.server.sockets[0].getsockname()
        _, self.client = self.step(
            self.loop.create_connection(Side, *address, ssl=self.certs.client_context(), server_hostname=HOSTNAME)
        )
        self.step(until(lambda: self.accepted and self.accepted[-1].made.done(), "the server's connection_made"))
        self.server_side = self.accepted[-1]
        self.ended = False

    def side(self, server: bool) -> Side:
        return self.server_side if server else self.client

    def other(self, server: bool) -> Side:
        return self.client if server else self.server_side

    def settle(self) -> None:
        """Resume both sides and wait until each has all the other sent."""
        for side in (self.client, self.server_side):
            side.paused = False
            side.transport.resume_reading()
        self.step(until(lambda: self.client.data == self.server_side.sent and self.server_side.data == self.client.sent,
                        "every byte delivered"))  # fmt: skip

    @precondition(lambda self: not self.ended)
    @rule(server=st.booleans(), size=SIZES, seed=st.integers(0, 2**16))
    def write(self, server: bool, size: int, seed: int) -> None:
        data = random.Random(seed).randbytes(size)
        side = self.side(server)
        side.transport.write(data)
        side.sent += data

    @precondition(lambda self: not self.ended)
    @rule(server=st.booleans())
    def pause(self, server: bool) -> None:
        side = self.side(server)
        side.transport.pause_reading()
        side.paused = True
        assert not side.transport.is_reading()

    @precondition(lambda self: not self.ended)
    @rule(server=st.booleans())
    def resume(self, server: bool) -> None:
        side = self.side(server)
        side.transport.resume_reading()
        side.paused = False
        assert side.transport.is_reading()

    @precondition(lambda self: not self.ended)
    @rule()
    def deliver(self) -> None:
        self.settle()

    @precondition(lambda self: not self.ended)
    @rule(server=st.booleans())
    def write_eof(self, server: bool) -> None:
        transport = self.side(server).transport
        assert not transport.can_write_eof()  # TLS has no half-close
        with pytest.raises(NotImplementedError):
            transport.write_eof()

    @precondition(lambda self: not self.ended)
    @rule(server=st.booleans(), size=st.just(0) | SIZES, seed=st.integers(0, 2**16))
    def close(self, server: bool, size: int, seed: int) -> None:
        last = random.Random(seed).randbytes(size)
        self.settle()
        closer, peer = self.side(server), self.other(server)
        if last:
            closer.transport.write(last)
            closer.sent += last
        closer.transport.close()
        closer.transport.write(b"dropped")  # after close: not sent
        self.step(until(lambda: closer.lost.done() and peer.lost.done(), "connection_lost on both sides"))
        assert peer.data == closer.sent  # what was written before the close arrived, and nothing after
        self.ended = True

    @precondition(lambda self: not self.ended)
    @rule(server=st.booleans())
    def abort(self, server: bool) -> None:
        self.side(server).transport.abort()
        other = self.other(server)
        other.transport.resume_reading()  # a paused side learns of the close when it reads again
        self.step(until(lambda: self.client.lost.done() and self.server_side.lost.done(), "connection_lost"))
        self.ended = True

    @precondition(lambda self: self.ended)
    @rule()
    def next_session(self) -> None:
        self.open_session()

    @invariant()
    def in_order_and_whole(self) -> None:
        for side in (self.client, self.server_side):
            assert side.data == self.other(side is self.server_side).sent[: len(side.data)]
            assert side.lost_calls <= 1
            if self.ended:
                assert side.lost_calls == 1
        assert not self.loop.is_closed()
        assert self.step(asyncio.sleep(0, "alive")) == "alive"
        calls, self.handler.calls = self.handler.calls, []
        for call in calls:  # an abort mid-record can make the peer's TLS fail: told as the standard loop tells it
            assert isinstance(call.get("exception"), (OSError, ssl.SSLError)), call

    def teardown(self) -> None:
        try:
            for side in (self.client, self.server_side):
                side.transport.abort()
            self.server.close()
            self.step(self.server.wait_closed())
        finally:
            self.loop.close()


@pytest.mark.parametrize("kind", ["asyncio", "pollserve"])
def test_tls_sessions_in_random_orders(kind: str, certs: Certs) -> None:
    from pollserve.aio import AsyncioLoop

    backend = REQUESTED or "epoll"
    factory = asyncio.new_event_loop if kind == "asyncio" else (lambda: AsyncioLoop(backend))
    machine = type(f"TLSSession_{kind}", (TLSSession,), {"make_loop": staticmethod(factory), "certs": certs})
    machine.TestCase.settings = settings(
        max_examples=20, stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)
    )
    machine.TestCase().runTest()
