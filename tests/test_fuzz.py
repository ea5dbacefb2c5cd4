"""Property-based tests (hypothesis): random traffic over real sockets, random bytes into the parser.

- echo: several concurrent connections, each sending random chunks with random pauses, then
  hanging up one way or another (half-close, close, reset); each gets back exactly the bytes it
  sent before hanging up, in order, on every available backend.
- HTTP: any byte sequence fed to the parser raises nothing but BadRequest, and the endpoint
  answers any of them with one well-formed response.
- The stats endpoint's slots: a model-based test of which connection is closed to make room.
- Its render budget (http.Budgeted): a model-based test of when an answer is rendered or shared.
- TLS: any bytes, and ClientHellos damaged anywhere, cut anywhere, into the reader the TLS layer
  reads ClientHellos with (it raises only its own errors, holds at most its bound, and reads the
  same however the bytes are cut), and into a TLS server over sockets (it answers each with an
  alert or a ServerHello, logs no traceback, and goes on serving); and a model-based test of
  clients sending their first flight in pieces, interleaved, or leaving before it is whole.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from clients import connect, recv_exactly, recv_until_eof, reset  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402
from inprocess import in_loop, serving, wait_until  # noqa: E402
from tlshelpers import (  # noqa: E402
    FFDHE2048,
    FFDHE8192,
    HANDSHAKE_FAILURE,
    NO_APPLICATION_PROTOCOL,
    SECP256R1,
    X25519,
    BIOClient,
    Certs,
    client_hello,
    handshake_message,
    make_certs,
    records,
    recv_plain,
    tls_connect,
    tls_serving,
)
from transports import RecordingTransport  # noqa: E402

from pollserve.apps import Echo  # noqa: E402
from pollserve.clienthello import MAX_HELLO_BYTES, ClientHello, ClientHelloReader, HelloError, MalformedHello  # noqa: E402
from pollserve.http import BadRequest, Budgeted, HTTPEndpoint, Slots, find_head_end, parse_head  # noqa: E402
from pollserve.rates import RateLimit  # noqa: E402
from pollserve.tls import check_client_hello  # noqa: E402

#: how a client hangs up: after reading all its echo (half-close, close, reset), or by a reset
#: while the server may still be writing to it ("reset-early", which expects nothing back)
ENDINGS = ("half-close", "close", "reset", "reset-early")

script = st.fixed_dictionaries(
    {
        "chunks": st.lists(st.binary(min_size=1, max_size=16384), min_size=0, max_size=16),
        "pauses": st.lists(st.sampled_from([0, 0, 0, 0.001, 0.01]), min_size=16, max_size=16),
        "ending": st.sampled_from(ENDINGS),
    }
)


def reset_early(address: tuple[str, int], chunks: list[bytes]) -> None:
    """A client that sends what the kernel takes without blocking, never reads, and resets.

    No reader thread here: a socket closed while another thread is blocked in recv() on it
    stays open in the kernel until that call returns, so the reset would not be sent.
    """
    with connect(address, timeout=30) as sock:
        sock.setblocking(False)
        for data in chunks:
            try:
                sock.sendall(data)
            except BlockingIOError:
                break
        reset(sock)


def run_script(address: tuple[str, int], plan: dict, errors: list[str]) -> None:
    """One client: stream the chunks while a reader drains the echo, then hang up as planned."""
    if plan["ending"] == "reset-early":
        reset_early(address, plan["chunks"])
        return
    payload = b"".join(plan["chunks"])
    with connect(address, timeout=30) as sock:
        got = bytearray()
        done = threading.Event()

        def read() -> None:
            try:
                while len(got) < len(payload) or plan["ending"] == "half-close":
                    data = sock.recv(65536)
                    if not data:
                        break
                    got.extend(data)
            except OSError as exc:
                errors.append(f"recv: {exc!r} after {len(got)} of {len(payload)} bytes")
            finally:
                done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            for index, data in enumerate(plan["chunks"]):
                sock.sendall(data)
                if plan["pauses"][index]:
                    time.sleep(plan["pauses"][index])
            if plan["ending"] == "half-close":
                sock.shutdown(socket.SHUT_WR)  # the reader goes on to the server's EOF
            if not done.wait(30):
                errors.append(f"stuck after {len(got)} of {len(payload)} bytes")
                return
            if bytes(got) != payload:
                errors.append(f"echo differs: {len(got)} bytes back of {len(payload)} sent")
            if plan["ending"] == "reset":
                reset(sock)
        except OSError as exc:
            errors.append(f"send: {exc!r}")


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plans=st.lists(script, min_size=1, max_size=5))
def test_echo_returns_exactly_what_each_client_sent(backend_name: str, plans: list[dict]) -> None:
    with serving(backend_name, Echo) as server:
        errors: list[str] = []
        threads = [threading.Thread(target=run_script, args=(server.address, plan, errors)) for plan in plans]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads), "a client hung"
        assert errors == []
        wait_until(lambda: in_loop(server, lambda: len(server.connections)) == 0)
        exact = [plan for plan in plans if plan["ending"] != "reset-early"]
        total = sum(len(data) for plan in exact for data in plan["chunks"])
        bytes_in, bytes_out = in_loop(server, lambda: (server.bytes_in, server.bytes_out))
        assert bytes_out >= total and bytes_in >= total
        with connect(server.address) as sock:  # still serving
            sock.sendall(b"after")
            assert recv_exactly(sock, 5) == b"after"


def check_parser_on(data: bytes) -> None:
    """The parser raises nothing but BadRequest, and what it accepts is clean: no control byte (a
    bare CR above all) made it into a header value."""
    end = find_head_end(data)
    try:
        request = parse_head(data if end < 0 else data[:end])
    except BadRequest:
        return
    assert request.target.startswith("/") and request.version in ("HTTP/1.0", "HTTP/1.1")
    for name, value in request.headers.items():
        assert re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9a-z]+", name), name
        assert not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value), value


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000))
def test_parser_raises_only_bad_request(data: bytes) -> None:
    check_parser_on(data)


# Random bytes rarely form a request line, so they hardly reach the header checks.  These heads are
# well formed, then mutated: a byte of any value inserted or replaced anywhere, or a line end swapped.
_NASTY = st.sampled_from([b"\r", b"\n", b"\x00", b"\xff", b" ", b"\t", b":", b"\x7f", b"\r\n", b"\x1b"])
_head_parts = st.fixed_dictionaries(
    {
        "method": st.sampled_from([b"GET", b"HEAD", b"POST", b"G\xc3\x89T"]),
        "target": st.sampled_from([b"/stats", b"/metrics", b"/", b"/stats?x=1", b"/\xff", b"*"]),
        "version": st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1"]),
        "headers": st.lists(
            st.tuples(st.sampled_from([b"Host", b"X-A", b"Accept", b" Folded"]), st.binary(max_size=20)),
            max_size=4,
        ),
        "line_end": st.sampled_from([b"\r\n", b"\n"]),
    }
)


@st.composite
def near_valid_heads(draw) -> bytes:
    parts = draw(_head_parts)
    end = parts["line_end"]
    lines = [b" ".join((parts["method"], parts["target"], parts["version"]))]
    lines += [name + b": " + value for name, value in parts["headers"]]
    head = bytearray(end.join(lines) + end + end)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(head)))
        if draw(st.booleans()) and at < len(head):
            head[at : at + 1] = draw(_NASTY)
        else:
            head[at:at] = draw(_NASTY)
    return bytes(head)


@settings(max_examples=1000, deadline=None)
@given(near_valid_heads())
def test_parser_on_near_valid_heads_raises_only_bad_request(data: bytes) -> None:
    check_parser_on(data)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.lists(st.binary(min_size=1, max_size=600), min_size=1, max_size=20),
        near_valid_heads().map(lambda head: [head[: len(head) // 2], head[len(head) // 2 :]]),
    ),
    st.booleans(),
)
def test_endpoint_answers_any_bytes_with_one_well_formed_response(chunks: list[bytes], eof: bool) -> None:
    written = bytearray()

    class Transport:
        closed = False

        def write(self, data: bytes) -> None:
            assert not self.closed
            written.extend(data)

        def close(self) -> None:
            self.closed = True

    endpoint = HTTPEndpoint({"/stats": lambda: ("application/json", b"{}")})
    transport = Transport()
    endpoint.connection_made(transport)
    for data in chunks:
        endpoint.data_received(data)
    if eof:
        endpoint.eof_received()
    if not written:  # an incomplete head: the request timeout (408) or the EOF answers it
        assert not transport.closed
        assert not eof  # every byte sent before EOF gets an answer
        return
    assert transport.closed
    head, sep, body = bytes(written).partition(b"\r\n\r\n")
    assert sep, written
    lines = head.split(b"\r\n")
    assert re.fullmatch(rb"HTTP/1\.1 (200|4\d\d|503) [A-Za-z ]+", lines[0]), lines[0]
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert int(headers[b"Content-Length"]) >= len(body)
    if not b"".join(chunks).startswith(b"HEAD "):
        assert int(headers[b"Content-Length"]) == len(body)


# -- the stats endpoint's slots: a model of which connection makes room ------------------------------


class SlotsMachine(RuleBasedStateMachine):
    """Connections arrive, send part of a request or all of it, stop reading, go away, in any
    order.  Invariant: the endpoint holds at most `size` of them, exactly the live ones; a
    newcomer at the cap closes exactly the one the model names -- the oldest answered one whose
    response is out, else the oldest that has not sent a whole request (with a 408), else the
    oldest still flushing -- and nobody else."""

    SIZE = 4

    def __init__(self) -> None:
        super().__init__()
        self.slots = Slots(self.SIZE)
        self.routes = {"/healthz": lambda: ("text/plain", b"ok\n")}
        #: live connections, oldest first: [endpoint, transport]
        self.live: list[tuple[HTTPEndpoint, RecordingTransport]] = []

    def expected_victim(self) -> tuple[HTTPEndpoint, RecordingTransport]:
        for kind in (
            lambda e, t: e.answered and not t.unflushed,
            lambda e, t: not e.answered,
            lambda e, t: True,
        ):
            for pair in self.live:
                if kind(*pair):
                    return pair
        raise AssertionError("nothing to evict")

    @rule()
    def connect(self) -> None:
        victim = self.expected_victim() if len(self.live) >= self.SIZE else None
        was_answered = victim is not None and victim[0].answered
        endpoint = HTTPEndpoint(self.routes, slots=self.slots)
        transport = RecordingTransport()
        endpoint.connection_made(transport)
        if victim is not None:
            assert victim[1].aborted, "the model's victim was not closed"
            if not was_answered:
                assert victim[1].written.startswith(b"HTTP/1.1 408 ")
            self.live.remove(victim)
        self.live.append((endpoint, transport))

    @precondition(lambda self: self.live)
    @rule(index=st.integers(min_value=0), whole=st.booleans())
    def send(self, index: int, whole: bool) -> None:
        endpoint, _ = self.live[index % len(self.live)]
        endpoint.data_received(b"GET /healthz HTTP/1.0\r\n\r\n" if whole else b"GET /hea")

    @precondition(lambda self: any(e.answered for e, _ in self.live))
    @rule(index=st.integers(min_value=0))
    def stop_reading(self, index: int) -> None:
        answered = [pair for pair in self.live if pair[0].answered]
        answered[index % len(answered)][1].unflushed = 1000

    @precondition(lambda self: self.live)
    @rule(index=st.integers(min_value=0))
    def go_away(self, index: int) -> None:
        endpoint, _ = self.live.pop(index % len(self.live))
        endpoint.connection_lost(None)

    @invariant()
    def holds_exactly_the_live_ones(self) -> None:
        assert len(self.slots) == len(self.live) <= self.SIZE
        assert not any(transport.aborted for _, transport in self.live)


TestSlotsMachine = SlotsMachine.TestCase
TestSlotsMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


# -- the stats endpoint's render budget: a model of when an answer is rendered or shared ---------------


class BudgetedMachine(RuleBasedStateMachine):
    """Requests to two pages sharing one budget (as /stats and /metrics do), and to other paths
    that only spend it (the dashboard, a 404), come at any pace on a clock the test moves.
    Invariants: every request to a page is answered; one that finds a token in the bucket
    (modelled here as the spec says: ``rate`` a second, at most ``burst``) gets a fresh render;
    any other gets the page's last render if it is younger than max_age, else a fresh one; so
    renders never exceed the burst and the rate over the time gone by, plus one per page and
    max_age."""

    RATE, BURST, MAX_AGE = 5.0, 3, 1.0
    PAGES = ("/stats", "/metrics")

    def __init__(self) -> None:
        super().__init__()
        self.now = 100.0
        self.started = self.now
        #: when each page rendered
        self.renders: dict[str, list[float]] = {page: [] for page in self.PAGES}
        clock = lambda: self.now  # noqa: E731
        self.budget = RateLimit(self.RATE, self.BURST, clock=clock)
        self.routes = {
            page: Budgeted(self.renderer(page), self.budget, self.MAX_AGE, clock=clock) for page in self.PAGES
        }
        self.tokens = float(self.BURST)
        self.tokens_at = self.now
        self.untokened = 0  # renders made past the budget, because the last one was too old

    def renderer(self, page: str):
        def render() -> tuple[str, bytes]:
            self.renders[page].append(self.now)
            return "text/plain", f"{page} render {len(self.renders[page])}".encode()

        return render

    def take_token(self) -> bool:
        self.tokens = min(self.BURST, self.tokens + (self.now - self.tokens_at) * self.RATE)
        self.tokens_at = self.now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    @rule(seconds=st.sampled_from([0.0, 0.001, 0.05, 0.2, 0.5, 0.999, 1.0, 3.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def another_path_spends_the_budget(self) -> None:
        assert self.budget.take() == self.take_token()

    @rule(page=st.sampled_from(PAGES))
    def request(self, page: str) -> None:
        has_token = self.take_token()
        renders = self.renders[page]
        before = len(renders)
        last_at = renders[-1] if renders else None
        _, body = self.routes[page]()
        if has_token or last_at is None or self.now - last_at >= self.MAX_AGE:
            assert len(renders) == before + 1 and body == f"{page} render {before + 1}".encode(), "a render was due"
            self.untokened += not has_token
        else:
            assert len(renders) == before and body == f"{page} render {before}".encode(), "the last render was due"

    @invariant()
    def renders_are_bounded(self) -> None:
        elapsed = self.now - self.started
        rendered = sum(len(renders) for renders in self.renders.values())
        assert rendered - self.untokened <= self.BURST + self.RATE * elapsed
        assert self.untokened <= len(self.PAGES) * (elapsed / self.MAX_AGE + 1)
        assert sum(route.rendered for route in self.routes.values()) == rendered


TestBudgetedMachine = BudgetedMachine.TestCase
TestBudgetedMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


# -- the ClientHello the TLS layer reads before OpenSSL: any bytes, cut anywhere ---------------------


def feed_all(chunks: list[bytes]) -> tuple[str, object]:
    """Feed the chunks to a reader; the outcome: ("hello", what the TLS layer would judge it by),
    ("more", None), or the HelloError's class name.  Nothing else may come out, and the reader
    holds at most the bound and one chunk."""
    reader = ClientHelloReader()
    for data in chunks:
        try:
            hello = reader.feed(data)
        except HelloError as exc:
            assert len(reader.flight) <= MAX_HELLO_BYTES + len(data)
            return type(exc).__name__, None
        assert len(reader.flight) <= MAX_HELLO_BYTES + len(data)
        if hello is not None:
            return "hello", judged(hello)
    return "more", None


def judged(hello: ClientHello) -> object:
    """What the TLS layer decides by (check_client_hello), or the MalformedHello it met."""
    try:
        tls13 = hello.offers_tls13()
        return tls13, hello.key_exchange_group() if tls13 else None, hello.alpn(), check_client_hello(hello, ALPN_H2)
    except MalformedHello:
        return "MalformedHello"


ALPN_H2 = frozenset({b"h2"})
_GROUPS = st.sampled_from([X25519, SECP256R1, FFDHE2048, FFDHE8192, 0x0A0A, 0x0019])


@st.composite
def first_flights(draw) -> bytes:
    """ClientHellos made by hand with random offers, in random records, then maybe damaged: bytes
    replaced, inserted or cut off anywhere."""
    groups = draw(st.lists(_GROUPS, min_size=1, max_size=4, unique=True))
    shares = draw(st.lists(st.sampled_from(groups), max_size=2, unique=True))
    alpn = draw(st.none() | st.lists(st.sampled_from([b"h2", b"http/1.1", b"x" * 40]), min_size=1, max_size=3))
    message = client_hello(groups=groups, key_shares=shares, alpn=alpn, tls13=draw(st.booleans()))
    flight = bytearray(records(message, draw(st.sampled_from([1, 3, 50, 1 << 14]))))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(flight) - 1))
        kind = draw(st.sampled_from(["replace", "insert", "cut"]))
        if kind == "replace":
            flight[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            flight[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            del flight[at:]
            break
    return bytes(flight)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(point % (len(data) + 1) for point in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(st.binary(max_size=3000), st.binary(max_size=3000).map(lambda tail: b"\x16\x03\x01" + tail)),
    st.lists(st.integers(min_value=0), max_size=20),
)
def test_client_hello_reader_on_any_bytes(data: bytes, points: list[int]) -> None:
    outcome, _ = feed_all(cut(data, points))
    assert outcome in ("hello", "more", "NotAHandshake", "MalformedHello", "HelloTooLarge")


@settings(max_examples=500, deadline=None)
@given(first_flights(), st.lists(st.integers(min_value=0), max_size=12))
def test_client_hello_reader_reads_the_same_however_cut(flight: bytes, points: list[int]) -> None:
    whole = feed_all([flight])
    assert feed_all(cut(flight, points)) == whole
    assert whole[0] in ("hello", "more", "NotAHandshake", "MalformedHello", "HelloTooLarge")


@pytest.fixture(scope="module")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("fuzz-tls"))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(flights=st.lists(st.tuples(first_flights(), st.lists(st.integers(min_value=0), max_size=6)), max_size=4))
def test_a_tls_server_outlives_any_first_flight(
    backend_name: str, tls_certs: Certs, flights: list[tuple[bytes, list[int]]], caplog: pytest.LogCaptureFixture
) -> None:
    """Each client sends a (damaged) ClientHello in chunks and its FIN: it gets an alert, or a
    ServerHello, then the server's EOF; never a traceback, and the server still serves."""
    caplog.clear()
    with (
        caplog.at_level(logging.INFO, logger="pollserve"),
        tls_serving(backend_name, Echo, tls_certs.options(alpn=("h2",))) as (server, _),
    ):
        for flight, points in flights:
            with connect(server.address, timeout=10) as sock:
                for chunk in cut(flight, points):
                    sock.sendall(chunk)
                sock.shutdown(socket.SHUT_WR)
                try:
                    reply = recv_until_eof(sock)
                except ConnectionResetError:
                    reply = b""
                assert reply[:1] in (b"", b"\x15", b"\x16"), reply[:16]
        with tls_connect(server.address, tls_certs.client_context()) as sock:
            sock.sendall(b"alive")
            assert recv_plain(sock, 5) == b"alive"
        wait_until(lambda: in_loop(server, lambda: len(server.connections)) == 0)
    assert not [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# -- the TLS handshake's first state: a model of clients sending their first flight in pieces -------


class FirstFlight:
    """One client of the model: the bytes of its first flight, how many it sent, what it earns."""

    def __init__(self, kind: str, address, certs: Certs, fragment: int) -> None:
        self.kind = kind
        self.sent = 0
        self.bio: BIOClient | None = None
        if kind in ("good", "good-alpn"):
            context = certs.client_context()
            if kind == "good-alpn":
                context.set_alpn_protocols(["h2"])
            self.bio = BIOClient(address, context)
            self.sock = self.bio.sock
            with contextlib.suppress(ssl.SSLWantReadError):
                self.bio.obj.do_handshake()
            self.flight = records(handshake_message(self.bio.outgoing.read()), fragment)
        else:
            self.sock = connect(address, timeout=10)
            self.flight = FLIGHTS[kind](fragment)

    @property
    def whole(self) -> bool:
        return self.sent == len(self.flight)

    def send(self, size: int) -> None:
        chunk = self.flight[self.sent : self.sent + size]
        self.sent += len(chunk)
        with contextlib.suppress(OSError):  # plain text may be refused before its last byte
            self.sock.sendall(chunk)

    def outcome(self) -> str:
        """With the whole flight sent: complete the handshake, or read the refusal to its EOF."""
        if self.bio is not None:
            self.bio.handshake()
            self.bio.write(b"ping")
            assert self.bio.read(4) == b"ping"
            return "served"
        try:
            reply = recv_until_eof(self.sock)
        except ConnectionResetError:
            reply = b""
        return {HANDSHAKE_FAILURE: "handshake_failure", NO_APPLICATION_PROTOCOL: "no_application_protocol"}.get(
            reply, "refused by OpenSSL" if reply[:1] in (b"", b"\x15") else f"{reply[:16]!r}"
        )

    def close(self) -> None:
        self.sock.close()


#: the first flights made by hand, by the size of their records
FLIGHTS = {
    "ffdhe": lambda size: records(client_hello(groups=(FFDHE2048, X25519), key_shares=(FFDHE2048,)), size),
    "alpn-mismatch": lambda size: records(client_hello(alpn=[b"http/1.1"]), size),
    "plain": lambda size: b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
}
EARNS = {
    "good": "served",
    "good-alpn": "served",
    "ffdhe": "handshake_failure",
    "alpn-mismatch": "no_application_protocol",
    "plain": "refused by OpenSSL",
}


KINDS = st.sampled_from(sorted(EARNS))
#: the size of the records a ClientHello is cut into
FRAGMENTS = st.sampled_from([1, 7, 1 << 14])


class FirstFlightMachine(RuleBasedStateMachine):
    """Clients connect and send their first flight (a ClientHello in records of any size, or plain
    text) in pieces of any size, interleaved, or leave before it is whole.  Invariants: a client
    whose flight is whole gets what its offer earns (served; handshake_failure or
    no_application_protocol, alone, then EOF; OpenSSL's refusal of plain text); one that leaves
    after a byte is a failed handshake and one that leaves before any is not; the server's
    counters say exactly that (plain text fails once OpenSSL has read enough of it to tell, which
    is its business: between its first byte and its last); and at the end no connection is left
    and a new client is served."""

    def __init__(self) -> None:
        super().__init__()
        self.stack = contextlib.ExitStack()
        self.certs = make_certs(Path(self.stack.enter_context(tempfile.TemporaryDirectory())))
        backend = os.environ.get("POLLSERVE_BACKEND") or "auto"
        self.server, self.layers = self.stack.enter_context(
            tls_serving(backend, Echo, self.certs.options(alpn=("h2",)))
        )
        self.clients: list[FirstFlight] = []
        self.handshakes = 0
        self.failures = 0

    @initialize(kind=KINDS, fragment=FRAGMENTS)
    def first(self, kind: str, fragment: int) -> None:
        self.connect(kind, fragment)

    # No preconditions: a rule that does not apply does nothing (hypothesis gives up on a step
    # after a few draws of disabled rules).

    @rule(kind=KINDS, fragment=FRAGMENTS)
    def connect(self, kind: str, fragment: int) -> None:
        if len(self.clients) < 4:
            self.clients.append(FirstFlight(kind, self.server.address, self.certs, fragment))

    @rule(index=st.integers(min_value=0), size=st.sampled_from([1, 4, 5, 6, 100, 400, 1 << 20]))
    def send(self, index: int, size: int) -> None:
        if not self.clients:
            return
        client = self.clients[index % len(self.clients)]
        client.send(size)
        if client.whole:
            self.clients.remove(client)
            try:
                outcome = client.outcome()
                event(f"{client.kind}: {outcome}")
                assert outcome == EARNS[client.kind], client.kind
            finally:
                client.close()
            if client.kind.startswith("good"):
                self.handshakes += 1
            else:
                self.failures += 1

    @rule(index=st.integers(min_value=0))
    def leave(self, index: int) -> None:
        if not self.clients:
            return
        client = self.clients.pop(index % len(self.clients))
        client.close()
        if client.sent:
            self.failures += 1

    @invariant()
    def counted(self) -> None:
        started = sum(1 for client in self.clients if client.kind == "plain" and client.sent)
        wait_until(lambda: self.layers.handshakes == self.handshakes, 5)
        wait_until(lambda: self.failures <= self.layers.handshake_failures <= self.failures + started, 5)

    def teardown(self) -> None:
        try:
            for client in self.clients:
                client.close()
            with tls_connect(self.server.address, self.certs.client_context()) as sock:
                sock.sendall(b"after")
                assert recv_plain(sock, 5) == b"after"
            wait_until(lambda: in_loop(self.server, lambda: len(self.server.connections)) == 0)
        finally:
            self.stack.close()


TestFirstFlightMachine = FirstFlightMachine.TestCase
TestFirstFlightMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
