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
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
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
        self.address = address
        self.certs = certs
        self.sock = socket.socket()  # replaced by the connection open() makes
        self.tls: BIOClient | None = None

    def open(self, first: bytes) -> None:
        """Connect, then the layer's part and ``first`` in the same send()."""
        self.sock.close()
        self.sock = connect(self.address, timeout=10)
        if self.kind == "tls":
            self.tls = BIOClient(self.address, self.certs.client_context(), sock=self.sock)
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
        """What the server sent until it closed (close_notify and FIN with TLS); then the client
        closes its side too, which ends the server's lingering close at once."""
        if self.tls is not None:
            data = self.tls.read_to_close_notify()
            self.tls.wait_eof()
        else:
            data = bytearray()
            while chunk := self.sock.recv(65536):
                data += chunk
        with contextlib.suppress(OSError):  # already shut
            self.sock.shutdown(socket.SHUT_WR)
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


def first_app(apps: list[Script]) -> Script:
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
        app = first_app(apps)
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
        app = first_app(apps)
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
        app = first_app(apps)
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
        app = first_app(apps)
        assert app.gone.wait(5)
        assert app.calls == ["made", "data", "lost"] and app.lost == [None]
        assert client.closed()


def test_an_exception_from_connection_made_closes_and_is_reported(kind: str, certs: Certs) -> None:
    with contract(kind, certs, made=fail) as (_server, client, apps):
        client.open(b"")
        app = first_app(apps)
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


class ReadingModel(RuleBasedStateMachine):
    """Random sequences of client sends, app pauses and resumes and the client's EOF, over one
    transport.  Invariants: no data_received between the app's pause_reading() and its
    resume_reading(); the app gets a prefix of what was sent, in order; at the end, all of it,
    then one eof_received()."""

    def __init__(self, kind: str, certs: Certs) -> None:
        super().__init__()
        self.sent = bytearray()
        self.eof_sent = False
        self.start_paused = False
        self.violations: list[str] = []
        self.stack = contextlib.ExitStack()
        self.server, self.client, self.apps = self.stack.enter_context(
            contract(kind, certs, made=self.made, data=self.received)
        )

    @initialize(first=st.binary(max_size=2000), start_paused=st.booleans())
    def connect(self, first: bytes, start_paused: bool) -> None:
        """The layer's part and the first bytes in one segment; the app may pause in connection_made."""
        self.start_paused = start_paused
        self.client.open(first)
        self.sent += first
        self.app = first_app(self.apps)
        wait_until(lambda: "made" in self.app.calls)

    # The app's side, on the loop's thread: the app's own idea of whether it paused.
    def made(self, app: Script) -> None:
        app.paused = self.start_paused  # type: ignore[attr-defined]
        if self.start_paused:
            app.transport.pause_reading()

    def received(self, app: Script, data: bytes) -> None:
        if app.paused:  # type: ignore[attr-defined]
            self.violations.append(f"{len(data)} bytes delivered while paused")

    def set_paused(self, paused: bool) -> None:
        def change() -> None:
            self.app.paused = paused  # type: ignore[attr-defined]
            if paused:
                self.app.transport.pause_reading()
            else:
                self.app.transport.resume_reading()

        in_loop(self.server, change)

    @precondition(lambda self: not self.eof_sent)
    @rule(data=st.binary(min_size=1, max_size=3000))
    def send(self, data: bytes) -> None:
        self.client.send(data)
        self.sent += data

    @rule()
    def pause(self) -> None:
        self.set_paused(True)

    @rule()
    def resume(self) -> None:
        self.set_paused(False)

    @precondition(lambda self: not self.eof_sent)
    @rule()
    def eof(self) -> None:
        self.client.send_eof()
        self.eof_sent = True

    @invariant()
    def nothing_while_paused_and_in_order(self) -> None:
        assert not self.violations
        received = bytes(self.app.received)
        assert bytes(self.sent).startswith(received)

    def teardown(self) -> None:
        try:
            if not self.eof_sent:
                self.client.send_eof()
            with contextlib.suppress(OSError):  # TLS: a FIN after close_notify ends the server's linger
                self.client.sock.shutdown(socket.SHUT_WR)
            self.set_paused(False)
            assert self.app.gone.wait(5), f"no close after the EOF: {self.app.calls[-3:]}"
            assert self.app.received == self.sent
            assert self.app.calls.count("eof") == 1 and self.app.calls[-2:] == ["eof", "lost"]
            assert not self.violations
        finally:
            self.stack.close()


def test_model_of_pauses_resumes_data_and_eof(kind: str, certs: Certs) -> None:
    run_state_machine_as_test(
        lambda: ReadingModel(kind, certs),
        settings=settings(max_examples=25, stateful_step_count=12, deadline=None),
    )
