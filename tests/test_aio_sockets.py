"""The asyncio loop's sock_* calls over real loopback sockets: each test on asyncio's own loop (the
reference) and on pollserve's on every backend, debug mode and not (the ``aio_loop`` fixture).

The hostile cases: cancellation at every await of every call (the socket still works after, and
nothing is left watching its fd), a peer that resets during sock_sendall, buffers that are not
bytes, bytes that are not ASCII, and megabytes to a slow reader."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import socket
import ssl
import struct
import sys
from array import array

import pytest

from pollserve.aio import AsyncioLoop

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

#: a bound on every wait: a hang fails the test instead of holding the run
HANG = 10
needs_311 = pytest.mark.skipif(sys.version_info < (3, 11), reason="the datagram sock_* calls are 3.11+")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected, non-blocking TCP pair on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        sock.setblocking(False)
    return client, server


@pytest.fixture
def tcp():
    client, server = tcp_pair()
    yield client, server
    client.close()
    server.close()


@pytest.fixture
def udp():
    """Two non-blocking UDP sockets on 127.0.0.1, each bound."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
    yield socks
    for sock in socks:
        sock.close()


def watched(loop, fd: int) -> bool:
    """Is the loop watching fd: pollserve's tables, or the standard loop's selector."""
    if isinstance(loop, AsyncioLoop):
        return fd in loop._readers or fd in loop._writers
    try:
        loop._selector.get_key(fd)
    except KeyError:
        return False
    return True


def fill(sock: socket.socket) -> int:
    """Send until the kernel takes no more: the next send from sock would block."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    total = 0
    for _ in range(100_000):
        try:
            total += sock.send(b"\0" * 65536)
        except BlockingIOError:
            return total
    raise AssertionError("the socket never filled")


def run(loop, coro):
    return loop.run_until_complete(asyncio.wait_for(coro, HANG))


def test_sock_recv_waits_for_data_and_sock_sendall_sends_it(aio_loop, tcp) -> None:
    client, server = tcp

    async def main() -> bytes:
        aio_loop.call_later(0.01, client.send, b"later")
        first = await aio_loop.sock_recv(server, 100)
        await aio_loop.sock_sendall(server, b"reply")
        return first + await aio_loop.sock_recv(client, 100)

    assert run(aio_loop, main()) == b"laterreply"
    assert not watched(aio_loop, server.fileno()) and not watched(aio_loop, client.fileno())


def test_sock_recv_into_fills_a_memoryview_slice(aio_loop, tcp) -> None:
    client, server = tcp
    data = bytearray(16)

    async def main() -> int:
        aio_loop.call_later(0.01, client.send, b"abc")
        with memoryview(data) as view:
            return await aio_loop.sock_recv_into(server, view[4:])

    assert run(aio_loop, main()) == 3
    assert data[:8] == b"\0\0\0\0abc\0"


def test_bytes_that_are_not_ascii_arrive_as_sent(aio_loop, tcp) -> None:
    client, server = tcp
    payload = "héllo ✓ \x00\xff".encode() + bytes(range(256))

    async def main() -> bytes:
        await aio_loop.sock_sendall(client, payload)
        got = b""
        while len(got) < len(payload):
            got += await aio_loop.sock_recv(server, 4096)
        return got

    assert run(aio_loop, main()) == payload


@pytest.mark.parametrize(
    "make",
    [lambda: array("i", range(1000)), lambda: memoryview(bytes(range(240))).cast("B", (12, 20))],
    ids=["array-i", "2-D"],
)
def test_sock_sendall_of_a_buffer_that_is_not_bytes_sends_every_byte(aio_loop, tcp, make) -> None:
    if not isinstance(aio_loop, AsyncioLoop):
        pytest.skip("the standard loop compares bytes sent with len() in items, and its sock_sendall never returns")
    client, server = tcp
    data = make()
    expected = memoryview(data).tobytes()

    async def main() -> bytes:
        await aio_loop.sock_sendall(client, data)
        got = b""
        while len(got) < len(expected):
            got += await aio_loop.sock_recv(server, 65536)
        return got

    assert run(aio_loop, main()) == expected
    assert not watched(aio_loop, client.fileno())


def test_several_mebibytes_to_a_slow_reader(aio_loop, tcp) -> None:
    client, server = tcp
    payload = os.urandom(4 << 20)

    async def slow_reader() -> bytes:
        digest, got = hashlib.sha256(), 0
        while got < len(payload):
            chunk = await aio_loop.sock_recv(server, 256 * 1024)
            assert chunk, "EOF before the end"
            digest.update(chunk)
            got += len(chunk)
            await asyncio.sleep(0.001)
        return digest.digest()

    async def main() -> bytes:
        reader = asyncio.ensure_future(slow_reader())
        await aio_loop.sock_sendall(client, payload)
        return await reader

    assert run(aio_loop, main()) == hashlib.sha256(payload).digest()
    assert not watched(aio_loop, client.fileno()) and not watched(aio_loop, server.fileno())


def test_a_peer_that_resets_during_sock_sendall(aio_loop, tcp) -> None:
    client, server = tcp

    async def reset_after_some() -> None:
        await aio_loop.sock_recv(server, 65536)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.close()  # unread data and linger 0: an RST

    async def main() -> None:
        resetter = asyncio.ensure_future(reset_after_some())
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            await aio_loop.sock_sendall(client, b"x" * (64 << 20))
        await resetter

    run(aio_loop, main())
    assert not watched(aio_loop, client.fileno())


def test_a_blocking_socket_is_refused_in_debug_mode(aio_loop, tcp) -> None:
    client, _ = tcp
    client.setblocking(True)
    calls = [
        aio_loop.sock_recv(client, 1),
        aio_loop.sock_recv_into(client, bytearray(1)),
        aio_loop.sock_sendall(client, b"x"),
    ]
    if sys.version_info >= (3, 11):
        calls.append(aio_loop.sock_sendto(client, b"x", ("127.0.0.1", 9)))
    calls.append(aio_loop.sock_sendfile(client, io.BytesIO(b"x")))
    for call in calls:
        if aio_loop.get_debug():
            with pytest.raises(ValueError, match="the socket must be non-blocking"):
                run(aio_loop, call)
        else:
            call.close()  # not checked outside debug mode, as on the standard loop


def test_an_ssl_socket_is_refused(aio_loop) -> None:
    context = ssl.create_default_context()
    with context.wrap_socket(socket.socket(), server_hostname="localhost", do_handshake_on_connect=False) as sock:
        sock.setblocking(False)
        calls = [
            aio_loop.sock_recv(sock, 1),
            aio_loop.sock_recv_into(sock, bytearray(1)),
            aio_loop.sock_sendall(sock, b"x"),
        ]
        calls.append(aio_loop.sock_sendfile(sock, io.BytesIO(b"x")))
        for call in calls:
            with pytest.raises(TypeError, match="SSLSocket"):
                run(aio_loop, call)


def test_an_fd_owned_by_a_transport_is_refused(aio_loop) -> None:
    async def main() -> None:
        transport, _ = await aio_loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
        alias = socket.socket(fileno=transport.get_extra_info("socket").fileno())
        alias.setblocking(False)
        try:
            with pytest.raises(RuntimeError, match="is used by transport"):
                await aio_loop.sock_recv(alias, 10)
        finally:
            alias.detach()
            transport.close()
        await asyncio.sleep(0)

    run(aio_loop, main())


@needs_311
def test_sock_sendto_sock_recvfrom_and_sock_recvfrom_into(aio_loop, udp) -> None:
    a, b = udp

    async def main() -> None:
        aio_loop.call_later(0.01, a.sendto, b"one", b.getsockname())
        assert await aio_loop.sock_recvfrom(b, 100) == (b"one", a.getsockname())
        assert await aio_loop.sock_sendto(b, "ü".encode(), a.getsockname()) == 2
        buf = array("i", [0, 0])  # nbytes 0 is the whole buffer, in bytes
        assert await aio_loop.sock_recvfrom_into(a, buf) == (2, b.getsockname())
        assert buf.tobytes()[:2] == "ü".encode()
        await aio_loop.sock_sendto(a, memoryview(array("i", [7, 8])), b.getsockname())
        got = bytearray(16)
        assert await aio_loop.sock_recvfrom_into(b, got, 4) == (4, a.getsockname())
        assert bytes(got[:4]) == array("i", [7]).tobytes()

    run(aio_loop, main())


def test_sock_sendfile_sends_a_file_and_leaves_its_position_after_it(aio_loop, tcp, tmp_path) -> None:
    client, server = tcp
    path = tmp_path / "data"
    content = os.urandom(300_000)
    path.write_bytes(content)

    async def main() -> tuple[int, bytes]:
        with open(path, "rb") as file:
            sent = await aio_loop.sock_sendfile(client, file, 1000, 200_000)
            assert file.tell() == 201_000
        got = b""
        while len(got) < sent:
            got += await aio_loop.sock_recv(server, 1 << 20)
        return sent, got

    assert run(aio_loop, main()) == (200_000, content[1000:201_000])


def test_sock_sendfile_falls_back_to_sends_for_a_file_that_is_not_regular(aio_loop, tcp) -> None:
    client, server = tcp
    content = "ünïcode".encode() * 1000

    async def main() -> bytes:
        with pytest.raises(asyncio.SendfileNotAvailableError):
            await aio_loop.sock_sendfile(client, io.BytesIO(content), fallback=False)
        file = io.BytesIO(content)
        assert await aio_loop.sock_sendfile(client, file, 7) == len(content) - 7
        assert file.tell() == len(content)
        got = b""
        while len(got) < len(content) - 7:
            got += await aio_loop.sock_recv(server, 65536)
        return got

    assert run(aio_loop, main()) == content[7:]


def test_sock_sendfile_refuses_what_the_standard_loop_refuses(aio_loop, tcp, udp, tmp_path) -> None:
    client, _ = tcp
    (tmp_path / "f").write_bytes(b"x")
    with open(tmp_path / "f", "rb") as binary, open(tmp_path / "f") as text:
        cases = [
            (ValueError, aio_loop.sock_sendfile(client, text)),
            (ValueError, aio_loop.sock_sendfile(udp[0], binary)),
            (ValueError, aio_loop.sock_sendfile(client, binary, count=0)),
            (TypeError, aio_loop.sock_sendfile(client, binary, count=1.5)),
            (ValueError, aio_loop.sock_sendfile(client, binary, offset=-1)),
            (TypeError, aio_loop.sock_sendfile(client, binary, offset="0")),
        ]
        for error, call in cases:
            with pytest.raises(error):
                run(aio_loop, call)


# -- cancellation at every await --------------------------------------------------------------------------


async def _blocked_recv(loop, tcp, udp):
    return tcp[1], loop.sock_recv(tcp[1], 10)


async def _blocked_recv_into(loop, tcp, udp):
    return tcp[1], loop.sock_recv_into(tcp[1], bytearray(10))


async def _blocked_sendall(loop, tcp, udp):
    fill(tcp[0])
    return tcp[0], loop.sock_sendall(tcp[0], b"x" * 100_000)


async def _blocked_recvfrom(loop, tcp, udp):
    return udp[1], loop.sock_recvfrom(udp[1], 10)


async def _blocked_recvfrom_into(loop, tcp, udp):
    return udp[1], loop.sock_recvfrom_into(udp[1], bytearray(10))


async def _blocked_sendfile_native(loop, tcp, udp):
    fill(tcp[0])
    return tcp[0], loop.sock_sendfile(tcp[0], tcp[2], fallback=False)


async def _blocked_sendfile_fallback(loop, tcp, udp):
    fill(tcp[0])
    return tcp[0], loop.sock_sendfile(tcp[0], io.BytesIO(b"x" * 100_000))


BLOCKED = {
    "sock_recv": _blocked_recv,
    "sock_recv_into": _blocked_recv_into,
    "sock_sendall": _blocked_sendall,
    "sock_sendfile": _blocked_sendfile_native,
    "sock_sendfile-fallback": _blocked_sendfile_fallback,
}
if sys.version_info >= (3, 11):
    BLOCKED.update({"sock_recvfrom": _blocked_recvfrom, "sock_recvfrom_into": _blocked_recvfrom_into})


@pytest.mark.parametrize("call", sorted(BLOCKED))
def test_cancelled_while_waiting_leaves_the_socket_usable_and_unwatched(aio_loop, tcp, udp, call, tmp_path) -> None:
    """Each call cancelled at its wait; then the socket sends or receives as if nothing happened."""
    path = tmp_path / "f"
    path.write_bytes(b"y" * 100_000)

    async def main() -> None:
        with open(path, "rb") as file:
            sock, coro = await BLOCKED[call](aio_loop, (*tcp, file), udp)
            task = asyncio.ensure_future(coro)
            for _ in range(5):  # past the first try and into the wait (the fallback reads in a thread first)
                await asyncio.sleep(0.01)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert not watched(aio_loop, sock.fileno())
        if sock.type == socket.SOCK_DGRAM:
            udp[0].sendto(b"after", sock.getsockname())
            assert await aio_loop.sock_recv(sock, 10) == b"after"
        elif sock is tcp[1]:
            tcp[0].send(b"after")
            assert await aio_loop.sock_recv(sock, 10) == b"after"
        else:  # a sender: the peer drains what was queued, and a send goes through
            await aio_loop.run_in_executor(None, drain_all, tcp[1])
            await aio_loop.sock_sendall(sock, b"after")
            assert await aio_loop.sock_recv(tcp[1], 10) == b"after"
        assert not watched(aio_loop, sock.fileno())

    run(aio_loop, main())


def drain_all(sock: socket.socket) -> None:
    """Read until nothing comes for a moment (a blocking read with a short timeout, bounded)."""
    sock.settimeout(0.2)
    try:
        for _ in range(100_000):
            try:
                if not sock.recv(1 << 20):
                    return
            except TimeoutError:
                return
    finally:
        sock.setblocking(False)
