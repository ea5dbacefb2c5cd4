"""TLS (pollserve.tls): the layer in-process over real loopback sockets on every available backend,
its plaintext accounting without sockets, and the real ``pollserve --tls-*`` command end to end.

Certificates are made on the fly by trustme; the clients are Python's ssl module (SSLSocket, and
SSLObject on MemoryBIOs where a test must choose what goes out in one segment) and, where it is on
PATH, ``openssl s_client``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from clients import connect, recv_until_eof, reset
from inprocess import in_loop, serving, wait_until
from serverproc import run_pollserve
from statsclient import get_stats, http_get, stats_address, wait_for
from tlshelpers import (
    HOSTNAME,
    OPENSSL,
    BIOClient,
    Certs,
    make_certs,
    needs_openssl,
    recv_plain,
    s_client,
    small_buffer_client,
    small_send_buffers,
    tls_connect,
    tls_serving,
    uses_openssl,
)

from pollserve.apps import Echo, Protocol
from pollserve.loop import EventLoop
from pollserve.proxy import ProxyLayerFactory
from pollserve.tls import ServerTLS, TLSLayerFactory, TLSOptions, reload_certificates, server_context

POSIX = sys.platform != "win32"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


class Recorder(Echo):
    """Echoes, and records what the server told it and what the transport says."""

    def __init__(self, made: list[Recorder] | None = None) -> None:
        self.calls: list[str] = []
        self.lost: list[Exception | None] = []
        self.received = bytearray()
        self.info: dict[str, object] = {}
        if made is not None:
            made.append(self)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.calls.append("made")
        for name in ("ssl_object", "peercert", "cipher", "sslcontext", "peername", "socket", "alpn_offered"):
            self.info[name] = transport.get_extra_info(name)

    def data_received(self, data: bytes) -> None:
        self.calls.append("data")
        self.received += data
        super().data_received(data)

    def eof_received(self):
        self.calls.append("eof")
        return None

    def connection_lost(self, exc) -> None:
        self.calls.append("lost")
        self.lost.append(exc)


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r.getMessage() for r in caplog.records if r.exc_info], "a traceback was logged"


# -- serving, and what the app is told ---------------------------------------------------------------------------------


def test_echo_of_1_mib_and_the_transport_info(backend_name: str, certs: Certs) -> None:
    made: list[Recorder] = []
    payload = os.urandom(1 << 20)
    with tls_serving(backend_name, lambda: Recorder(made), certs.options()) as (server, layers):
        with BIOClient(server.address, certs.client_context()) as client:
            client.handshake()
            assert client.exchange(payload, len(payload)) == payload
        wait_until(lambda: not server.connections)
        app = made[0]
        assert isinstance(app.info["ssl_object"], ssl.SSLObject)
        assert app.info["cipher"][1] == "TLSv1.3"
        assert app.info["peercert"] is None  # no client certificate was asked for
        assert app.info["sslcontext"] is layers.tls.context
        assert app.info["peername"][0] == "127.0.0.1"  # the connection's, through the layer
        assert app.info["socket"] is not None
        assert layers.handshakes == 1 and layers.handshake_failures == 0
        # What crossed the socket was ciphertext: the plaintext, the records' overhead and the handshake.
        assert server.bytes_in > len(payload) + 300 and server.bytes_out > len(payload) + 300
        assert server.write_buffer_bytes == 0
        assert app.calls[0] == "made" and app.calls[-2:] == ["eof", "lost"]


def test_app_writing_in_connection_made_is_not_stuck_behind_the_handshake(backend_name: str, certs: Certs) -> None:
    """The app is made once the handshake is complete, so its first write never waits on a read."""

    class Banner(Protocol):
        def connection_made(self, transport) -> None:
            transport.write(b"220 welcome\r\n")

    with (
        tls_serving(backend_name, Banner, certs.options()) as (server, _),
        tls_connect(server.address, certs.client_context()) as sock,
    ):
        assert recv_plain(sock, 13) == b"220 welcome\r\n"


# -- want-read and want-write, both ways -------------------------------------------------------------------------------


def test_session_tickets_go_out_with_no_app_data_to_carry_them(backend_name: str, certs: Certs) -> None:
    """The server's handshake ends by writing NewSessionTicket messages (RFC 8446 section 4.6.1):
    a read-side event whose output must be sent though the app writes nothing."""
    context = certs.client_context()
    with tls_serving(backend_name, Protocol, certs.options()) as (server, layers):
        with tls_connect(server.address, context) as sock:
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                sock.recv(1)  # reads the tickets, then waits for app data that never comes
            session = sock.session
            assert session is not None and session.has_ticket
        with tls_connect(server.address, context, session=session) as again:
            assert again.session_reused
            again.sendall(b"x")  # the client's Finished is in before the server sees it leave
            wait_until(lambda: layers.handshakes == 2)


@uses_openssl
def test_key_updates_both_ways(backend_name: str, certs: Certs) -> None:
    """A KeyUpdate with update_requested (RFC 8446 section 4.6.3): the server reads with the new
    keys, and sends a KeyUpdate of its own "prior to sending its next Application Data record"
    (OpenSSL writes it with the next SSL_write, so it goes out with the app's next write)."""
    needs_openssl()
    with tls_serving(backend_name, Echo, certs.options()) as (server, layers):
        with SClient(server.address, certs, "-msg", "-tls1_3") as client:
            client.wait_for(r"Verify return code: 0 \(ok\)")
            client.send("K\n")  # s_client: "send a key update message to the server and request one back"
            client.wait_for(r">>> TLS 1.3, Handshake \[length 0005\], KeyUpdate")
            client.send("after the update\n")
            client.wait_for("^after the update$")
            lines = list(client.lines)
        answered = [i for i, line in enumerate(lines) if re.search(r"<<< TLS 1.3, Handshake .*KeyUpdate", line)]
        echoed = lines.index("after the update")
        assert answered and answered[0] < echoed, "\n".join(lines)
        assert layers.handshakes == 1


def test_the_servers_flight_waits_for_a_writable_socket(backend_name: str, tmp_path: Path) -> None:
    """A handshake flight larger than the socket takes (a large certificate, small buffers) waits in the
    connection's buffer for WRITE readiness, and the handshake completes when the client reads."""
    chain = make_certs(tmp_path, extra_names=1000)  # a 30 KB certificate
    context = ssl.create_default_context(cafile=chain.ca_file)
    with tls_serving(backend_name, Echo, chain.options()) as (server, layers):
        small_send_buffers(server)
        sock = small_buffer_client(server.address)
        with BIOClient(server.address, context, sock=sock) as client:
            with contextlib.suppress(ssl.SSLWantReadError):
                client.obj.do_handshake()  # the ClientHello
            client.flush()
            wait_until(lambda: in_loop(server, lambda: server.write_buffer_bytes) > 0, timeout=5)
            client.handshake()
            client.write(b"ping")
            assert client.read(4) == b"ping"
        wait_until(lambda: in_loop(server, lambda: server.write_buffer_bytes) == 0)
        assert layers.handshakes == 1


# -- plaintext the kernel does not signal ------------------------------------------------------------------------------


def test_a_request_in_the_segment_of_the_finished_is_answered(backend_name: str, certs: Certs) -> None:
    with (
        tls_serving(backend_name, Echo, certs.options()) as (server, _),
        BIOClient(server.address, certs.client_context()) as client,
    ):
        client.handshake(send_finished=False)
        client.write(b"ping", send=False)
        client.flush()  # the client's Finished and its first record in one send()
        assert client.read(4) == b"ping"


def test_records_held_during_a_pause_are_delivered_on_resume(backend_name: str, certs: Certs) -> None:
    class PausingEcho(Protocol):
        def __init__(self) -> None:
            self.chunks: list[tuple[float, bytes]] = []

        def data_received(self, data: bytes) -> None:
            self.chunks.append((time.monotonic(), data))
            self.transport.write(data)
            if len(self.chunks) == 1:
                self.transport.pause_reading()
                assert not self.transport.is_reading()
                self.transport.get_extra_info("loop").call_later(0.3, self.transport.resume_reading)

    apps: list[PausingEcho] = []

    def factory() -> PausingEcho:
        apps.append(PausingEcho())
        return apps[-1]

    with tls_serving(backend_name, factory, certs.options()) as (server, _):
        with BIOClient(server.address, certs.client_context()) as client:
            client.handshake()
            for record in (b"one.", b"two.", b"three."):
                client.write(record, send=False)
            client.flush()  # three records, one segment: the kernel signals it once
            assert client.read(14) == b"one.two.three."
        (app,) = apps
        assert [data for _, data in app.chunks] == [b"one.", b"two.", b"three."]
        assert app.chunks[1][0] - app.chunks[0][0] >= 0.25  # nothing was delivered while paused


# -- backpressure in plaintext bytes -----------------------------------------------------------------------------------


class FakeConnection:
    """Connection's send side, without a socket: write() buffers while ``congested``, drain()
    sends, and the protocol is paused past high-water and resumed at low-water as Connection does."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.protocol = None
        self.buffer = bytearray()
        self.sent = bytearray()
        self.congested = False
        self.paused = False
        self.high, self.low = 64 * 1024, 16 * 1024

    def write(self, data) -> None:
        if self.congested or self.buffer:
            self.buffer += data
        else:
            self.sent += data
        if len(self.buffer) > self.high and not self.paused:
            self.paused = True
            self.protocol.pause_writing()

    def drain(self, size: int) -> None:
        self.sent += self.buffer[:size]
        del self.buffer[:size]
        if self.paused and len(self.buffer) <= self.low:
            self.paused = False
            self.protocol.resume_writing()

    def take_sent(self) -> bytes:
        data = bytes(self.sent)
        self.sent.clear()
        return data

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.high, self.low = high, low
        if len(self.buffer) > high and not self.paused:
            self.paused = True
            self.protocol.pause_writing()

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 40000), "loop": self.loop}.get(name, default)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class Writer(Protocol):
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def pause_writing(self) -> None:
        self.events.append(("pause", self.transport.get_write_buffer_size()))

    def resume_writing(self) -> None:
        self.events.append(("resume", self.transport.get_write_buffer_size()))


def test_write_buffer_limits_count_plaintext_not_ciphertext(certs: Certs) -> None:
    loop = EventLoop("select")
    try:
        app = Writer()
        layer = TLSLayerFactory(lambda: app, loop, ServerTLS.load(certs.options()))()
        raw = FakeConnection(loop)
        raw.protocol = layer
        layer.connection_made(raw)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = certs.client_context().wrap_bio(incoming, outgoing, server_hostname=HOSTNAME)
        for _ in range(10):  # the handshake, in memory
            with contextlib.suppress(ssl.SSLWantReadError):
                client.do_handshake()
            if outgoing.pending:
                layer.data_received(outgoing.read())
            incoming.write(raw.take_sent())
        assert layers_done(layer), "the handshake did not complete"

        transport = app.transport
        transport.set_write_buffer_limits(high=10_000, low=2_000)
        raw.congested = True  # from now on the socket takes nothing
        chunk = bytes(range(100))
        writes = 0
        while not app.events and writes < 1000:
            transport.write(chunk)
            writes += 1
        # 101 writes of 100 bytes are the first to exceed 10,000 bytes of plaintext.  Ciphertext
        # (22 more bytes a record with TLS 1.3) would have crossed that mark at the 82nd write.
        assert writes == 101
        assert app.events == [("pause", 10_100)] and transport.get_write_buffer_size() == 10_100
        assert len(raw.buffer) <= 2_000 + 122  # the connection holds at most the low-water mark, plus a record

        raw.drain(len(raw.buffer))  # the connection resumes; the plaintext held back is encrypted
        assert app.events == [("pause", 10_100)]  # 8,400 bytes of plaintext still wait: over 2,000
        waiting = transport.get_write_buffer_size()
        assert waiting == 8_400
        raw.drain(4_000)  # part of a record: counted in part
        assert transport.get_write_buffer_size() == waiting - 4_000
        raw.drain(len(raw.buffer))
        assert app.events == [("pause", 10_100), ("resume", 0)]
        assert transport.get_write_buffer_size() == 0

        incoming.write(raw.take_sent())
        received = bytearray()
        with contextlib.suppress(ssl.SSLWantReadError):
            while True:
                received += client.read(1 << 16)
        assert received == chunk * writes
    finally:
        loop.close()


def layers_done(layer) -> bool:
    return not layer._handshaking


def test_backpressure_over_a_congested_socket(backend_name: str, certs: Certs) -> None:
    total = 1 << 20
    pattern = bytes(range(256)) * (total // 256)

    class Flood(Protocol):
        def __init__(self) -> None:
            self.written = 0
            self.paused = False
            self.at_pause: list[int] = []
            self.at_resume: list[int] = []

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            transport.set_write_buffer_limits(32_000, 8_000)
            self.fill()

        def fill(self) -> None:
            while not self.paused and self.written < total:
                self.transport.write(pattern[self.written : self.written + 100])
                self.written += 100
            if self.written >= total:
                self.transport.close()

        def pause_writing(self) -> None:
            self.paused = True
            self.at_pause.append(self.transport.get_write_buffer_size())

        def resume_writing(self) -> None:
            self.paused = False
            self.at_resume.append(self.transport.get_write_buffer_size())
            self.fill()

    apps: list[Flood] = []

    def factory() -> Flood:
        apps.append(Flood())
        return apps[-1]

    with tls_serving(backend_name, factory, certs.options()) as (server, _):
        small_send_buffers(server)
        raw = small_buffer_client(server.address)
        with tls_connect(server.address, certs.client_context(), raw=raw) as sock:
            wait_until(lambda: bool(apps) and bool(apps[0].at_pause), timeout=10)
            received = bytearray()
            while chunk := sock.recv(1 << 16):
                received += chunk
        assert received == pattern
        (app,) = apps
        assert app.at_pause and all(32_000 < size <= 32_100 for size in app.at_pause), app.at_pause
        assert len(app.at_resume) == len(app.at_pause) and all(size <= 8_000 for size in app.at_resume)


# -- closing: close_notify, half-close, and clients that vanish --------------------------------------------------------


def test_close_notify_from_the_client_is_eof_and_the_reply_still_goes_out(backend_name: str, certs: Certs) -> None:
    class LastWord(Recorder):
        def eof_received(self):
            self.calls.append("eof")
            self.transport.write(b"last word on " + bytes(self.received))
            self.transport.close()
            return True

        def data_received(self, data: bytes) -> None:
            self.calls.append("data")
            self.received += data

    made: list[Recorder] = []
    with tls_serving(backend_name, lambda: LastWord(made), certs.options()) as (server, _):
        with BIOClient(server.address, certs.client_context()) as client:
            client.handshake()
            client.write(b"question")
            client.send_close_notify()  # our write side is shut; we go on reading
            assert client.read_to_close_notify() == b"last word on question"
            assert client.close_notify
            client.wait_eof()
        wait_until(lambda: not server.connections)
        assert made[0].calls == ["made", "data", "eof", "lost"] and made[0].lost == [None]


@pytest.mark.parametrize("spoken", [True, False], ids=["mid-handshake", "silent"])
def test_a_shutdown_answers_a_handshake_under_way_then_says_close_notify(
    backend_name: str, certs: Certs, spoken: bool
) -> None:
    """What a client had sent before the shutdown gets its answer: a client whose handshake is
    under way (its Finished not yet sent) completes it, then reads the server's close_notify, where
    it read a bare EOF mid-handshake (a superseded worker's SIGTERM in a rolling restart); the app
    is never made.  A client that has sent nothing is closed at once, as before."""
    made: list[Recorder] = []
    with tls_serving(backend_name, lambda: Recorder(made), certs.options()) as (server, layers):
        with BIOClient(server.address, certs.client_context()) as client:
            if spoken:
                client.handshake(send_finished=False)  # the server waits for our Finished
            else:
                wait_until(lambda: len(server.connections) == 1)
            drained = threading.Event()
            in_loop(server, lambda: server.shutdown(10, drained.set))
            if spoken:
                assert server.connections  # still answering
                client.flush()  # our Finished
                assert client.read_to_close_notify() == b""
                assert client.close_notify
                client.wait_eof()
            else:
                with pytest.raises(ConnectionError):
                    client.handshake()
        assert drained.wait(10)  # the client's close ends the server's lingering one
        assert not any(app.calls for app in made)  # made by the factory, never connected
        assert layers.handshakes == (1 if spoken else 0) and layers.handshake_failures == 0


def test_write_eof_sends_close_notify_and_fin_and_keeps_reading(backend_name: str, certs: Certs) -> None:
    class HalfCloser(Recorder):
        def data_received(self, data: bytes) -> None:
            self.calls.append("data")
            self.received += data
            if data == b"first":
                self.transport.write(b"bye")
                self.transport.write_eof()
                assert self.transport.is_reading()

    made: list[Recorder] = []
    with tls_serving(backend_name, lambda: HalfCloser(made), certs.options()) as (server, _):
        with BIOClient(server.address, certs.client_context()) as client:
            client.handshake()
            client.write(b"first")
            assert client.read_to_close_notify() == b"bye"
            client.wait_eof()  # the FIN after the close_notify
            client.write(b"more")  # TLS 1.3 half-close: the server still reads (RFC 8446 section 6.1)
            client.send_close_notify()
            wait_until(lambda: not server.connections)
        app = made[0]
        assert bytes(app.received) == b"firstmore"
        assert app.calls[-2:] == ["eof", "lost"] and app.lost == [None]


def test_close_by_the_app_sends_close_notify(backend_name: str, certs: Certs) -> None:
    class Closer(Protocol):
        def data_received(self, data: bytes) -> None:
            self.transport.write(data.upper())
            self.transport.close()

    with (
        tls_serving(backend_name, Closer, certs.options()) as (server, _),
        BIOClient(server.address, certs.client_context()) as client,
    ):
        client.handshake()
        client.write(b"shout")
        assert client.read_to_close_notify() == b"SHOUT"
        client.wait_eof()


@pytest.mark.parametrize("server_closes", ["shutdown", "idle timeout"])
def test_a_close_by_the_server_itself_sends_close_notify(backend_name: str, certs: Certs, server_closes: str) -> None:
    """Shutdown and the idle sweep close connections below the app: the layer still says
    close_notify, so the client sees the session end, not a truncation."""
    options = {"idle_timeout": 0.2} if server_closes == "idle timeout" else {}
    with (
        tls_serving(backend_name, Echo, certs.options(), **options) as (server, _),
        BIOClient(server.address, certs.client_context()) as client,
    ):
        client.handshake()
        client.write(b"ping")
        if server_closes == "shutdown":
            assert client.read(4) == b"ping"
            drained = threading.Event()
            in_loop(server, lambda: server.shutdown(5, drained.set))
            assert client.read_to_close_notify() == b""
        else:
            assert client.read_to_close_notify() == b"ping"  # then idle: closed by the sweep
        client.wait_eof()


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_clients_that_vanish_without_close_notify(
    backend_name: str, certs: Certs, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    made: list[Recorder] = []
    with (
        caplog.at_level(logging.DEBUG, logger="pollserve"),
        tls_serving(backend_name, lambda: Recorder(made), certs.options()) as (server, layers),
    ):
        sock = tls_connect(server.address, certs.client_context())
        sock.sendall(b"data")
        assert recv_plain(sock, 4) == b"data"  # the tickets came before it: nothing is left unread
        if how == "fin":
            sock.close()  # an SSLSocket closes without close_notify
        else:
            reset(sock)
        wait_until(lambda: not server.connections)
        app = made[0]
        if how == "fin":  # like the ssl module's suppress_ragged_eofs: an end of file
            assert app.calls == ["made", "data", "eof", "lost"] and app.lost == [None]
        else:
            assert app.calls == ["made", "data", "lost"] and isinstance(app.lost[0], ConnectionResetError)
        assert layers.handshake_failures == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert_no_tracebacks(caplog)


def test_a_client_leaving_mid_handshake_is_a_failure_and_one_without_a_byte_is_not(
    backend_name: str, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO, logger="pollserve"),
        tls_serving(backend_name, Echo, certs.options()) as (server, layers),
    ):
        connect(server.address).close()  # a TCP health check: no byte, no failure
        reset(connect(server.address))  # nor one that leaves by RST, as HAProxy's checks do
        client = BIOClient(server.address, certs.client_context())
        with contextlib.suppress(ssl.SSLWantReadError):
            client.obj.do_handshake()
        client.flush()  # the ClientHello, then gone
        time.sleep(0.1)
        client.close()
        wait_until(lambda: layers.handshake_failures == 1 and not server.connections)
        time.sleep(0.1)
        assert layers.handshake_failures == 1 and layers.handshakes == 0
    assert len(warnings_about(caplog, "TLS handshakes failed")) == 1
    assert_no_tracebacks(caplog)


# -- the handshake deadline, and clients that do not speak TLS ---------------------------------------------------------


def test_handshake_timeout_frees_the_slot(backend_name: str, certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="pollserve"),
        tls_serving(backend_name, Echo, certs.options(handshake_timeout=0.3)) as (server, layers),
    ):
        silent = connect(server.address, timeout=5)
        partial = connect(server.address, timeout=5)
        partial.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then nothing
        started = time.monotonic()
        for sock in (silent, partial):
            with sock, contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""
        elapsed = time.monotonic() - started
        assert 0.2 <= elapsed < 3
        wait_until(lambda: layers.handshake_failures == 2 and not server.connections)
    (line,) = warnings_about(caplog, "TLS handshakes failed")
    assert "no handshake within 0.3 s" in line
    assert_no_tracebacks(caplog)


def test_plain_text_to_the_tls_port_is_one_log_line(
    backend_name: str, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    requests = [b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"] * 5 + [b"hello, is this thing on?\r\n"] * 5
    with (
        caplog.at_level(logging.INFO, logger="pollserve"),
        tls_serving(backend_name, Echo, certs.options()) as (server, layers),
    ):
        for request in requests:
            with connect(server.address) as sock:
                sock.sendall(request)
                try:
                    reply = recv_until_eof(sock)
                except ConnectionResetError:
                    reply = b""
                assert reply == b"" or reply[0] == 0x15, reply[:40]  # nothing, or a TLS alert record
        wait_until(lambda: layers.handshake_failures == len(requests) and not server.connections)
        assert layers.handshakes == 0
    (line,) = warnings_about(caplog, "TLS handshakes failed")
    assert "plain HTTP spoken to the TLS port" in line
    assert_no_tracebacks(caplog)


# -- client certificates, ALPN, versions -------------------------------------------------------------------------------


def test_mutual_tls(backend_name: str, certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    made: list[Recorder] = []
    options = certs.options(ca=certs.ca_file, verify_client=True)
    with (
        caplog.at_level(logging.WARNING, logger="pollserve"),
        tls_serving(backend_name, lambda: Recorder(made), options) as (server, layers),
    ):
        with tls_connect(server.address, certs.client_context(certificate=True)) as sock:
            sock.sendall(b"hi")
            assert recv_plain(sock, 2) == b"hi"
        assert made[0].info["peercert"]["subjectAltName"] == (("DNS", "client.example"),)
        # TLS 1.3: the client's handshake is done before the server has seen its (missing) certificate.
        with tls_connect(server.address, certs.client_context()) as sock, contextlib.suppress(OSError):
            sock.sendall(b"hi")
            assert sock.recv(2) == b""
        wait_until(lambda: layers.handshake_failures == 1)
        assert layers.handshakes == 1
        assert made[1].calls == []  # made at accept time, as asyncio does, and never told of it
    (line,) = warnings_about(caplog, "TLS handshakes failed")
    assert "no client certificate" in line


def test_a_ca_without_verify_client_makes_certificates_optional(backend_name: str, certs: Certs) -> None:
    made: list[Recorder] = []
    with tls_serving(backend_name, lambda: Recorder(made), certs.options(ca=certs.ca_file)) as (server, _):
        for certificate in (False, True):
            with tls_connect(server.address, certs.client_context(certificate=certificate)) as sock:
                sock.sendall(b"hi")
                assert recv_plain(sock, 2) == b"hi"
    assert made[0].info["peercert"] is None
    assert made[1].info["peercert"]["subjectAltName"] == (("DNS", "client.example"),)


def test_alpn(backend_name: str, certs: Certs) -> None:
    made: list[Recorder] = []
    with tls_serving(backend_name, lambda: Recorder(made), certs.options(alpn=("h2", "http/1.1"))) as (server, _):
        context = certs.client_context()
        context.set_alpn_protocols(["http/1.1", "spdy/3"])
        with tls_connect(server.address, context) as sock:
            assert sock.selected_alpn_protocol() == "http/1.1"
            sock.sendall(b"hi")
            recv_plain(sock, 2)
    assert made[0].info["ssl_object"].selected_alpn_protocol() == "http/1.1"
    assert made[0].info["alpn_offered"] == ["http/1.1", "spdy/3"]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
def test_alpn_without_overlap_is_refused_and_without_alpn_is_served(
    backend_name: str, certs: Certs, version: ssl.TLSVersion, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 7301 section 3.2: a client whose ALPN names none of the server's protocols gets a fatal
    no_application_protocol alert; one that sends no ALPN is served, with no protocol selected."""
    made: list[Recorder] = []

    def client(*protocols: str) -> ssl.SSLContext:
        context = certs.client_context()
        context.maximum_version = version
        if protocols:
            context.set_alpn_protocols(list(protocols))
        return context

    with (
        caplog.at_level(logging.INFO, logger="pollserve"),
        tls_serving(backend_name, lambda: Recorder(made), certs.options(alpn=("h2",))) as (server, layers),
    ):
        with pytest.raises(ssl.SSLError) as refused:
            tls_connect(server.address, client("http/1.1")).close()
        # Python's table of OpenSSL's reasons lacks this one: the message names the alert
        assert "alert no application protocol" in str(refused.value), refused.value
        wait_until(lambda: layers.handshake_failures == 1)
        for protocols, selected in (((), None), (("http/1.1", "h2"), "h2")):
            with tls_connect(server.address, client(*protocols)) as sock:
                assert sock.selected_alpn_protocol() == selected
                sock.sendall(b"hi")
                assert recv_plain(sock, 2) == b"hi"
        assert layers.handshakes == 2 and layers.handshake_failures == 1
    told = [app for app in made if app.calls]  # the refused client's app was made, never told
    assert [app.info["ssl_object"].selected_alpn_protocol() for app in told] == [None, "h2"]
    assert [app.info["alpn_offered"] for app in told] == [[], ["http/1.1", "h2"]]
    (line,) = warnings_about(caplog, "TLS handshakes failed")
    assert "the client offers ALPN http/1.1, none of h2: refused" in line, line
    assert_no_tracebacks(caplog)


@uses_openssl
def test_openssl_s_client_alpn(backend_name: str, certs: Certs) -> None:
    with tls_serving(backend_name, Echo, certs.options(alpn=("h2",))) as (server, layers):
        output = s_client(server.address, certs.ca_file, "-alpn", "http/1.1")
        assert "no application protocol" in output and "alert number 120" in output, output
        output = s_client(server.address, certs.ca_file, "-alpn", "h2")
        assert "ALPN protocol: h2" in output, output
        output = s_client(server.address, certs.ca_file)
        assert "No ALPN negotiated" in output and "Verification: OK" in output, output
        wait_until(lambda: layers.handshakes == 2 and layers.handshake_failures == 1)


def test_tls_1_2_is_the_minimum(backend_name: str, certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    context = server_context(certs.options())
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_RENEGOTIATION
    with (
        caplog.at_level(logging.WARNING, logger="pollserve"),
        tls_serving(backend_name, Echo, certs.options()) as (server, layers),
    ):
        tls12 = certs.client_context()
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        with tls_connect(server.address, tls12) as sock:
            assert sock.version() == "TLSv1.2"
            sock.sendall(b"old but fine")
            assert recv_plain(sock, 12) == b"old but fine"
        tls11 = certs.client_context()
        tls11.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            tls11.minimum_version = ssl.TLSVersion.TLSv1
            tls11.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(ssl.SSLError):
            tls_connect(server.address, tls11).close()
        wait_until(lambda: layers.handshake_failures == 1)
        assert layers.handshakes == 1
    (line,) = warnings_about(caplog, "TLS handshakes failed")
    assert "the client offers no TLS version this server accepts" in line


def test_reload_switches_new_handshakes_and_keeps_sessions(
    backend_name: str, certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    renewed = make_certs(tmp_path / "renewed")
    cert_file, key_file = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    certs.write_server_files(cert_file, key_file)
    context = certs.client_context()
    context.load_verify_locations(renewed.ca_file)
    options = TLSOptions(cert_file, key_file)
    with (
        caplog.at_level(logging.INFO, logger="pollserve"),
        tls_serving(backend_name, Echo, options) as (server, layers),
        tls_connect(server.address, context) as established,
    ):
        assert established.getpeercert(binary_form=True) == der(certs)
        renewed.write_server_files(cert_file, key_file)
        assert in_loop(server, lambda: reload_certificates(layers.tls))
        with tls_connect(server.address, context) as fresh:
            assert fresh.getpeercert(binary_form=True) == der(renewed)
        established.sendall(b"still here")
        assert recv_plain(established, 10) == b"still here"

        Path(cert_file).write_text("not a certificate\n")
        assert not in_loop(server, lambda: reload_certificates(layers.tls))
        with tls_connect(server.address, context) as fresh:
            assert fresh.getpeercert(binary_form=True) == der(renewed)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "still serving the certificate loaded before" in errors[0]
    assert "--tls-cert" in errors[0]


def der(certs: Certs) -> bytes:
    return ssl.PEM_cert_to_DER_cert(certs.server.cert_chain_pems[0].bytes().decode())


def test_a_proxy_header_comes_before_the_handshake(backend_name: str, certs: Certs) -> None:
    """--proxy-protocol with --tls-cert: the PROXY layer in front (the header is in clear), then TLS."""
    made: list[Recorder] = []
    loop = EventLoop(backend_name)
    tls_layers = TLSLayerFactory(lambda: Recorder(made), loop, ServerTLS.load(certs.options()))
    with serving(backend_name, ProxyLayerFactory(tls_layers, loop), loop=loop) as server:
        raw = connect(server.address)
        raw.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n")
        with tls_connect(server.address, certs.client_context(), raw=raw) as sock:
            sock.sendall(b"hi")
            assert recv_plain(sock, 2) == b"hi"
    assert made[0].info["peername"] == ("203.0.113.7", 56324)
    assert tls_layers.handshakes == 1


# -- openssl s_client --------------------------------------------------------------------------------------------------


class SClient:
    """``openssl s_client`` on a pipe; its output is read by a thread.  Killed by its PID at exit."""

    def __init__(self, address, certs: Certs, *args: str) -> None:
        assert OPENSSL is not None
        self.proc = subprocess.Popen(
            [OPENSSL, "s_client", "-connect", f"{address[0]}:{address[1]}", "-CAfile", certs.ca_file,
             "-servername", HOSTNAME, "-verify_return_error", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def wait_for(self, pattern: str, timeout: float = 10) -> None:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not any(regex.search(line) for line in list(self.lines)):
            assert time.monotonic() < deadline, f"no {pattern!r} from s_client:\n" + "\n".join(self.lines)
            time.sleep(0.02)

    def close(self) -> int | None:
        """Stdin's EOF: s_client sends close_notify and exits."""
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self._reader.join(5)

    def __enter__(self) -> SClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# -- end to end: the pollserve command ---------------------------------------------------------------------------------


def tls_args(certs: Certs, *more: str) -> tuple[str, ...]:
    return ("--tls-cert", certs.cert_file, "--tls-key", certs.key_file, *more)


def metrics(address) -> dict[str, float]:
    status, _, body = http_get(address, "/metrics")
    assert status == 200
    values = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_cli_serves_tls_and_counts_handshakes(start_server, backend_name: str, certs: Certs) -> None:
    server = start_server("--backend", backend_name, "--app", "echo", "--stats-port", "0", *tls_args(certs))
    server.wait_for_log(
        r"TLS: certificate .*cert\.pem, TLS 1\.3, and TLS 1\.2 with ECDHE and AEAD ciphers, handshake timeout 5 s"
    )
    address = stats_address(server)
    with tls_connect(server.address, certs.client_context()) as sock:
        sock.sendall(b"hello")
        assert recv_plain(sock, 5) == b"hello"
        assert get_stats(address)["connections_open"] == 1  # a TLS connection is a connection
    wait_for(lambda: get_stats(address)["connections_closed"] == 1, what="the client closed")
    stats = get_stats(address)
    assert stats["tls_handshakes"] == 1 and stats["tls_handshake_failures"] == 0
    assert stats["bytes_in"] > 5 + 300 and stats["bytes_out"] > 5 + 300  # ciphertext, handshake included
    values = metrics(address)
    assert values["pollserve_tls_handshakes_total"] == 1
    assert values["pollserve_tls_handshake_failures_total"] == 0
    assert "Traceback" not in server.log


def test_cli_without_tls_reports_zero_tls_counters(start_server) -> None:
    server = start_server("--stats-port", "0")
    address = stats_address(server)
    stats = get_stats(address)
    assert stats["tls_handshakes"] == 0 and stats["tls_handshake_failures"] == 0
    values = metrics(address)
    assert values["pollserve_tls_handshakes_total"] == 0
    assert values["pollserve_tls_handshake_failures_total"] == 0
    assert "TLS" not in server.log


def test_cli_timeout_and_plain_text_are_counted_and_logged_once(start_server, certs: Certs) -> None:
    server = start_server("--stats-port", "0", "--tls-handshake-timeout", "0.5", *tls_args(certs))
    address = stats_address(server)
    with connect(server.address, timeout=5) as silent:
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert silent.recv(10) == b""
        assert time.monotonic() - started < 3
    for _ in range(5):
        with connect(server.address) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                recv_until_eof(sock)
    wait_for(lambda: get_stats(address)["tls_handshake_failures"] == 6, what="6 failed handshakes")
    lines = [line for line in server.lines if "TLS handshakes failed" in line]
    assert len(lines) == 1 and "no handshake within 0.5 s" in lines[0], server.log
    assert "Traceback" not in server.log


@uses_openssl
def test_openssl_s_client_session(start_server, certs: Certs) -> None:
    needs_openssl()
    server = start_server("--app", "echo", *tls_args(certs))
    with SClient(server.address, certs, "-brief") as client:
        client.wait_for("Verification: OK")
        client.send("hello over tls\n")
        client.wait_for("^hello over tls$")
        assert client.close() == 0
    assert "Traceback" not in server.log


@uses_openssl
def test_cli_refuses_a_finite_field_key_exchange_and_an_alpn_mismatch(start_server, certs: Certs) -> None:
    server = start_server("--app", "echo", "--stats-port", "0", *tls_args(certs, "--tls-alpn", "h2"))
    address = stats_address(server)
    output = s_client(server.address, certs.ca_file, "-groups", "ffdhe8192", "-alpn", "h2")
    assert "alert handshake failure" in output and "Server Temp Key" not in output, output
    output = s_client(server.address, certs.ca_file, "-alpn", "http/1.1")
    assert "alert no application protocol" in output, output
    with tls_connect(server.address, certs.client_context()) as sock:  # no ALPN: served
        sock.sendall(b"hello")
        assert recv_plain(sock, 5) == b"hello"
    wait_for(lambda: get_stats(address)["tls_handshake_failures"] == 2, what="2 refused handshakes")
    assert get_stats(address)["tls_handshakes"] == 1
    (line,) = [line for line in server.lines if "TLS handshakes failed" in line]  # one episode
    assert "finite-field key exchange (ffdhe8192)" in line, line
    assert "Traceback" not in server.log


@pytest.mark.skipif(not POSIX, reason="SIGHUP is POSIX")
def test_sighup_reloads_the_certificate(start_server, certs: Certs, tmp_path: Path) -> None:
    renewed = make_certs(tmp_path / "renewed")
    cert_file, key_file = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    certs.write_server_files(cert_file, key_file)
    context = certs.client_context()
    context.load_verify_locations(renewed.ca_file)
    server = start_server("--app", "echo", "--tls-cert", cert_file, "--tls-key", key_file)
    with tls_connect(server.address, context) as established:
        assert established.getpeercert(binary_form=True) == der(certs)
        renewed.write_server_files(cert_file, key_file)
        server.signal(signal.SIGHUP)
        server.wait_for_log("SIGHUP: reload: TLS certificate reloaded from")
        with tls_connect(server.address, context) as fresh:
            assert fresh.getpeercert(binary_form=True) == der(renewed)
        established.sendall(b"still here")
        assert recv_plain(established, 10) == b"still here"
        Path(key_file).write_text("not a key\n")
        server.signal(signal.SIGHUP)
        server.wait_for_log("still serving the certificate loaded before")
        with tls_connect(server.address, context) as fresh:
            assert fresh.getpeercert(binary_form=True) == der(renewed)
    assert server.alive()
    assert len([line for line in server.lines if " ERROR " in line]) == 1, server.log


@pytest.mark.skipif(not POSIX, reason="--workers is POSIX")
def test_workers_load_the_certificate_on_a_rolling_restart(start_server, certs: Certs, tmp_path: Path) -> None:
    renewed = make_certs(tmp_path / "renewed")
    cert_file, key_file = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    certs.write_server_files(cert_file, key_file)
    context = certs.client_context()
    context.load_verify_locations(renewed.ca_file)
    server = start_server(
        "--workers", "2", "--app", "echo", "--stats-port", "0", "--tls-cert", cert_file, "--tls-key", key_file
    )
    address = stats_address(server)
    with tls_connect(server.address, context) as sock:
        assert sock.getpeercert(binary_form=True) == der(certs)
    renewed.write_server_files(cert_file, key_file)
    server.signal(signal.SIGHUP)

    def serves_renewed() -> bool:
        with tls_connect(server.address, context) as sock:
            return sock.getpeercert(binary_form=True) == der(renewed)

    wait_for(lambda: all(serves_renewed() for _ in range(4)), timeout=30, what="every worker on the new certificate")
    wait_for(lambda: get_stats(address)["tls_handshakes"] >= 5, timeout=10, what="the workers' handshakes summed")


# -- the command line: one line and exit 2 -----------------------------------------------------------------------------


def encrypted_key(certs: Certs, path: Path) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(certs.server.private_key_pem.bytes(), password=None)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return str(path)


def test_files_that_do_not_load_are_one_line_and_exit_2_before_binding(certs: Certs, tmp_path: Path) -> None:
    other = make_certs(tmp_path / "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    missing = str(tmp_path / "missing.pem")
    cases = [
        (("--tls-cert", missing), f"--tls-cert {missing}: No such file or directory"),
        (("--tls-cert", certs.cert_file, "--tls-key", missing), f"--tls-key {missing}: No such file"),
        (("--tls-cert", str(garbage), "--tls-key", certs.key_file), "not a PEM certificate and its private key"),
        (("--tls-cert", certs.cert_file), "no PEM certificate and private key in it (give the key with --tls-key)"),
        (("--tls-cert", certs.cert_file, "--tls-key", other.key_file), "the key does not match the certificate"),
        (
            ("--tls-cert", certs.cert_file, "--tls-key", encrypted_key(certs, tmp_path / "locked.pem")),
            "is encrypted with a passphrase",
        ),
        ((*tls_args(certs), "--tls-ca", str(garbage)), f"--tls-ca {garbage}: no PEM CA certificate in it"),
    ]
    # The port is taken: a server that bound before loading the files would say so and exit 1.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        for args, message in cases:
            result = run_pollserve("--port", port, *args)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2, (args, result.stderr)
            assert len(lines) == 1 and lines[0].startswith("pollserve: --tls-"), (args, result.stderr)
            assert message in lines[0], (args, lines[0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tls-key", "key.pem"), "--tls-key needs --tls-cert"),
        (("--tls-verify-client",), "--tls-verify-client needs --tls-cert"),
        (("--tls-cert", "c.pem", "--tls-verify-client"), "--tls-verify-client needs --tls-ca"),
        (("--tls-cert", "c.pem", "--tls-alpn", "h2,,http/1.1"), "--tls-alpn: '' is not an ALPN protocol name"),
        (("--tls-cert", "c.pem", "--tls-handshake-timeout", "0"), "--tls-handshake-timeout needs a positive"),
        (("--tls-cert", "c.pem", "backends"), "--tls-cert applies to the server, not to 'pollserve backends'"),
    ],
)
def test_tls_option_errors_are_one_line_and_exit_2(args: tuple[str, ...], message: str) -> None:
    result = run_pollserve(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
