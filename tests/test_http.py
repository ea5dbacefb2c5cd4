"""The stats endpoint's HTTP handling: parsing by feeding bytes (no IO), then over real sockets."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from clients import connect, recv_until_eof

from pollserve.http import MAX_HEAD, BadRequest, HTTPEndpoint, find_head_end, parse_head
from pollserve.loop import EventLoop
from pollserve.server import Server


class RecordingTransport:
    """Collects what the protocol writes: the protocol is IO-free, so this is all it talks to."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.eof = False
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.eof, "write after write_eof"
        self.written += data

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def feed(*chunks: bytes, routes=None) -> tuple[HTTPEndpoint, RecordingTransport]:
    endpoint = HTTPEndpoint(routes or {"/stats": lambda: ("application/json", b'{"ok": 1}')})
    transport = RecordingTransport()
    endpoint.connection_made(transport)
    for chunk in chunks:
        endpoint.data_received(chunk)
    return endpoint, transport


def status_of(transport: RecordingTransport) -> int:
    return int(bytes(transport.written).split(b" ", 2)[1])


class TestParsing:
    def test_request_line_and_headers(self) -> None:
        request = parse_head(b"GET /stats?x=1 HTTP/1.1\r\nHost: a\r\nAccept:  */*  \r\n\r\n")
        assert (request.method, request.target, request.path, request.version) == (
            "GET",
            "/stats?x=1",
            "/stats",
            "HTTP/1.1",
        )
        assert request.headers == {"host": "a", "accept": "*/*"}

    @pytest.mark.parametrize(
        "head",
        [
            b"GET /stats\r\n\r\n",
            b"GET  /stats HTTP/1.1\r\n\r\n",
            b"GET stats HTTP/1.1\r\n\r\n",
            b"GET /stats HTTP/2.0\r\n\r\n",
            b"G(T /stats HTTP/1.1\r\n\r\n",
            b"GET /st\x01ats HTTP/1.1\r\n\r\n",
            b"GET /stats HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET /stats HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS ClientHello
        ],
    )
    def test_malformed_heads(self, head: bytes) -> None:
        with pytest.raises(BadRequest):
            parse_head(head)

    def test_head_end(self) -> None:
        assert find_head_end(b"GET / HTTP/1.1\r\n\r\nbody") == 18
        assert find_head_end(b"GET / HTTP/1.1\n\n") == 16
        assert find_head_end(b"GET / HTTP/1.1\r\n") == -1


class TestEndpointProtocol:
    def test_request_in_pieces(self) -> None:
        _, transport = feed(b"GE", b"T /stats HT", b"TP/1.1\r\nHost: x\r", b"\n\r\n")
        reply = bytes(transport.written)
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Type: application/json\r\n" in reply and b"Content-Length: 9\r\n" in reply
        assert reply.endswith(b'\r\n\r\n{"ok": 1}') and transport.eof

    def test_head_request_has_no_body(self) -> None:
        _, transport = feed(b"HEAD /stats HTTP/1.1\r\n\r\n")
        assert status_of(transport) == 200 and bytes(transport.written).endswith(b"\r\n\r\n")

    def test_unknown_path_404_and_wrong_method_405(self) -> None:
        assert status_of(feed(b"GET /nope HTTP/1.1\r\n\r\n")[1]) == 404
        _, transport = feed(b"POST /stats HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert status_of(transport) == 405 and b"Allow: GET, HEAD\r\n" in transport.written

    def test_oversized_head_is_400(self) -> None:
        _, transport = feed(b"GET /" + b"a" * MAX_HEAD)
        assert status_of(transport) == 400 and transport.eof

    def test_one_response_only(self) -> None:
        endpoint, transport = feed(b"GET /stats HTTP/1.1\r\n\r\nGET /stats HTTP/1.1\r\n\r\n")
        endpoint.data_received(b"GET /stats HTTP/1.1\r\n\r\n")
        assert bytes(transport.written).count(b"HTTP/1.1 200") == 1

    def test_endless_body_after_the_response_is_aborted(self) -> None:
        endpoint, transport = feed(b"GET /stats HTTP/1.1\r\n\r\n")
        for _ in range(20):
            endpoint.data_received(b"x" * 65536)
        assert transport.aborted

    def test_incomplete_request_then_eof_is_400(self) -> None:
        endpoint, transport = feed(b"GET /stats HTTP/1.1\r\n")
        assert endpoint.eof_received() is None
        assert status_of(transport) == 400

    def test_route_runs_per_request(self) -> None:
        calls = []
        routes = {"/stats": lambda: (calls.append(1), ("text/plain", b"n"))[1]}
        for _ in range(3):
            feed(b"GET /stats HTTP/1.0\r\n\r\n", routes=routes)
        assert len(calls) == 3


class TestOverSockets:
    @pytest.fixture
    def endpoint_address(self, backend_name: str):
        loop = EventLoop(backend_name)
        routes = {"/stats": lambda: ("application/json", b"{}")}
        server = Server(loop, lambda: HTTPEndpoint(routes, loop.call_later, idle_timeout=0.3), "127.0.0.1", 0)
        server.start()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        yield server.address
        loop.call_soon_threadsafe(lambda: (server.close(), loop.stop()))
        thread.join(10)
        loop.close()

    def test_silent_client_gets_408_then_close(self, endpoint_address) -> None:
        with connect(endpoint_address) as sock:
            started = time.monotonic()
            reply = recv_until_eof(sock)
        assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert time.monotonic() - started < 5

    def test_large_garbage_still_sees_its_400(self, endpoint_address) -> None:
        """write_eof + reading on: the answer is not destroyed by a reset (lingering close)."""
        with connect(endpoint_address) as sock:
            sock.sendall(b"X" * 200_000 + b"\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock).startswith(b"HTTP/1.1 400 Bad Request\r\n")

    def test_client_keeps_connection_open_after_reply(self, endpoint_address) -> None:
        with connect(endpoint_address) as sock:
            sock.sendall(b"GET /stats HTTP/1.1\r\n\r\n")
            reply = recv_until_eof(sock)  # the server half-closes after the response
            assert reply.endswith(b"\r\n\r\n{}")
