"""The asyncio face's pipe transports: connect_read_pipe and connect_write_pipe.

Each test runs on asyncio's own loop (the reference) and on pollserve's on every backend, in debug
mode and not (the ``aio_loop`` fixture); an exception-handler call the test did not expect fails it.
Every wait is bounded (``run``), so a hang fails the test instead of holding the suite."""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import gc
import os
import socket
import tempfile
import warnings

import pytest

from tests.test_aio_streams import LIMIT, is_pollserve, run
from tests.test_aio_subprocess import ASYNCIO_MEMORYVIEW_BUG, open_fds, reading

pytestmark = pytest.mark.skipif(os.name != "posix", reason="pipes need POSIX")


class PipeReader(asyncio.Protocol):
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.data = bytearray()
        self.events: list[str] = []
        self.lost = loop.create_future()
        self.more = asyncio.Event()
        self.fail_on: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.events.append("data")
        self.data += data
        self.more.set()
        if self.fail_on is not None and self.fail_on in data:
            raise RuntimeError("the protocol fails")

    def eof_received(self) -> None:
        self.events.append("eof")

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)

    async def read_until(self, size: int) -> None:
        while len(self.data) < size:
            self.more.clear()
            await self.more.wait()


class PipeWriter(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost = asyncio.get_running_loop().create_future()
        self.flow: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def pause_writing(self) -> None:
        self.flow.append("pause")

    def resume_writing(self) -> None:
        self.flow.append("resume")

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)


def drain(fd: int) -> bytes:
    """What a non-blocking fd holds now."""
    got = bytearray()
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return bytes(got)
        if not chunk:
            return bytes(got)
        got += chunk


@pytest.fixture
def pipe():
    """(read end, write end) as file objects; closed after the test whatever happened."""
    r, w = os.pipe()
    reader, writer = os.fdopen(r, "rb", 0), os.fdopen(w, "wb", 0)
    yield reader, writer
    reader.close()
    writer.close()


def test_a_read_pipe_gets_data_then_eof_then_connection_lost(aio_loop, pipe) -> None:
    reader, writer = pipe

    async def main() -> None:
        transport, protocol = await aio_loop.connect_read_pipe(PipeReader, reader)
        assert transport.get_extra_info("pipe") is reader
        assert reading(aio_loop, transport) in (True, None)
        if is_pollserve(aio_loop):
            assert aio_loop._transports[reader.fileno()] is transport
            with pytest.raises(RuntimeError, match="is used by transport"):
                aio_loop.add_reader(reader.fileno(), lambda: None)
        writer.write("héllo wörld ✓".encode())
        await protocol.read_until(len("héllo wörld ✓".encode()))
        writer.close()
        assert await protocol.lost is None
        assert protocol.events[0] == "made" and protocol.events[-2:] == ["eof", "lost"]
        assert bytes(protocol.data) == "héllo wörld ✓".encode()
        assert reader.closed  # the transport closed the pipe it was given

    run(aio_loop, main())


def test_a_regular_file_is_refused_as_asyncio_refuses_it(aio_loop) -> None:
    async def main() -> None:
        with tempfile.TemporaryFile() as file:
            with pytest.raises(ValueError, match="Pipe transport is for pipes/sockets only"):
                await aio_loop.connect_read_pipe(PipeReader, file)
            with pytest.raises(ValueError, match="only for pipes, sockets and character devices"):
                await aio_loop.connect_write_pipe(PipeWriter, file)

    run(aio_loop, main())


def test_paused_reading_reads_nothing_until_resumed(aio_loop, pipe) -> None:
    reader, writer = pipe

    async def main() -> None:
        transport, protocol = await aio_loop.connect_read_pipe(PipeReader, reader)
        writer.write(b"first")
        await protocol.read_until(5)
        transport.pause_reading()
        transport.pause_reading()  # twice is once
        assert reading(aio_loop, transport) in (False, None)
        writer.write(b"second")
        for _ in range(20):
            await asyncio.sleep(0)
        assert bytes(protocol.data) == b"first"
        transport.resume_reading()
        await protocol.read_until(11)
        assert bytes(protocol.data) == b"firstsecond"
        transport.close()
        assert await protocol.lost is None
        assert "eof" not in protocol.events

    run(aio_loop, main())


def test_a_protocol_error_goes_to_the_handler_and_reading_goes_on(aio_loop, pipe) -> None:
    reader, writer = pipe

    async def main() -> None:
        transport, protocol = await aio_loop.connect_read_pipe(PipeReader, reader)
        protocol.fail_on = b"boom"
        writer.write(b"boom")
        await protocol.read_until(4)
        await asyncio.sleep(0)
        (context,) = aio_loop.handler.expect()
        assert isinstance(context["exception"], RuntimeError)
        writer.write(b"after")
        await protocol.read_until(9)
        transport.close()
        await protocol.lost

    run(aio_loop, main())


def test_write_buffering_pauses_and_resumes_the_writer_and_keeps_the_order(aio_loop, pipe) -> None:
    reader, writer = pipe
    os.set_blocking(reader.fileno(), False)
    chunks = [bytes([65 + i % 26]) * 50_000 for i in range(12)]  # more than a pipe holds

    async def main() -> None:
        transport, protocol = await aio_loop.connect_write_pipe(PipeWriter, writer)
        assert transport.get_extra_info("pipe") is writer
        transport.set_write_buffer_limits(high=100_000)
        assert transport.get_write_buffer_limits() == (25_000, 100_000)
        for chunk in chunks:
            transport.write(chunk)
        assert transport.get_write_buffer_size() > 100_000
        assert protocol.flow == ["pause"]
        got = bytearray()
        for _ in range(int(LIMIT * 100)):
            got += drain(reader.fileno())
            if len(got) == sum(map(len, chunks)):
                break
            await asyncio.sleep(0.01)
        assert bytes(got) == b"".join(chunks)
        assert protocol.flow == ["pause", "resume"]
        assert transport.get_write_buffer_size() == 0
        transport.close()
        assert await protocol.lost is None
        assert writer.closed

    run(aio_loop, main())


def test_non_ascii_bytes_and_a_memoryview_of_ints_arrive_as_bytes(aio_loop, pipe) -> None:
    reader, writer = pipe
    ints = array.array("i", range(-500, 500))
    text = "naïve café — 日本語 ✓".encode()
    if not is_pollserve(aio_loop):
        pytest.skip(ASYNCIO_MEMORYVIEW_BUG)

    async def main() -> None:
        _read_transport, read_protocol = await aio_loop.connect_read_pipe(PipeReader, reader)
        transport, protocol = await aio_loop.connect_write_pipe(PipeWriter, writer)
        transport.write(text)
        transport.write(memoryview(ints))
        transport.write(bytearray(bytes(range(256))))
        expected = text + ints.tobytes() + bytes(range(256))
        await read_protocol.read_until(len(expected))
        assert bytes(read_protocol.data) == expected
        transport.write_eof()
        assert await protocol.lost is None
        assert await read_protocol.lost is None

    run(aio_loop, main())


def test_write_eof_flushes_the_buffer_first(aio_loop, pipe) -> None:
    reader, writer = pipe

    async def main() -> None:
        _read_transport, read_protocol = await aio_loop.connect_read_pipe(PipeReader, reader)
        transport, protocol = await aio_loop.connect_write_pipe(PipeWriter, writer)
        assert transport.can_write_eof()
        data = os.urandom(300_000)
        transport.write(data)
        transport.write_eof()
        assert transport.is_closing()
        transport.write(b"dropped")  # after write_eof: dropped, as asyncio drops it
        assert await protocol.lost is None
        assert await read_protocol.lost is None
        assert bytes(read_protocol.data) == data

    run(aio_loop, main())


def test_the_reader_going_away_with_bytes_buffered_is_a_broken_pipe(aio_loop, pipe) -> None:
    reader, writer = pipe

    async def main() -> None:
        transport, protocol = await aio_loop.connect_write_pipe(PipeWriter, writer)
        transport.write(b"x" * 500_000)  # more than the pipe holds: some stays buffered
        assert transport.get_write_buffer_size() > 0
        reader.close()
        exc = await protocol.lost
        assert isinstance(exc, BrokenPipeError)
        transport.write(b"more")  # after the loss: dropped, no error

    run(aio_loop, main())


def test_writing_to_a_pipe_whose_reader_is_gone_ends_in_connection_lost(aio_loop, pipe) -> None:
    reader, writer = pipe

    async def main() -> None:
        transport, protocol = await aio_loop.connect_write_pipe(PipeWriter, writer)
        reader.close()
        transport.write(b"to no one")  # before the loop saw the close: EPIPE
        exc = await protocol.lost
        assert isinstance(exc, BrokenPipeError)

    run(aio_loop, main())


def test_a_pty_both_ways_and_its_end(aio_loop) -> None:
    master, slave = os.openpty()
    master_in = os.fdopen(master, "rb", 0)
    master_out = os.fdopen(os.dup(master), "wb", 0)
    slave_file = os.fdopen(slave, "r+b", 0)
    try:

        async def main() -> None:
            _transport, protocol = await aio_loop.connect_read_pipe(PipeReader, master_in)
            write_transport, write_protocol = await aio_loop.connect_write_pipe(PipeWriter, master_out)
            slave_file.write(b"from the slave\n")
            await protocol.read_until(len(b"from the slave\r\n"))
            write_transport.write(b"to the slave\n")
            got = b""
            for _ in range(int(LIMIT * 100)):
                with contextlib.suppress(BlockingIOError):
                    got += os.read(slave, 1024)
                if b"to the slave" in got:
                    break
                await asyncio.sleep(0.01)
            assert b"to the slave" in got
            slave_file.close()  # the master's read meets EIO: the end, quietly
            exc = await protocol.lost
            assert exc is None or (isinstance(exc, OSError) and exc.errno == errno.EIO)
            write_transport.close()
            await write_protocol.lost

        os.set_blocking(slave, False)
        run(aio_loop, main())
    finally:
        for file in (master_in, master_out, slave_file):
            file.close()


def test_a_socket_is_a_pipe_too(aio_loop) -> None:
    left, right = socket.socketpair()
    try:

        async def main() -> None:
            _transport, protocol = await aio_loop.connect_read_pipe(PipeReader, left)
            right.sendall(b"over a socket")
            await protocol.read_until(13)
            right.close()
            assert await protocol.lost is None
            assert bytes(protocol.data) == b"over a socket"

        run(aio_loop, main())
    finally:
        left.close()
        right.close()


def test_an_unclosed_pipe_transport_warns_and_closes_its_pipe(aio_loop) -> None:
    # The write end stays open: an EOF already waiting is read at the first poll after the reader is
    # added, which on pollserve's loop (as on uvloop) comes before the task resumes to pause it.
    r, w = os.pipe()
    reader = os.fdopen(r, "rb", 0)

    async def main() -> None:
        transport, _protocol = await aio_loop.connect_read_pipe(PipeReader, reader)
        transport.pause_reading()
        return transport

    transport = run(aio_loop, main())
    aio_loop.close()
    assert "open" in repr(transport)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del transport
        gc.collect()
    os.close(w)
    assert any(issubclass(w.category, ResourceWarning) and "unclosed transport" in str(w.message) for w in caught)
    assert reader.closed


def test_pipes_leak_no_fd(aio_loop) -> None:
    before = open_fds()

    async def main() -> None:
        for _ in range(20):
            r, w = os.pipe()
            reader, writer = os.fdopen(r, "rb", 0), os.fdopen(w, "wb", 0)
            _read_transport, read_protocol = await aio_loop.connect_read_pipe(PipeReader, reader)
            transport, protocol = await aio_loop.connect_write_pipe(PipeWriter, writer)
            transport.write(b"ping")
            await read_protocol.read_until(4)
            transport.close()
            await protocol.lost
            await read_protocol.lost

    run(aio_loop, main())
    assert open_fds() == before
