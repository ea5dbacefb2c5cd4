"""The stats endpoint's HTTP handling: parsing by feeding bytes (no IO), then over real sockets."""

from __future__ import annotations

import socket
import time

import pytest
from clients import connect, recv_until_eof
from inprocess import in_loop, serving, wait_until
from transports import RecordingTransport

from pollserve.http import (
    MAX_HEAD,
    MAX_REQUEST_LINE,
    BadRequest,
    Budgeted,
    HTTPEndpoint,
    Slots,
    find_head_end,
    parse_head,
)
from pollserve.loop import EventLoop
from pollserve.rates import RateLimit
from pollserve.server import Server


class Timer:
    def cancel(self) -> None:
        pass


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

    def test_head_end_after_bare_lf_lines_and_a_crlf_blank_line(self) -> None:
        """RFC 9112 section 2.2: a recipient MAY recognize a single LF as a line terminator."""
        assert find_head_end(b"GET / HTTP/1.1\nHost: a\n\r\nbody") == 25
        assert find_head_end(b"GET / HTTP/1.1\r\nHost: a\n\r\n") == 26
        assert find_head_end(b"GET / HTTP/1.1\nHost: a\n\r") == -1


class TestEndpointProtocol:
    def test_request_in_pieces(self) -> None:
        _, transport = feed(b"GE", b"T /stats HT", b"TP/1.1\r\nHost: x\r", b"\n\r\n")
        reply = bytes(transport.written)
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Type: application/json\r\n" in reply and b"Content-Length: 9\r\n" in reply
        assert reply.endswith(b'\r\n\r\n{"ok": 1}') and transport.closed

    def test_head_request_has_no_body(self) -> None:
        _, transport = feed(b"HEAD /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(transport) == 200 and bytes(transport.written).endswith(b"\r\n\r\n")

    def test_unknown_path_404_and_wrong_method_405(self) -> None:
        assert status_of(feed(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")[1]) == 404
        _, transport = feed(b"POST /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert status_of(transport) == 405 and b"Allow: GET, HEAD\r\n" in transport.written

    def test_over_long_target_is_414_before_the_line_ends(self) -> None:
        """Answered as soon as the limit is passed, not after MAX_HEAD bytes or a timeout."""
        _, transport = feed(b"GET /" + b"a" * MAX_REQUEST_LINE)
        assert status_of(transport) == 414 and transport.closed
        _, transport = feed(b"GET /" + b"a" * (MAX_REQUEST_LINE - 100), b"a" * 200 + b" HTTP/1.1\r\n\r\n")
        assert status_of(transport) == 414

    def test_target_just_within_the_limit_is_served(self) -> None:
        line = b"GET /stats?" + b"a" * (MAX_REQUEST_LINE - len(b"GET /stats? HTTP/1.1\r")) + b" HTTP/1.1\r\n"
        assert len(line) == MAX_REQUEST_LINE + 1  # the LF is past the limit, the line itself is not
        assert status_of(feed(line + b"Host: x\r\n\r\n")[1]) == 200

    def test_long_line_that_is_no_request_is_400(self) -> None:
        for raw in (b"X" * (MAX_REQUEST_LINE + 1), b"GET /a HTTP/1.1" + b"x" * MAX_REQUEST_LINE, b"GET " + b"x" * 3000):
            assert status_of(feed(raw)[1]) == 400, raw[:20]

    @pytest.mark.parametrize(
        "fields",
        [
            b"X-Big: " + b"a" * MAX_HEAD + b"\r\n",  # one field too large
            b"".join(b"X-%d: %s\r\n" % (index, b"a" * 100) for index in range(100)),  # too many together
        ],
    )
    def test_oversized_header_fields_are_431(self, fields: bytes) -> None:
        _, transport = feed(b"GET /stats HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        assert status_of(transport) == 431 and transport.closed
        _, transport = feed(b"GET /stats HTTP/1.1\r\nHost: x\r\n" + fields)  # the head has not even ended
        assert status_of(transport) == 431

    def test_one_response_only(self) -> None:
        endpoint, transport = feed(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\nGET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        endpoint.data_received(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        assert bytes(transport.written).count(b"HTTP/1.1 200") == 1

    def test_bytes_after_the_response_are_ignored(self) -> None:
        """The transport's lingering close reads and drops them; the endpoint is done."""
        endpoint, transport = feed(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(20):
            endpoint.data_received(b"x" * 65536)
        assert bytes(transport.written).count(b"HTTP/1.1") == 1 and transport.closed

    def test_incomplete_request_then_eof_is_400(self) -> None:
        endpoint, transport = feed(b"GET /stats HTTP/1.1\r\n")
        assert endpoint.eof_received() is None
        assert status_of(transport) == 400

    @pytest.mark.parametrize("blank", [b"\r\n", b"\n", b" \t", b"\r\n\r\n"])
    def test_only_blank_bytes_then_eof_is_400(self, blank: bytes) -> None:
        endpoint, transport = feed(blank)
        endpoint.eof_received()
        assert status_of(transport) == 400

    def test_nothing_sent_then_eof_is_a_plain_close(self) -> None:
        endpoint, transport = feed()
        endpoint.eof_received()
        assert bytes(transport.written) == b""

    def test_mixed_line_ends_are_answered(self) -> None:
        _, transport = feed(b"GET /stats HTTP/1.1\nHost: x\n", b"\r\n")
        assert status_of(transport) == 200

    @pytest.mark.parametrize(
        ("request_head", "status"),
        [
            (b"HEAD /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
            (b"HEAD /stats HTTP/1.1\r\nno colon\r\n\r\n", 400),
            (b"HEAD /" + b"a" * MAX_HEAD, 414),
            (b"HEAD /stats HTTP/1.1\r\nHost: x\r\nX: " + b"a" * MAX_HEAD, 431),
            (b"HEAD /stats HTTP/1.1\r\n\r\n", 400),
        ],
    )
    def test_head_gets_no_body_whatever_the_status(self, request_head: bytes, status: int) -> None:
        """RFC 9110 section 9.3.2: the server MUST NOT send content in the response to HEAD."""
        _, transport = feed(request_head)
        head, _, body = bytes(transport.written).partition(b"\r\n\r\n")
        assert status_of(transport) == status
        assert body == b"" and b"Content-Length: 0\r\n" not in head

    def test_head_timing_out_gets_a_408_without_body(self) -> None:
        timers = []
        endpoint = HTTPEndpoint({}, lambda delay, callback: timers.append(callback) or Timer())
        transport = RecordingTransport()
        endpoint.connection_made(transport)
        endpoint.data_received(b"HEAD /stats HTTP/1.1\r\nHost: x\r\n")
        timers[0]()
        assert status_of(transport) == 408
        assert bytes(transport.written).endswith(b"\r\n\r\n")

    def test_route_runs_per_request(self) -> None:
        calls = []
        routes = {"/stats": lambda: (calls.append(1), ("text/plain", b"n"))[1]}
        for _ in range(3):
            feed(b"GET /stats HTTP/1.0\r\n\r\n", routes=routes)
        assert len(calls) == 3


class TestHost:
    """RFC 9112, section 3.2: a 400 to an HTTP/1.1 request without Host, and to any request with two
    Host field lines or an invalid Host value.  A proxy and this server could read different ones."""

    @pytest.mark.parametrize(
        "head",
        [
            b"GET /stats HTTP/1.1\r\n\r\n",
            b"GET /stats HTTP/1.1\r\nAccept: */*\r\n\r\n",
            b"GET /stats HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
            b"GET /stats HTTP/1.1\r\nhost: a\r\nHOST: b\r\n\r\n",
            b"GET /stats HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET /stats HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"GET /stats HTTP/1.1\r\nHost: a/b\r\n\r\n",
            b"GET /stats HTTP/1.1\r\nHost: user@a\r\n\r\n",
            b"GET /stats HTTP/1.1\r\nHost: a:80x\r\n\r\n",
        ],
    )
    def test_missing_repeated_or_invalid_host_is_400(self, head: bytes) -> None:
        with pytest.raises(BadRequest):
            parse_head(head)
        _, transport = feed(head)
        assert status_of(transport) == 400 and transport.closed

    @pytest.mark.parametrize(
        "head",
        [
            b"GET /stats HTTP/1.0\r\n\r\n",  # HTTP/1.0 needs none (HAProxy's plain httpchk sends none)
            b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1:9100\r\n\r\n",
            b"GET /stats HTTP/1.1\r\nHost: [::1]:9100\r\n\r\n",
            b"GET /stats HTTP/1.1\r\nHost: localhost\r\n\r\n",
            b"GET /stats HTTP/1.1\r\nHost:\r\n\r\n",  # empty is allowed (RFC 9110, section 7.2)
        ],
    )
    def test_one_valid_host_or_none_in_http_1_0_is_served(self, head: bytes) -> None:
        assert status_of(feed(head)[1]) == 200


ROUTES = {path: (lambda: ("text/plain", b"x")) for path in ("/stats", "/metrics", "/healthz")}


def request(endpoint_kwargs: dict, path: str) -> int:
    _, transport = feed_endpoint(HTTPEndpoint(ROUTES, **endpoint_kwargs), f"GET {path} HTTP/1.0\r\n\r\n".encode())
    return status_of(transport)


def feed_endpoint(endpoint: HTTPEndpoint, *chunks: bytes) -> tuple[HTTPEndpoint, RecordingTransport]:
    transport = RecordingTransport()
    endpoint.connection_made(transport)
    for chunk in chunks:
        endpoint.data_received(chunk)
    return endpoint, transport


class TestRateBudgets:
    def test_a_path_with_its_own_budget_is_not_refused_by_a_flood_of_others(self) -> None:
        shared, health = RateLimit(rate=1e-6, burst=2), RateLimit(rate=1e-6, burst=2)
        kwargs = {"rate_limit": shared, "own_limits": {"/healthz": health}}
        assert [request(kwargs, "/metrics") for _ in range(4)] == [200, 200, 429, 429]
        assert request(kwargs, "/stats") == 429  # /stats and /metrics share one budget
        assert [request(kwargs, "/healthz") for _ in range(3)] == [200, 200, 429]  # bounded too
        assert (shared.refused, health.refused) == (3, 1)

    def test_refusal_is_429_with_retry_after(self) -> None:
        _, transport = feed_endpoint(
            HTTPEndpoint(ROUTES, rate_limit=RateLimit(rate=1e-6, burst=0)), b"GET /stats HTTP/1.0\r\n\r\n"
        )
        assert bytes(transport.written).startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
        assert b"\r\nRetry-After: 1\r\n" in transport.written


class TestBudgeted:
    @staticmethod
    def counting_route():
        renders = []

        def route() -> tuple[str, bytes]:
            renders.append(None)
            return "text/plain", f"render {len(renders)}".encode()

        return route

    def test_fresh_while_the_budget_lasts_then_the_last_render_is_shared(self) -> None:
        route = Budgeted(self.counting_route(), RateLimit(rate=1e-6, burst=2), max_age=3600)
        assert [route()[1] for _ in range(4)] == [b"render 1", b"render 2", b"render 2", b"render 2"]
        assert (route.rendered, route.shared) == (2, 2)

    def test_a_render_older_than_max_age_is_not_shared(self) -> None:
        route = Budgeted(self.counting_route(), RateLimit(rate=1e-6, burst=0), max_age=0.0)
        assert [route()[1] for _ in range(3)] == [b"render 1", b"render 2", b"render 3"]

    def test_a_path_whose_route_bounds_itself_is_never_refused(self) -> None:
        """An own limit of None: the endpoint's budget does not refuse the path; other paths
        still get 429 once the budget is spent, by them or by the path's renders."""
        budget = RateLimit(rate=1e-6, burst=1)
        routes = {**ROUTES, "/stats": Budgeted(self.counting_route(), budget, max_age=3600)}
        kwargs = {"rate_limit": budget, "own_limits": {"/stats": None}}

        def get(path: str) -> int:
            return status_of(feed_endpoint(HTTPEndpoint(routes, **kwargs), f"GET {path} HTTP/1.0\r\n\r\n".encode())[1])

        assert [get("/stats"), get("/stats"), get("/metrics")] == [200, 200, 429]
        assert (routes["/stats"].rendered, routes["/stats"].shared) == (1, 1)


class TestSlots:
    def open(self, slots: Slots, *chunks: bytes) -> tuple[HTTPEndpoint, RecordingTransport]:
        return feed_endpoint(HTTPEndpoint(ROUTES, slots=slots), *chunks)

    def test_a_newcomer_closes_the_oldest_silent_connection_with_a_408(self) -> None:
        slots = Slots(3)
        held = [self.open(slots, b"G") for _ in range(3)]
        _, newcomer = self.open(slots, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert status_of(newcomer) == 200
        first = held[0][1]
        assert first.aborted and status_of(first) == 408  # told why, then closed without lingering
        assert not any(transport.closed for _, transport in held[1:])
        assert (len(slots), slots.evicted) == (3, 1)

    def test_answered_connections_whose_response_is_out_go_first_then_silent_then_flushing(self) -> None:
        slots = Slots(3)
        _, flushing = self.open(slots, b"GET /stats HTTP/1.0\r\n\r\n")
        flushing.unflushed = 1000  # a client that does not read
        _, silent = self.open(slots, b"GET /st")
        _, lingering = self.open(slots, b"GET /stats HTTP/1.0\r\n\r\n")
        for expected in (lingering, silent, flushing):
            written = bytes(expected.written)
            _, newcomer = self.open(slots, b"GET /stats HTTP/1.0\r\n\r\n")
            newcomer.unflushed = 1000  # not a victim before the older ones of its kind
            assert expected.aborted
            assert expected.written == written if expected is not silent else status_of(expected) == 408

    def test_a_connection_gone_by_itself_frees_its_slot(self) -> None:
        slots = Slots(2)
        endpoint, _ = self.open(slots, b"G")
        _, other = self.open(slots, b"G")
        endpoint.connection_lost(None)
        self.open(slots)
        assert not other.closed and slots.evicted == 0 and len(slots) == 2


class TestOverSockets:
    @pytest.fixture
    def endpoint(self, backend_name: str):
        routes = {"/stats": lambda: ("application/json", b"{}")}
        loop = EventLoop(backend_name)
        with serving(
            backend_name, lambda: HTTPEndpoint(routes, loop.call_later, idle_timeout=0.3), loop=loop
        ) as server:
            yield server

    @pytest.fixture
    def endpoint_address(self, endpoint: Server):
        return endpoint.address

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

    def test_head_404_over_a_socket_has_no_body(self, endpoint_address) -> None:
        with connect(endpoint_address) as sock:
            sock.sendall(b"HEAD /nope HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = recv_until_eof(sock)
        assert reply.startswith(b"HTTP/1.1 404 Not Found\r\n") and reply.endswith(b"\r\n\r\n")

    @pytest.mark.parametrize(
        ("request_head", "status"),
        [(b"HEAD /stats HTTP/1.1\r\nno colon\r\n\r\n", 400), (b"HEAD /stats HTTP/1.1\r\nX: slow", 408)],
    )
    def test_head_400_and_408_over_a_socket_have_no_body(self, endpoint_address, request_head, status) -> None:
        with connect(endpoint_address) as sock:
            sock.sendall(request_head)
            sock.settimeout(10)
            reply = recv_until_eof(sock)
        assert reply.startswith(f"HTTP/1.1 {status} ".encode()) and reply.endswith(b"\r\n\r\n"), reply
        assert b"Content-Length: " in reply and not reply.endswith(b"\r\n\r\n\r\n")

    def test_bare_lf_lines_then_a_crlf_blank_line_are_answered_at_once(self, endpoint_address) -> None:
        """Answered when the head ends, not after the 0.3 s request timeout with a 408."""
        with connect(endpoint_address) as sock:
            sock.sendall(b"GET /stats HTTP/1.1\nHost: x\n\r\n")
            sock.settimeout(10)
            reply = recv_until_eof(sock)
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"{}"), reply

    def test_408_lingers_for_a_client_still_sending(self, endpoint: Server) -> None:
        """The 408 is followed by a half-close and reads until the client's EOF, so what the client
        sends meanwhile cannot make the kernel reset the connection and destroy the 408."""
        with connect(endpoint.address) as sock:
            sock.sendall(b"GET /stats HTTP/1.1\r\nX-Slow: ")
            sock.settimeout(10)
            reply = recv_until_eof(sock)  # the 408 and the server's FIN
            assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
            for _ in range(5):  # still sending: the server reads and drops it
                sock.sendall(b"a" * 1000)
            assert in_loop(endpoint, lambda: len(endpoint.connections)) == 1
            sock.shutdown(socket.SHUT_WR)
            wait_until(lambda: endpoint.connections_closed == 1)

    def test_client_keeps_connection_open_after_reply(self, endpoint_address) -> None:
        with connect(endpoint_address) as sock:
            sock.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = recv_until_eof(sock)  # the server half-closes after the response
            assert reply.endswith(b"\r\n\r\n{}")

    @pytest.mark.parametrize(
        ("request_head", "status"),
        [
            (b"GET /stats HTTP/1.1\r\n\r\n", 400),
            (b"GET /stats HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            (b"GET /stats HTTP/1.0\r\n\r\n", 200),
            (b"GET /" + b"a" * 8192 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
            (b"GET /stats HTTP/1.1\r\nHost: a\r\nCookie: " + b"a" * 9000 + b"\r\n\r\n", 431),
        ],
    )
    def test_host_and_size_limits_over_a_socket(self, endpoint_address, request_head, status) -> None:
        """The whole request is sent before the answer is read, as a client does; the answer still
        arrives whole (the lingering close reads what follows the limit and drops it)."""
        with connect(endpoint_address) as sock:
            sock.settimeout(10)
            sock.sendall(request_head)
            sock.shutdown(socket.SHUT_WR)
            reply = recv_until_eof(sock)
        assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:80]

    def test_a_429_closes_at_once_without_lingering(self, backend_name: str) -> None:
        """A refusal is what a flood gets: the connection is gone once the answer is sent, even
        while the client keeps its side open (a lingering close would wait for its FIN)."""
        loop = EventLoop(backend_name)
        refusing = RateLimit(rate=1e-6, burst=0)
        with (
            serving(
                backend_name,
                lambda: HTTPEndpoint(ROUTES, loop.call_later, rate_limit=refusing),
                loop=loop,
                linger_timeout=30,
            ) as server,
            connect(server.address) as sock,
        ):
            sock.settimeout(10)
            sock.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = recv_until_eof(sock)
            assert reply.startswith(b"HTTP/1.1 429 Too Many Requests\r\n") and reply.endswith(
                b"too many requests; try again in a second\n"
            )
            wait_until(lambda: in_loop(server, lambda: len(server.connections)) == 0)
            assert server.connections_closed == 1
