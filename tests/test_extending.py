"""What users extend works on the build under test as it does on the pure one: apps that are not
pollserve Protocols, loose return values, interpreted subclasses of the classes the compiled build
compiles (EventLoop, Server) and of those it leaves interpreted (Protocol, Backend and its built-ins,
the layers, the HTTP endpoint).  The compiled modules check their annotations at run time, and their
classes refuse interpreted subclasses unless marked otherwise: each case here would show it."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import ClassVar

import pytest
from clients import connect, recv_exactly, recv_until_eof
from inprocess import serving, wait_until
from tlshelpers import HOSTNAME, make_certs

from pollserve import compiled
from pollserve.apps import Echo, Hello, Protocol
from pollserve.backends import get_backend
from pollserve.http import HTTPEndpoint
from pollserve.loop import EventLoop
from pollserve.peers import AsyncioEcho
from pollserve.proxy import ProxiedTransport, ProxyLayer, ProxyLayerFactory
from pollserve.server import Server
from pollserve.tls import ServerTLS, TLSLayer, TLSLayerFactory, TLSOptions


def test_the_build_is_all_or_nothing() -> None:
    """Sanity for the cases below: on the compiled build they run against the compiled classes."""
    assert compiled.build() in ("compiled", "pure Python")
    if compiled.build() == "compiled":
        assert all(compiled.is_compiled(name) for name in compiled.MODULES)


class DuckEcho:
    """An app with the protocol's methods and no pollserve base class (as asyncio allows)."""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self):
        return None

    def connection_lost(self, exc) -> None:
        pass


@pytest.mark.parametrize("factory", [DuckEcho, AsyncioEcho], ids=["duck-typed", "asyncio.Protocol"])
def test_an_app_that_is_not_a_pollserve_protocol(backend_name: str, factory) -> None:
    assert not issubclass(factory, Protocol)
    if factory is AsyncioEcho:
        assert issubclass(factory, asyncio.Protocol)
    with serving(backend_name, factory) as server, connect(server.address) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"


class KeepOpenAfterEof(Protocol):
    """eof_received returns a truthy value that is not a bool: the transport stays open for writes."""

    def __init__(self, keep) -> None:
        self.keep = keep

    def eof_received(self):
        self.transport.write(b"after eof")
        self.transport.get_extra_info("loop").call_later(0.05, self.transport.close)
        return self.keep


@pytest.mark.parametrize("keep", [1, "yes", [0], object()], ids=["int", "str", "list", "object"])
def test_a_truthy_non_bool_from_eof_received_keeps_the_connection_writing(backend_name: str, keep) -> None:
    with serving(backend_name, lambda: KeepOpenAfterEof(keep)) as server, connect(server.address) as sock:
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b"after eof"


def test_a_list_of_hosts(backend_name: str) -> None:
    """(test_server.py has the server listening on each address of a longer list.)"""
    loop = EventLoop(backend_name)
    server = Server(loop, Echo, ["127.0.0.1"], 0)
    with serving(backend_name, Echo, loop=loop, server=server), connect(server.address) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"


class LoudHello(Hello):
    def data_received(self, data: bytes) -> None:
        self.transport.write(b"HELLO ")
        super().data_received(data)


def test_an_interpreted_subclass_of_a_built_in_app(backend_name: str) -> None:
    with serving(backend_name, LoudHello) as server, connect(server.address) as sock:
        sock.sendall(b"hi")
        assert recv_exactly(sock, 18) == b"HELLO Hello world\n"


def counting_backend(name: str):
    """An interpreted subclass of a built-in backend that counts its waits, as
    examples/instrumented_backend does: through ``wait`` (the loop's way in) and ``poll``."""
    base = get_backend(name)

    class Counting(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.waits = 0
            self.wait = self.counted_wait

        def counted_wait(self, timeout):
            self.waits += 1
            return self.poll(timeout)

    return Counting()


def test_an_interpreted_subclass_of_a_built_in_backend_drives_the_loop(backend_name: str) -> None:
    backend = counting_backend(backend_name)
    loop = EventLoop(backend)
    with serving(backend_name, Echo, loop=loop) as server, connect(server.address) as sock:
        for _ in range(3):
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
        assert backend.waits >= 3


class CountingLoop(EventLoop):
    """An interpreted subclass of EventLoop (compiled, it allows interpreted subclasses)."""

    def __init__(self, backend) -> None:
        self.readers_added = 0  # the base's __init__ adds the wakeup socket's reader
        super().__init__(backend)

    def add_reader(self, fd, callback) -> None:
        self.readers_added += 1
        super().add_reader(fd, callback)


class RecordingServer(Server):
    """An interpreted subclass of Server that sees every accepted client."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.served: list = []

    def _serve(self, sock, peername) -> None:
        self.served.append(peername)
        super()._serve(sock, peername)


def test_interpreted_subclasses_of_the_loop_and_the_server(backend_name: str) -> None:
    loop = CountingLoop(backend_name)
    server = RecordingServer(loop, Echo, "127.0.0.1", 0)
    with serving(backend_name, Echo, loop=loop, server=server), connect(server.address) as sock:
        sock.sendall(b"abc")
        assert recv_exactly(sock, 3) == b"abc"
        assert server.served == [sock.getsockname()]
        assert loop.readers_added >= 2  # the wakeup socket, the listener, the client


class NotingTransport(ProxiedTransport):
    """An interpreted subclass of the transport the PROXY layer hands the app, over the same connection."""

    def get_extra_info(self, name: str, default=None):
        return "from the subclass" if name == "note" else super().get_extra_info(name, default)


class NotingProxyLayer(ProxyLayer):
    """An interpreted subclass of the PROXY layer: records each header before stepping aside."""

    headers: ClassVar[list] = []

    def _step_aside(self, header, rest: bytes) -> None:
        NotingProxyLayer.headers.append(header)
        super()._step_aside(header, rest)


class Note(Protocol):
    def connection_made(self, transport) -> None:
        self.transport = NotingTransport(transport._below, transport.get_extra_info("proxy_header"))

    def data_received(self, data: bytes) -> None:
        info = self.transport.get_extra_info
        self.transport.write(f"{info('peername')[0]} {info('note')} {data.decode()}".encode())
        self.transport.close()


def test_interpreted_subclasses_of_the_proxy_layer_and_its_transport(backend_name: str) -> None:
    loop = EventLoop(backend_name)

    class Factory(ProxyLayerFactory):
        def __call__(self) -> Protocol:
            return NotingProxyLayer(self.app_factory(), self)

    factory = Factory(Note, loop)
    NotingProxyLayer.headers = []
    with serving(backend_name, factory, loop=loop) as server, connect(server.address) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 80\r\nhi")
        assert recv_until_eof(sock) == b"192.0.2.1 from the subclass hi"
    assert [header.version for header in NotingProxyLayer.headers] == [1]
    factory.close()


class CountingTLSLayer(TLSLayer):
    """An interpreted subclass of the TLS layer that counts the ciphertext it is given."""

    ciphertext = 0

    def data_received(self, data: bytes) -> None:
        CountingTLSLayer.ciphertext += len(data)
        super().data_received(data)


def test_an_interpreted_subclass_of_the_tls_layer(backend_name: str, tmp_path) -> None:
    certs = make_certs(tmp_path)
    loop = EventLoop(backend_name)

    class Factory(TLSLayerFactory):
        def __call__(self) -> Protocol:
            return CountingTLSLayer(self.app_factory(), self)  # type: ignore[return-value]

    factory = Factory(Echo, loop, ServerTLS.load(TLSOptions(certs.cert_file, certs.key_file)))
    context = ssl.create_default_context(cafile=certs.ca_file)
    CountingTLSLayer.ciphertext = 0
    with serving(backend_name, factory, loop=loop) as server:
        with context.wrap_socket(connect(server.address), server_hostname=HOSTNAME) as tls:
            tls.sendall(b"secret")
            assert recv_exactly(tls, 6) == b"secret"
        wait_until(lambda: CountingTLSLayer.ciphertext > 6)
    factory.close()


class TeapotEndpoint(HTTPEndpoint):
    """An interpreted subclass of the stats endpoint's HTTP protocol that answers one path itself."""

    def data_received(self, data: bytes) -> None:
        if data.startswith(b"GET /teapot "):
            self.transport.write(b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()
            return
        super().data_received(data)


def test_an_interpreted_subclass_of_the_http_endpoint(backend_name: str) -> None:
    routes = {"/ok": lambda: ("text/plain", b"fine")}
    with serving(backend_name, lambda: TeapotEndpoint(routes)) as server:
        for path, status in (("/teapot", b"418"), ("/ok", b"200")):
            with connect(server.address) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                reply = recv_until_eof(sock)
            assert reply.split(b" ")[1] == status, reply
