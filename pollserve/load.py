"""The load client of ``pollserve bench`` and of the benchmarks in ``benchmarks/``: one implementation.

A load is ``connections`` connections to a server, each with at most one request in flight, plus
``idle`` connections opened first and never used.  Without a ``rate`` it is a closed loop: a
connection sends its next request as soon as the whole reply arrived, so the client's speed bounds
the figure.  With a ``rate`` the requests are paced: requests fall due at that rate, each goes out on
a connection that is free, and one that finds none free is counted as late (the server is behind).
A pure-Python client sustains a few thousand paced requests a second; at such a rate the server's
CPU time per request is what ranks servers, whatever the client's speed.  Replies are checked byte
for byte; latencies are measured from the moment a request went out.

It runs in a child process of its own (``LoadProcess``), so it shares no interpreter with the
server: connect, report ready, wait for "go", run, report the result.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import selectors
import socket
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

try:
    import resource
except ImportError:  # Windows: no RLIMIT_NOFILE to raise
    resource = None  # type: ignore[assignment]

HELLO_REQUEST = b"ping\n"
HELLO_REPLY = b"Hello world\n"
#: error messages kept (all errors are counted)
MAX_MESSAGES = 5


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    """What to send, to whom, and for how long."""

    port: int
    host: str = "127.0.0.1"
    app: str = "hello"
    #: echo request size in bytes (hello always sends b"ping\n")
    size: int = 64
    connections: int = 20
    idle: int = 0
    #: requests per second, paced; None for a closed loop
    rate: float | None = None
    warmup: float = 1.0
    seconds: float = 5.0


@dataclasses.dataclass
class LoadResult:
    """What the client measured in its window (after the warmup)."""

    requests: int = 0
    seconds: float = 0.0
    late: int = 0
    errors: int = 0
    messages: list[str] = dataclasses.field(default_factory=list)
    #: latency percentiles in microseconds (None when nothing was measured)
    p50_us: float | None = None
    p99_us: float | None = None

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def exchange(spec: LoadSpec, index: int) -> tuple[bytes, bytes]:
    """(request, expected reply) of connection ``index``: echo payloads differ per connection."""
    if spec.app == "hello":
        return HELLO_REQUEST, HELLO_REPLY
    payload = bytes((index + i) % 251 for i in range(spec.size))
    return payload, payload


def raise_fd_limit(need: int) -> None:
    """Let this process hold `need` fds, as far as the hard limit allows."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(need, hard), hard))


class _Client:
    __slots__ = ("index", "sock", "request", "reply", "received", "pending", "sent_at", "busy")

    def __init__(self, index: int, sock: socket.socket, request: bytes, reply: bytes) -> None:
        self.index = index
        self.sock = sock
        self.request = request
        self.reply = reply
        self.received = b""
        self.pending: memoryview | None = None  # the unsent tail of a request
        self.sent_at = 0.0
        self.busy = False


class Load:
    """The connections of one load, connected at creation; ``run()`` measures."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        raise_fd_limit(spec.idle + spec.connections + 64)
        self.idle = [socket.create_connection((spec.host, spec.port), timeout=10) for _ in range(spec.idle)]
        self.clients = []
        for index in range(spec.connections):
            sock = socket.create_connection((spec.host, spec.port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            self.clients.append(_Client(index, sock, *exchange(spec, index)))
        self.result = LoadResult()
        self.latencies: list[float] = []

    def close(self) -> None:
        for client in self.clients:
            client.sock.close()
        for sock in self.idle:
            sock.close()

    def _fail(self, client: _Client, message: str) -> None:
        self.result.errors += 1
        if len(self.result.messages) < MAX_MESSAGES:
            self.result.messages.append(f"connection {client.index}: {message}")

    def run(self) -> LoadResult:
        spec = self.spec
        selector = selectors.DefaultSelector()
        for client in self.clients:
            selector.register(client.sock, selectors.EVENT_READ, client)
        free = list(reversed(self.clients))  # paced: connections with nothing in flight
        start = time.monotonic()
        window_start = start + spec.warmup
        window_end = window_start + spec.seconds
        due = 0  # paced: requests that fell due so far
        counted = 0

        def send(client: _Client, data: bytes | memoryview, now: float) -> None:
            try:
                sent = client.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(client, f"send failed: {exc}")
                return
            client.sent_at = now if client.pending is None else client.sent_at
            tail = memoryview(data)[sent:] if sent < len(data) else None
            if (tail is None) != (client.pending is None):
                events = selectors.EVENT_READ if tail is None else selectors.EVENT_READ | selectors.EVENT_WRITE
                selector.modify(client.sock, events, client)
            client.pending = tail

        def start_request(client: _Client, now: float) -> None:
            client.busy = True
            send(client, client.request, now)

        if spec.rate is None:
            for client in self.clients:
                start_request(client, start)
        now = start
        try:
            while now < window_end:
                if spec.rate is None:
                    timeout = window_end - now
                else:
                    next_due = start + (due + 1) / spec.rate
                    timeout = max(0.0, min(next_due, window_end) - now)
                events = selector.select(min(timeout, 0.5))
                now = time.monotonic()
                counting = window_start <= now < window_end
                for key, mask in events:
                    client = key.data
                    if mask & selectors.EVENT_WRITE and client.pending is not None:
                        send(client, client.pending, client.sent_at)
                    if not mask & selectors.EVENT_READ:
                        continue
                    try:
                        data = client.sock.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        self._fail(client, f"recv failed: {exc}")
                        selector.unregister(client.sock)
                        continue
                    if not data:
                        self._fail(client, "the server closed the connection")
                        selector.unregister(client.sock)
                        continue
                    client.received += data
                    if len(client.received) < len(client.reply):
                        continue
                    if client.received != client.reply:
                        self._fail(client, f"wrong reply {client.received[:40]!r}")
                    client.received = b""
                    client.busy = False
                    if counting:
                        counted += 1
                        self.latencies.append(now - client.sent_at)
                    if spec.rate is None:
                        start_request(client, now)
                    else:
                        free.append(client)
                if spec.rate is not None:
                    # Every request due by now, in one step: at a rate far beyond the client's
                    # pace, one at a time would never catch up.
                    now_due = int((now - start) * spec.rate)
                    starting = min(now_due - due, len(free))
                    for _ in range(starting):
                        start_request(free.pop(), now)
                    if counting:
                        self.result.late += now_due - due - starting
                    due = now_due
        finally:
            selector.close()
        self.result.requests = counted
        self.result.seconds = spec.seconds
        if self.latencies:
            ordered = sorted(self.latencies)
            self.result.p50_us = round(ordered[len(ordered) // 2] * 1e6, 1)
            self.result.p99_us = round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6, 1)
        return self.result


def _child(pipe: Connection, spec: LoadSpec) -> None:
    """Child entry point: connect, report ready, wait for "go", run, send the result."""
    try:
        try:
            load = Load(spec)
        except OSError as exc:
            pipe.send(("error", f"cannot connect to {spec.host}:{spec.port}: {exc}"))
            return
        pipe.send(("ready", None))
        if pipe.recv() != "go":
            load.close()
            return
        try:
            result = load.run()
        except Exception:  # a bug here must reach the report, not die in a child's stderr
            pipe.send(("error", f"the load client crashed:\n{traceback.format_exc()}"))
            return
        finally:
            load.close()
        pipe.send(("result", dataclasses.asdict(result)))
    except (EOFError, BrokenPipeError):
        return


class LoadError(Exception):
    """The load could not run; the message says why."""


class LoadProcess:
    """A load in a child process: ``start()`` connects, ``go()`` starts the clock, ``result()`` waits."""

    def __init__(self, spec: LoadSpec, ready_timeout: float = 60.0) -> None:
        self.spec = spec
        self.ready_timeout = ready_timeout
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(target=_child, args=(child_end, spec), daemon=True)
        self._process.start()
        child_end.close()

    def _receive(self, timeout: float, doing: str) -> tuple[str, Any]:
        try:
            if not self._pipe.poll(timeout):
                return "error", f"the load client sent nothing for {timeout:g} s while {doing}"
            return self._pipe.recv()
        except (EOFError, OSError):
            return "error", f"the load client died while {doing}"

    def wait_ready(self) -> None:
        kind, detail = self._receive(self.ready_timeout + self.spec.idle / 1000, "connecting")
        if kind != "ready":
            raise LoadError(detail)

    def go(self) -> None:
        self._pipe.send("go")

    def result(self) -> LoadResult:
        kind, detail = self._receive(self.spec.warmup + self.spec.seconds + 30, "running")
        if kind != "result":
            raise LoadError(detail)
        return LoadResult(**detail)

    def close(self) -> None:
        self._pipe.close()  # a child still waiting for "go" sees EOF and exits
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.terminate()  # this child only, by its own PID
            self._process.join(timeout=5)


#: what a stats flood asks, over and over
METRICS_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def flood_metrics(
    address: tuple[str, int],
    concurrency: int,
    should_stop: Callable[[], bool],
    outcomes: dict[str, int],
    poll_interval: float = 0.1,
    request: bytes = METRICS_REQUEST,
) -> None:
    """Keep ``concurrency`` GET /metrics requests (or ``request``) in flight until ``should_stop()``
    is true, each on a connection of its own, a new one opened as each ends; count how each ended
    in ``outcomes`` (the HTTP status, an exception's name, ``connect ERRNO``, or ``unfinished``).
    The stats endpoint's adversary, in the tests and in ``benchmarks/bench_stats_flood.py``."""
    selector = selectors.DefaultSelector()
    replies: dict[socket.socket, bytearray] = {}

    def count(outcome: str) -> None:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    def open_one() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(address)
        except BlockingIOError:
            pass
        except OSError as exc:
            count(f"connect {exc.errno}")
            sock.close()
            return
        replies[sock] = bytearray()
        selector.register(sock, selectors.EVENT_WRITE)

    def finish(sock: socket.socket, outcome: str) -> None:
        count(outcome)
        selector.unregister(sock)
        del replies[sock]
        sock.close()

    for _ in range(concurrency):
        open_one()
    while not should_stop():
        for key, mask in selector.select(poll_interval):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                if mask & selectors.EVENT_WRITE:
                    sock.send(request)
                    selector.modify(sock, selectors.EVENT_READ)
                    continue
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                finish(sock, type(exc).__name__)
                open_one()
                continue
            if data:
                replies[sock] += data
                continue
            reply = bytes(replies[sock])
            finish(sock, reply[9:12].decode("ascii", "replace") if reply.startswith(b"HTTP/1.1 ") else "no reply")
            open_one()
    for sock in list(replies):
        finish(sock, "unfinished")
    selector.close()
