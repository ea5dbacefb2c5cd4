"""A minimal HTTP/1.x endpoint: one GET, one response, then the connection closes.

It serves the stats views.  Like h11 it "contains no IO code whatsoever": the
protocol parses the bytes it is fed and writes to its transport, so its tests
feed bytes.  Deliberately small: no keep-alive, no request bodies, no chunked
encoding -- a scrape or a curl needs none of them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .apps import Protocol, Transport
from .rates import RateLimit

#: a request head larger than this is refused with 431 (RFC 6585, section 5)
MAX_HEAD = 8192
#: a request line longer than this is refused with 414 (RFC 9110, section 15.5.15), as soon as
#: that many bytes have come without a line end; every path served here is a few bytes long
MAX_REQUEST_LINE = 2048
#: a connection that has not sent a whole request by then gets 408
IDLE_TIMEOUT = 5.0

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}

# RFC 9110, section 5.6.2: token = 1*tchar
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
# RFC 9110, section 5.5: a field value is VCHAR, obs-text, SP and HTAB.  CR, LF and NUL are
# "invalid and dangerous"; the recipient must reject the message or replace them (we reject).
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9110, section 7.2: Host = uri-host [ ":" port ], uri-host an IP literal in brackets, an IPv4
# address or a reg-name (unreserved, pct-encoded and sub-delims characters); it may be empty.
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(:[0-9]*)?")


class BadRequest(ValueError):
    """The bytes are not an HTTP/1.x request head; the message says why."""


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


def find_head_end(buffer: bytes | bytearray) -> int:
    """Index just past the blank line ending the head, or -1 if it has not arrived.

    A bare LF is accepted as a line end too (RFC 9112, section 2.2 allows it), so
    the head ends at the first LF followed by an empty line, ``\n`` or ``\r\n``;
    ``\r\n\r\n`` is the second case.
    """
    lf = buffer.find(b"\n\n")
    crlf = buffer.find(b"\n\r\n")
    ends = [index + length for index, length in ((lf, 2), (crlf, 3)) if index >= 0]
    return min(ends) if ends else -1


def parse_head(head: bytes) -> Request:
    """Parse a request head (request line and header fields, up to the blank line)."""
    lines = head.replace(b"\r\n", b"\n").rstrip(b"\n").split(b"\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadRequest("request line is not 'METHOD TARGET HTTP/1.x'")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise BadRequest("invalid method")
    if not target.startswith(b"/") or any(byte <= 0x20 or byte >= 0x7F for byte in target):
        # RFC 3986: a URI is printable ASCII; anything else must be percent-encoded.
        raise BadRequest("target must be an absolute path of printable ASCII")
    if not _VERSION.fullmatch(version):
        raise BadRequest("only HTTP/1.0 and HTTP/1.1 are spoken here")
    headers: dict[str, str] = {}
    hosts = 0
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            # Also refuses obsolete line folding (a line starting with white space).
            raise BadRequest("malformed header field")
        if _BAD_VALUE_BYTE.search(value):
            raise BadRequest("control character in a header field value")
        value = value.strip(b" \t")
        if name.lower() == b"host":
            hosts += 1
            if not _HOST.fullmatch(value):
                raise BadRequest("invalid Host header field")
        headers[name.decode("ascii").lower()] = value.decode("latin-1")
    # RFC 9112, section 3.2: a 400 to any HTTP/1.1 request without a Host header field, and to any
    # request with more than one (a proxy and this server could each read a different one).
    if hosts > 1:
        raise BadRequest("more than one Host header field")
    if hosts == 0 and version == b"HTTP/1.1":
        raise BadRequest("an HTTP/1.1 request needs a Host header field")
    return Request(method.decode("ascii"), target.decode("ascii"), version.decode("ascii"), headers)


def render_response(
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    headers = [
        f"HTTP/1.1 {status} {REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
        *(f"{name}: {value}" for name, value in extra_headers),
    ]
    head = ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


@dataclass(frozen=True)
class Response:
    """A route's answer with header fields of its own (the dashboard's Content-Security-Policy);
    frozen, so a page can build it once and return the same object to every request."""

    content_type: str
    body: bytes
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()


#: a route returns (content type, body) for a 200, or a Response (another status, header fields of
#: its own); it is called once per request
Route = Callable[[], tuple[str, bytes] | Response]


class Budgeted:
    """A route whose answer costs a render (a stats snapshot), bounded by ``budget`` without
    refusing anybody: an answer is rendered while the budget has a token (or when the last one
    is ``max_age`` seconds old), and past it the last one is shared.

    Refusing the excess with 429 could not tell a flood from the operator's own ``pollserve
    stats``: on one host both are one request per connection, so the operator's request lost the
    race for a token nearly every time.  Sharing the last answer bounds the renders just as well
    -- at most ``budget.rate`` a second plus one per ``max_age`` -- and every request gets an
    answer at most ``max_age`` old.  Below the budget every answer is fresh.
    """

    def __init__(
        self, route: Route, budget: RateLimit, max_age: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.route = route
        self.budget = budget
        self.max_age = max_age
        self._clock = clock
        self._last: tuple[str, bytes] | Response | None = None
        self._rendered_at = 0.0
        #: answers rendered, and answers that shared an earlier render, since creation
        self.rendered = 0
        self.shared = 0

    def __call__(self) -> tuple[str, bytes] | Response:
        now = self._clock()
        last = self._last
        if not self.budget.take() and last is not None and now - self._rendered_at < self.max_age:
            self.shared += 1
            return last
        self._last = self.route()
        self._rendered_at = now
        self.rendered += 1
        return self._last


class Slots:
    """The connections one endpoint holds, oldest first: at most ``size`` at once.

    A full endpoint makes room for a newcomer instead of leaving it in the kernel's backlog: there
    it would wait behind clients that connect and send nothing, which is how a balancer's health
    check timed out while the server was well.  Room is made by closing, in this order, the
    oldest connection already answered whose response is all in the kernel (only its lingering
    close is left), the oldest that has not sent a whole request (it holds a slot without using
    it), the oldest still flushing its response.  A client that sends its request at once, as a
    health check or a scrape does, is read before it can become the oldest: the server accepts
    at most half the slots' worth per wakeup (STATS_ACCEPT_BATCH), and reads them the next.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        #: insertion-ordered: the oldest first
        self._held: dict[HTTPEndpoint, None] = {}
        #: connections closed to make room, since creation
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._held)

    def take(self, endpoint: HTTPEndpoint) -> None:
        if len(self._held) >= self.size:
            self.evicted += 1
            self._victim().evict()
        self._held[endpoint] = None

    def _victim(self) -> HTTPEndpoint:
        """The oldest answered connection whose response the kernel has whole (its close is
        lingering); else the oldest that has not sent a whole request; else the oldest still
        flushing its response to a slow reader."""
        waiting = None
        for held in self._held:
            if held.answered and not held.transport.get_write_buffer_size():
                return held
            if waiting is None and not held.answered:
                waiting = held
        return waiting or next(iter(self._held))

    def release(self, endpoint: HTTPEndpoint) -> None:
        self._held.pop(endpoint, None)


class HTTPEndpoint(Protocol):
    """Serves GET (and HEAD) for a fixed set of paths; anything else is 404.

    One request, one response, then ``close()``: the transport shuts its write
    side and reads on until the client's EOF (a lingering close), so a client
    still sending cannot make the kernel reset the connection over the response.
    A 429 and an eviction close at once (``abort()``): both answer a flood.

    Its protections, each optional: ``rate_limit`` bounds the requests answered
    (the excess gets 429); a path in ``own_limits`` draws on its own bucket
    instead, so a flood of one path cannot refuse another (a balancer's
    ``/healthz``), or on none (``None``: its route bounds its own cost, as
    Budgeted does); ``slots`` bounds the connections held (see Slots).
    """

    def __init__(
        self,
        routes: dict[str, Route],
        call_later: Callable[..., Any] | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        rate_limit: RateLimit | None = None,
        *,
        own_limits: Mapping[str, RateLimit | None] | None = None,
        slots: Slots | None = None,
    ) -> None:
        self.routes = routes
        self._call_later = call_later
        self._idle_timeout = idle_timeout
        self._rate_limit = rate_limit
        self._own_limits = own_limits or {}
        self._slots = slots
        self._buffer = bytearray()
        self._responded = False
        self._timer: Any = None

    @property
    def answered(self) -> bool:
        """Whether the response has been written (it may still be flushing, or the close lingering)."""
        return self._responded

    def connection_made(self, transport: Transport) -> None:
        super().connection_made(transport)
        if self._slots is not None:
            self._slots.take(self)
        if self._call_later is not None:
            self._timer = self._call_later(self._idle_timeout, self._timed_out)

    def evict(self) -> None:
        """Closed to make room for a newer connection: now, without lingering, since the slot is
        needed at once; one that had not sent a whole request is told why first."""
        if self._slots is not None:
            self._slots.release(self)
        if self._responded:
            self.transport.abort()
        else:
            self._respond(408, b"no complete request, and the endpoint needed the connection\n", abort=True)

    def data_received(self, data: bytes) -> None:
        if self._responded:
            return
        buffer = self._buffer
        buffer += data
        line_end = buffer.find(b"\n")
        if (line_end if line_end >= 0 else len(buffer)) > MAX_REQUEST_LINE:
            self._refuse_long_line()
            return
        end = find_head_end(buffer)
        if end < 0 and len(buffer) <= MAX_HEAD:
            return
        if end < 0 or end > MAX_HEAD:
            self._respond(431, f"request head larger than {MAX_HEAD} bytes\n".encode())
            return
        try:
            request = parse_head(bytes(buffer[:end]))
        except BadRequest as exc:
            self._respond(400, f"bad request: {exc}\n".encode())
            return
        self._handle(request)

    def _refuse_long_line(self) -> None:
        """414 when the long line is a request's target (a method, then a path running past the limit);
        400 for other bytes."""
        method, space, rest = bytes(self._buffer[: MAX_REQUEST_LINE + 1]).partition(b" ")
        if space and _TOKEN.fullmatch(method) and rest.startswith(b"/") and b" " not in rest:
            self._respond(414, f"request target longer than {MAX_REQUEST_LINE} bytes\n".encode())
        else:
            self._respond(400, f"bad request: no request line in the first {MAX_REQUEST_LINE} bytes\n".encode())

    def _handle(self, request: Request) -> None:
        route = self.routes.get(request.path)
        limit = self._own_limits.get(request.path, self._rate_limit)
        if limit is not None and not limit.take():
            # 429, not 503: a balancer reads 503 on /healthz as "draining" (RFC 6585, section 4).
            # Closed at once, without lingering: the whole request has been read, so the close sends
            # a FIN after the response, and a refusal is what a flood gets -- lingering (a shutdown,
            # a timer, the wait for the client's FIN) was a fifth of the server's CPU for one.
            self._respond(
                429, b"too many requests; try again in a second\n", extra_headers=(("Retry-After", "1"),), abort=True
            )
        elif route is None:
            self._respond(404, f"not found; try {', '.join(self.routes)}\n".encode())
        elif request.method not in ("GET", "HEAD"):
            self._respond(405, b"only GET and HEAD\n", extra_headers=(("Allow", "GET, HEAD"),))
        else:
            result = route()
            if isinstance(result, Response):
                self._respond(result.status, result.body, result.content_type, result.headers)
            else:
                content_type, body = result
                self._respond(200, body, content_type)

    def _respond(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        extra_headers: tuple[tuple[str, str], ...] = (),
        *,
        abort: bool = False,
    ) -> None:
        self._responded = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # RFC 9110, section 9.3.2: no content in a response to HEAD, whatever its status.
        # The method is read off the buffer, since a 400 or 408 has no parsed request.
        head_only = self._buffer.startswith(b"HEAD ")
        self._buffer.clear()
        response = render_response(status, body, content_type, head_only=head_only, extra_headers=extra_headers)
        self.transport.write(response)
        if abort:
            self.transport.abort()
        else:
            self.transport.close()

    def eof_received(self) -> None:
        # Any byte the client sent gets an answer, blank lines too (RFC 9112 section 2.2 lets a server
        # skip empty lines before a request line, but here no request line ever came).  A client that
        # connected and sent nothing at all gets a plain close: there is nothing to answer.
        if not self._responded and self._buffer:
            self._respond(400, b"bad request: incomplete request head\n")
        return None  # the transport closes once the response is flushed

    def _timed_out(self) -> None:
        self._timer = None
        if not self._responded:
            self._respond(408, b"no complete request in time\n")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._slots is not None:
            self._slots.release(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
