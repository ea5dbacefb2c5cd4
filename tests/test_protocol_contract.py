"""asyncio's Protocol contract, kept the same by every transport an app can be handed: the plain
connection, the TLS layer's and the PROXY layer's.  One set of tests, run over each, in-process
over loopback; the client speaks the layer's part (a TLS handshake, a PROXY header) and then the
same bytes.  The first bytes go out in the segment that ends the layer's part (the header, the
client's Finished), since that is where a layer hands over bytes the kernel will not announce.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from clients import connect, reset
from inprocess import in_loop, serving, wait_until
from tlshelpers import BIOClient, Certs, make_certs

from pollserve.apps import Protocol
from pollserve.loop import EventLoop
from pollserve.proxy import ProxyLayerFactory
from pollserve.server import Server
from pollserve.tls import ServerTLS, TLSLayerFactory

KINDS = ["plain", "tls", "proxy"]
PROXY_HEADER = b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 5001\r\n"
#: how long a test waits for something that must not happen
QUIET = 0.3


class AppError(Exception):
    """Raised by the app under test on purpose."""


class Script(Protocol):
    """The app under test: records every call, and does in each what the test's ``on`` says."""

    def __init__(self, on: dict[str, Callable[..., Any]]) -> None:
        self.on = on
        self.calls: list[str] = []
        self.lost: list[BaseException | None] = []
        self.received = bytearray()
        self.gone = threading.Event()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.calls.append("made")
        if "made" in self.on:
            self.on["made"](self)

    def data_received(self, data: bytes) -> None:
        self.calls.append("data")
        self.received += data
        if "data" in self.on:
            self.on["data"](self, data)

    def eof_received(self) -> bool | None:
        self.calls.append("eof")
        return self.on["eof"](self) if "eof" in self.on else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append("lost")
        self.lost.append(exc)
        self.gone.set()


class Client:
    """The client side of one kind of transport: the same bytes, whatever the layer."""

    def __init__(self, kind: str, address: Any, certs: Certs) -> None:
        self.kind = kind
        self.sock = connect(address, timeout=10)
        self.tls: BIOClient | None = None
        if kind == "tls":
            self.tls = BIOClient(address, certs.client_context(), sock=self.sock)

    def open(self, first: bytes) -> None:
        """The layer's part, and ``first`` in the same send()."""
        if self.tls is not None:
            self.tls.handshake(send_finished=False)
            self.tls.write(first)  # the Finished and the first record, in one send
        else:
            self.sock.sendall((PROXY_HEADER if self.kind == "proxy" else b"") + first)

    def send(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.write(data)
        else:
            self.sock.sendall(data)

    def send_eof(self) -> None:
        if self.tls is not None:
            self.tls.send_close_notify()
        else:
            self.sock.shutdown(socket.SHUT_WR)

    def read_to_end(self) -> bytes:
        """What the server sent until it closed (close_notify and FIN with TLS)."""
        if self.tls is not None:
            data = self.tls.read_to_close_notify()
            self.tls.wait_eof()
            return data
        data = bytearray()
        while chunk := self.sock.recv(65536):
            data += chunk
        return bytes(data)

    def closed(self) -> bool:
        """The server closed, whatever it sent before (ciphertext included): EOF or a reset."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("contract-certs"))


@contextlib.contextmanager
def contract(kind: str, certs: Certs, **on: Callable[..., Any]) -> Iterator[tuple[Server, Client, list[Script]]]:
    """A server of Script(on) behind the layer of ``kind``, one client connected to it, and the
    apps made so far."""
    apps: list[Script] = []

    def factory() -> Script:
        app = Script(on)
        apps.append(app)
        return app

    loop = EventLoop()
    layer: Any = factory
    if kind == "tls":
        layer = TLSLayerFactory(factory, loop, ServerTLS.load(certs.options()))
    elif kind == "proxy":
        layer = ProxyLayerFactory(factory, loop)
    try:
        with serving("", layer, loop=loop) as server:
            client = Client(kind, server.address, certs)
            try:
                yield server, client, apps
            finally:
                client.close()
    finally:
        if not loop._closed:
            loop.close()


def call(server: Server, app: Script, method: str, *args: Any) -> Any:
    """A transport method, called on the loop's thread as an app's timer would."""
    return in_loop(server, lambda: getattr(app.transport, method)(*args))


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def first(apps: list[Script]) -> Script:
    """The first connection's app, once the server has made it."""
    wait_until(lambda: bool(apps))
    return apps[0]


def pause(app: Script, *args: Any) -> None:
    app.transport.pause_reading()


def fail(app: Script, *args: Any) -> None:
    raise AppError("on purpose")


def test_pause_in_connection_made_holds_the_first_bytes_until_resume(kind: str, certs: Certs) -> None:
    with contract(kind, certs, made=pause) as (server, client, apps):
        client.open(b"first")
        wait_until(lambda: apps and "made" in apps[0].calls)
        app = apps[0]
        time.sleep(QUIET)
        assert app.calls == ["made"]
        assert call(server, app, "is_reading") is False
        call(server, app, "resume_reading")
        wait_until(lambda: app.received == b"first")
        assert call(server, app, "is_reading") is True
        client.send(b" second")
        wait_until(lambda: app.received == b"first second")


def test_pause_in_connection_made_keeps_the_order_of_data_and_eof(kind: str, certs: Certs) -> None:
    with contract(kind, certs, made=pause) as (server, client, apps):
        client.open(b"first")
        client.send_eof()
        app = first(apps)
        time.sleep(QUIET)
        assert app.calls == ["made"]
        call(server, app, "resume_reading")
        assert app.gone.wait(5)
        assert app.calls[-2:] == ["eof", "lost"] and app.received == b"first"
        assert app.lost == [None]


@pytest.mark.parametrize("paused_first", [False, True], ids=["reading", "after-resume"])
def test_an_exception_from_data_received_closes_and_is_reported(
    kind: str, certs: Certs, paused_first: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """connection_lost(exc) with the app's own exception, one error line, and the client sees the
    close -- also when the bytes are handed over after resume_reading()."""
    on: dict[str, Callable[..., Any]] = {"data": fail}
    if paused_first:
        on["made"] = pause
    with caplog.at_level(logging.INFO, logger="pollserve"), contract(kind, certs, **on) as (server, client, apps):
        client.open(b"boom")
        app = first(apps)
        if paused_first:
            time.sleep(QUIET)
            call(server, app, "resume_reading")
        assert app.gone.wait(5), f"not closed: {app.calls}"
        assert app.calls == ["made", "data", "lost"]
        assert isinstance(app.lost[0], AppError)
        assert client.closed()
        wait_until(lambda: not server.connections)
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and "data_received" in errors[0].getMessage()
    assert isinstance(errors[0].exc_info[1], AppError)


def test_an_exception_from_eof_received_closes_and_is_reported(kind: str, certs: Certs) -> None:
    with contract(kind, certs, eof=fail) as (_server, client, apps):
        client.open(b"data")
        client.send_eof()
        app = first(apps)
        assert app.gone.wait(5), f"not closed: {app.calls}"
        assert app.calls == ["made", "data", "eof", "lost"] and isinstance(app.lost[0], AppError)
        assert client.closed()


def test_eof_received_falsy_closes_after_what_it_wrote(kind: str, certs: Certs) -> None:
    def goodbye(app: Script) -> None:
        app.transport.write(b"bye")

    with contract(kind, certs, eof=goodbye) as (_server, client, apps):
        client.open(b"data")
        client.send_eof()
        assert client.read_to_end() == b"bye"
        app = apps[0]
        assert app.gone.wait(5)
        assert app.calls == ["made", "data", "eof", "lost"] and app.lost == [None]


def test_eof_received_truthy_keeps_writing(kind: str, certs: Certs) -> None:
    with contract(kind, certs, eof=lambda app: True) as (server, client, apps):
        client.open(b"data")
        client.send_eof()
        wait_until(lambda: bool(apps) and "eof" in apps[0].calls)
        app = apps[0]
        time.sleep(QUIET)
        assert app.calls == ["made", "data", "eof"]
        assert call(server, app, "is_reading") is False
        call(server, app, "pause_reading")  # after EOF: allowed, and nothing to pause
        call(server, app, "resume_reading")  # nor a second eof_received
        call(server, app, "write", b"after your eof")
        call(server, app, "close")
        assert client.read_to_end() == b"after your eof"
        assert app.gone.wait(5)
        assert app.calls == ["made", "data", "eof", "lost"] and app.lost == [None]


def test_close_inside_data_received_then_writes_are_ignored(kind: str, certs: Certs) -> None:
    def reply_and_close(app: Script, data: bytes) -> None:
        app.transport.write(b"reply")
        app.transport.close()
        assert app.transport.is_closing()
        app.transport.write(b"ignored")
        app.transport.close()  # twice is once

    with contract(kind, certs, data=reply_and_close) as (_server, client, apps):
        client.open(b"request")
        assert client.read_to_end() == b"reply"
        app = apps[0]
        assert app.gone.wait(5)
        assert app.calls == ["made", "data", "lost"] and app.lost == [None]


def test_abort_inside_data_received(kind: str, certs: Certs) -> None:
    def abort(app: Script, data: bytes) -> None:
        app.transport.abort()
        app.transport.write(b"ignored")

    with contract(kind, certs, data=abort) as (_server, client, apps):
        client.open(b"request")
        app = first(apps)
        assert app.gone.wait(5)
        assert app.calls == ["made", "data", "lost"] and app.lost == [None]
        assert client.closed()


def test_an_exception_from_connection_made_closes_and_is_reported(kind: str, certs: Certs) -> None:
    with contract(kind, certs, made=fail) as (_server, client, apps):
        client.open(b"")
        app = first(apps)
        assert app.gone.wait(5)
        assert app.calls == ["made", "lost"] and isinstance(app.lost[0], AppError)
        assert client.closed()


def test_a_client_reset_is_connection_lost_with_the_error(kind: str, certs: Certs) -> None:
    with contract(kind, certs) as (_server, client, apps):
        client.open(b"data")
        wait_until(lambda: bool(apps) and apps[0].received == b"data")
        reset(client.sock)
        app = apps[0]
        assert app.gone.wait(5)
        assert app.calls == ["made", "data", "lost"] and isinstance(app.lost[0], ConnectionResetError)
