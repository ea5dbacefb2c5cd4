"""The live dashboard at ``GET /``: the response by feeding bytes (no IO), then the page itself in
headless Chromium against a real ``pollserve --stats-port 0``, whose DOM must agree with /stats."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from browser import Chromium, DevTools, Dom, png_size, require_chromium
from clients import connect, recv_exactly
from statsclient import get_stats, stand_in_server, stats_address, wait_for
from test_health import TESTS_DIR, steady_input
from transports import RecordingTransport

from pollserve.dashboard import page
from pollserve.http import HTTPEndpoint, Response
from pollserve.rates import RateLimit
from pollserve.service import STATS_RATE, stats_routes

HELLO = b"Hello world\n"
DOCS = Path(__file__).resolve().parent.parent / "docs"


class FixedCollector:
    """What stats_routes needs of a collector, with a fixed snapshot."""

    def json(self) -> str:
        return json.dumps({"pid": 1})

    def metrics(self) -> str:
        return "pollserve_info 1\n"


def request(raw: bytes, routes=None, rate_limit: RateLimit | None = None) -> tuple[int, dict[str, str], bytes]:
    """Feed one request to an endpoint; (status, header fields with lower-case names, body)."""
    endpoint = HTTPEndpoint(routes or stats_routes(FixedCollector()), rate_limit=rate_limit)
    transport = RecordingTransport()
    endpoint.connection_made(transport)
    endpoint.data_received(raw)
    assert transport.closed
    head, _, body = bytes(transport.written).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
    return int(status_line.split()[1]), headers, body


def inline_blocks(html: str, element: str) -> list[str]:
    return re.findall(rf"<{element}>(.*?)</{element}>", html, re.DOTALL)


def csp_directives(policy: str) -> dict[str, list[str]]:
    return {name: values for name, *values in (part.split() for part in policy.split(";") if part.strip())}


class TestResponse:
    def test_root_is_the_page_with_a_policy(self) -> None:
        status, headers, body = request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert int(headers["content-length"]) == len(body)
        assert headers["x-content-type-options"] == "nosniff"
        assert body.startswith(b"<!doctype html>")
        policy = csp_directives(headers["content-security-policy"])
        assert policy["default-src"] == ["'none'"]
        assert policy["connect-src"] == ["'self'"]
        assert policy["img-src"] == ["data:"]
        assert policy["base-uri"] == ["'none'"] and policy["form-action"] == ["'none'"]

    def test_policy_allows_exactly_the_inline_blocks(self) -> None:
        """By hash: no 'unsafe-inline', no host, no scheme; a changed block must change the policy."""
        _, headers, body = request(b"GET / HTTP/1.0\r\n\r\n")
        html = body.decode()
        policy = csp_directives(headers["content-security-policy"])
        for directive, element in (("script-src", "script"), ("style-src", "style")):
            blocks = inline_blocks(html, element)
            assert len(blocks) == 1, f"one <{element}> block, without attributes"
            digest = base64.b64encode(hashlib.sha256(blocks[0].encode()).digest()).decode()
            assert policy[directive] == [f"'sha256-{digest}'"]

    def test_body_loads_nothing_from_elsewhere(self) -> None:
        html = page().body.decode()
        for needle in ("http://", "https://", "//cdn", "ws://", "wss://", "@import", "@font-face"):
            assert needle not in html.lower(), needle
        assert not re.search(r"""["'(]//\w""", html), "a protocol-relative URL"
        assert not re.search(r"\ssrc\s*=", html), "no element loads a source"
        assert set(re.findall(r'href="([^"]*)"', html)) == {"data:,", "stats", "metrics"}
        assert set(re.findall(r"url\(([^)]*)\)", html)) <= {'#" + svgId + "-hatch'}
        assert re.findall(r"""fetch\(\s*["']([^"']*)""", html) == ["stats"], "polls its own /stats only"

    def test_page_is_small_and_responsive(self) -> None:
        body = page().body
        assert 4 << 10 < len(body) < 64 << 10, f"{len(body)} bytes"
        assert b'<meta name="viewport" content="width=device-width, initial-scale=1">' in body

    def test_polling_stays_far_under_the_rate_bound(self) -> None:
        poll_ms = int(re.search(rb"const POLL_MS = (\d+);", page().body)[1])
        assert 500 <= poll_ms <= 2000, "about once a second"
        assert 1000 / poll_ms <= STATS_RATE / 10

    def test_built_once_and_served_as_built(self) -> None:
        """The cost of /stats or less: no file read, hashing or rendering per request."""
        routes = stats_routes(FixedCollector())
        assert routes["/"]() is routes["/"]() is page()
        assert stats_routes(FixedCollector())["/"]() is page()

    def test_head_has_the_headers_and_no_body(self) -> None:
        status, headers, body = request(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and body == b""
        assert int(headers["content-length"]) == len(page().body)
        assert "content-security-policy" in headers

    def test_rate_bound_applies_to_the_page(self) -> None:
        limit = RateLimit(rate=1e-6, burst=1)
        routes = stats_routes(FixedCollector())
        assert request(b"GET / HTTP/1.0\r\n\r\n", routes, limit)[0] == 200
        status, headers, _ = request(b"GET / HTTP/1.0\r\n\r\n", routes, limit)
        assert status == 429 and headers["retry-after"] == "1"
        assert "content-security-policy" not in headers

    def test_other_routes_unchanged(self) -> None:
        status, headers, body = request(b"GET /stats HTTP/1.0\r\n\r\n")
        assert (status, headers["content-type"], json.loads(body)) == (200, "application/json", {"pid": 1})
        assert "content-security-policy" not in headers
        status, _, body = request(b"GET /nothing HTTP/1.0\r\n\r\n")
        assert status == 404 and b"/stats" in body

    def test_a_route_response_carries_its_status_and_headers(self) -> None:
        routes = {"/x": lambda: Response("text/plain", b"gone", status=503, headers=(("Retry-After", "7"),))}
        status, headers, body = request(b"GET /x HTTP/1.0\r\n\r\n", routes)
        assert (status, headers["retry-after"], headers["content-type"], body) == (503, "7", "text/plain", b"gone")


# -- in a real browser ------------------------------------------------------------------------


@pytest.fixture
def chromium_path() -> str:
    return require_chromium()


@pytest.fixture
def chromium(chromium_path: str, tmp_path: Path) -> Chromium:
    return Chromium(chromium_path, tmp_path)


#: true once the page has had an answer from /stats
LIVE = "document.getElementById('state').className === 'live'"


def shows_open(count: int) -> str:
    return f"document.getElementById('connections-open').textContent.replace(/\\D/g, '') === '{count}'"


@contextlib.contextmanager
def held_connections(address: tuple[str, int], count: int) -> Iterator[None]:
    """A little load: ``count`` clients that each said something and stay connected."""
    with contextlib.ExitStack() as stack:
        for _ in range(count):
            sock = stack.enter_context(connect(address))
            sock.sendall(b"hi\n")
            assert recv_exactly(sock, len(HELLO)) == HELLO
        yield


@contextlib.contextmanager
def load(address: tuple[str, int], clients: int, join_every: float, payload: bytes) -> Iterator[threading.Event]:
    """Load that changes while a page watches, for an echo server: a client joins every
    ``join_every`` s up to ``clients``, and five times a second each one there sends ``payload``
    and reads it back.  The event is set once all have joined; it runs until the block ends (or
    a minute has passed), and the clients stay connected until then."""
    joined = threading.Event()
    stop = threading.Event()

    def run(stack: contextlib.ExitStack) -> None:
        socks: list = []
        next_join = time.monotonic()
        deadline = next_join + 60
        while not stop.wait(0.2) and time.monotonic() < deadline:
            if len(socks) < clients and time.monotonic() >= next_join:
                socks.append(stack.enter_context(connect(address)))
                next_join += join_every
                if len(socks) == clients:
                    joined.set()
            for sock in socks:
                sock.sendall(payload)
                recv_exactly(sock, len(payload))

    with contextlib.ExitStack() as stack:
        thread = threading.Thread(target=run, args=(stack,), daemon=True)
        thread.start()
        try:
            yield joined
        finally:
            stop.set()
            thread.join(10)


def digits(text: str) -> int:
    return int(re.sub(r"\D", "", text))


def page_url(address: tuple[str, int]) -> str:
    return f"http://{address[0]}:{address[1]}/"


class TestInBrowser:
    def test_page_shows_the_server_it_polls(self, start_server, chromium: Chromium) -> None:
        server = start_server("--stats-port", "0")
        address = stats_address(server)
        with held_connections(server.address, 3):
            wait_for(lambda: get_stats(address)["connections_open"] == 3, what="3 connections open")
            dom = Dom(chromium.dump_dom(page_url(address)))
            stats = get_stats(address)
        assert dom.text["state"].strip() == "live", dom.text.get("banner")
        assert dom.text["pid"] == str(stats["pid"]) == str(server.proc.pid)
        assert dom.text["backend"] == stats["backend"] == server.backend
        assert digits(dom.text["connections-open"]) == stats["connections_open"] == 3
        assert digits(dom.text["accepted"]) == stats["connections_accepted"] == 3
        assert digits(dom.text["fd-limit"]) == stats["fd_soft_limit"]
        assert "hidden" in dom.attrs["banner"] and "hidden" in dom.attrs["workers-card"]
        assert dom.count("path", "series") == 3, "fds, connections and lag drawn"

    def test_screenshot_for_the_readme(self, start_server, chromium_path: str, tmp_path: Path) -> None:
        """The README's screenshot, in real time: clients join a server one a second, towards its
        connection limit, each echoing 4 KiB five times a second; the page runs no blocked code.
        Written to docs/dashboard.png with POLLSERVE_UPDATE_SCREENSHOT=1, else to a temporary file,
        so a test run leaves the tree as it was."""
        shot = DOCS / "dashboard.png" if os.environ.get("POLLSERVE_UPDATE_SCREENSHOT") else tmp_path / "dashboard.png"
        server = start_server("--stats-port", "0", "--max-connections", "10", "--app", "echo")
        address = stats_address(server)
        with DevTools(chromium_path, tmp_path / "profile", (1280, 900)) as browser:
            browser.open(page_url(address))
            browser.wait_until(LIVE, what="the page live")
            with load(server.address, clients=9, join_every=1.0, payload=b"x" * 4096) as joined:
                assert joined.wait(30), "the clients did not all join"
                browser.wait_until(shows_open(9), what="9 open connections on the page")
                time.sleep(1.5)  # a few samples at the top, for the charts
                browser.screenshot(shot)
            blocked = [event for event in browser.events if "Content Security Policy" in json.dumps(event)]
        assert png_size(shot) == (1280, 900)
        assert not blocked, blocked

    def test_fits_a_phone(self, start_server, chromium_path: str, tmp_path: Path) -> None:
        """At 360 px nothing needs sideways scrolling, and the charts take the width there is."""
        server = start_server("--stats-port", "0")
        with DevTools(chromium_path, tmp_path / "profile", (360, 740), mobile=True) as browser:
            browser.open(page_url(stats_address(server)))
            browser.wait_until(LIVE, what="the page live")
            assert browser.evaluate("document.documentElement.scrollWidth") <= 360
            widths = browser.evaluate("[...document.querySelectorAll('.chart svg')].map((svg) => svg.clientWidth)")
            assert len(widths) == 3 and all(280 <= width <= 360 for width in widths), widths
            browser.screenshot(tmp_path / "phone.png")
        assert png_size(tmp_path / "phone.png") == (360, 740)

    def test_one_line_per_worker(self, start_server, chromium: Chromium) -> None:
        server = start_server("--workers", "2", "--stats-port", "0")
        address = stats_address(server)
        wait_for(lambda: len(get_stats(address)["workers"]) == 2, timeout=20, what="2 workers reporting")
        dom = Dom(chromium.dump_dom(page_url(address)))
        stats = get_stats(address)
        assert dom.text["pid"] == str(stats["pid"]) == str(server.proc.pid)
        assert "hidden" not in dom.attrs["workers-card"]
        assert dom.count("tr", "worker") == 2
        shown = dom.text["workers"]
        for worker in stats["workers"]:
            assert f"#{worker['index']}{worker['pid']}" in shown
            assert f"of {worker['fd_soft_limit']:,}".replace(",", "\u202f") in shown, "each against its own limit"
        # The gauge: the fullest worker's fds against that worker's limit, not every process's fds
        # (the parent's included) against one worker's.
        fullest = max(stats["workers"], key=lambda worker: worker["fd_usage"])
        assert f"in worker #{fullest['index']}" in dom.text["fd-limit"]
        assert digits(dom.text["fds"]) < stats["process_fds"]
        assert abs(digits(dom.text["fds"]) - fullest["process_fds"]) <= 2
        assert "%" in dom.text["loop-utilization"]

    def test_loop_health_from_the_dom(self, start_server, chromium: Chromium) -> None:
        """An app holding the loop 300 ms per chunk under steady input: the page shows the busy
        loop, the lag above 250 ms and the slow callback by name, as /stats has them."""
        server = start_server("--app", "sample_apps:Sleepy", "--stats-port", "0", env={"PYTHONPATH": TESTS_DIR})
        address = stats_address(server)
        with steady_input(server.address):
            wait_for(lambda: (get_stats(address)["loop_lag_p99_s"] or 0) > 0.25, timeout=20, what="lag above 250 ms")
            dom = Dom(chromium.dump_dom(page_url(address)))
            stats = get_stats(address)
        assert dom.text["state"].strip() == "live"
        assert float(dom.text["loop-utilization"].rstrip("%")) > 50
        assert float(dom.attrs["util-meter"]["aria-valuenow"]) > 50
        assert "warn" in dom.attrs["util-meter"]["class"] or float(dom.attrs["util-meter"]["aria-valuenow"]) < 80
        p99 = dom.text["lag-p99"]
        assert (p99.endswith(" ms") and float(p99.split()[0]) > 250) or p99.endswith(" s"), p99
        assert digits(dom.text["slow-callbacks"]) >= 1 and stats["slow_callbacks"] >= digits(dom.text["slow-callbacks"])
        assert stats["slow_passes"] >= digits(dom.text["slow-passes"]) >= 0
        assert "sample_apps:Sleepy.data_received on 127.0.0.1:" in dom.text["slowest"]
        assert dom.count("path", "series") == 3, "the lag series drawn beside fds and connections"
        assert "now" in dom.text["lag-chart"]

    def test_time_axis_is_labelled_at_regular_steps(self, start_server, chromium: Chromium) -> None:
        server = start_server("--stats-port", "0")
        dom = Dom(chromium.dump_dom(page_url(stats_address(server)), budget_ms=8000))
        labels = re.findall(r"\u2212(\d+) s", dom.text["fd-chart"])
        steps = [int(label) for label in labels]
        assert len(steps) >= 2, dom.text["fd-chart"]
        assert steps == [steps[0] * (i + 1) for i in range(len(steps))], "evenly spaced back from now"
        assert "now" in dom.text["fd-chart"]

    def test_draining_after_sigterm(self, start_server, chromium: Chromium) -> None:
        server = start_server("--stats-port", "0", "--drain-delay", "30")
        address = stats_address(server)
        server.signal(signal.SIGTERM)
        wait_for(lambda: get_stats(address)["draining"], what="draining in /stats")
        dom = Dom(chromium.dump_dom(page_url(address)))
        assert dom.text["state"].startswith("draining"), dom.text["state"]
        assert dom.attrs["state"]["class"] == "draining"
        server.signal(signal.SIGTERM)
        assert server.wait() == 0

    def test_rates_by_the_server_clock_under_virtual_time(self, chromium: Chromium) -> None:
        """Under --virtual-time-budget the page's seconds pass in milliseconds of the server's:
        two polls a page-second apart are 5 ms apart on the server's clock, and see no traffic
        between them, though 1 KiB a second flows (in a chunk every 0.2 s).  Rates by the
        server's own clock (uptime_s) over a span long enough still show it."""

        def snapshot(count: int) -> dict:
            uptime = 3.0 + 0.005 * count
            return dict(SNAPSHOT, uptime_s=uptime, bytes_in=1024 * int(uptime / 0.2) // 5, loop_iterations=50 + count)

        with stand_in_endpoint(answers=4, snapshot=snapshot) as address:
            dom = Dom(chromium.dump_dom(page_url(address)))
        rate = dom.text["bytes-in-rate"]
        assert rate.endswith("/s") and not rate.startswith("0 B"), rate
        assert 900 <= float(rate.split()[0]) <= 1100, rate
        assert dom.text["rate-span"] == "since the server started"

    def test_a_silent_worker_is_marked_stale(self, start_server, chromium: Chromium) -> None:
        """A worker held with SIGSTOP stops reporting: its row says how long it has been silent."""
        server = start_server("--workers", "2", "--stats-port", "0", "--worker-timeout", "0")
        address = stats_address(server)
        wait_for(lambda: len(get_stats(address)["workers"]) == 2, timeout=20, what="2 workers reporting")
        silent = {row["index"]: row["pid"] for row in get_stats(address)["workers"]}[1]
        os.kill(silent, signal.SIGSTOP)
        try:
            wait_for(
                lambda: [row["stale"] for row in get_stats(address)["workers"]] == [False, True],
                timeout=10,
                what="worker 1 stale",
            )
            dom = Dom(chromium.dump_dom(page_url(address)))
        finally:
            os.kill(silent, signal.SIGCONT)
        assert dom.count("tr", "worker") == 2 and dom.count("tr", "stale") == 1
        assert re.search(rf"#1{silent} silent \d+ s", dom.text["workers"]), dom.text["workers"]

    def test_says_so_when_the_server_stops_answering(self, chromium: Chromium) -> None:
        """A stand-in endpoint answers twice, then closes each request unanswered: the page says
        so, keeps the last figures and the history, and marks the gap."""
        with stand_in_endpoint(answers=2) as address:
            dom = Dom(chromium.dump_dom(page_url(address), budget_ms=5000))
        assert dom.text["state"].strip() == "not answering"
        assert "hidden" not in dom.attrs["banner"]
        assert "The server is not answering" in dom.text["banner"]
        assert "the history is kept" in dom.text["banner"]
        assert dom.text["pid"] == "4242" and dom.text["backend"] == "poll"
        assert digits(dom.text["connections-open"]) == 5
        assert dom.count("path", "series") == 2, "the history is still drawn (no lag in this stand-in)"
        assert "no answer" in dom.text["fd-chart"]

    def test_the_browser_enforces_the_policy(self, chromium: Chromium) -> None:
        """The script runs because its hash is in the policy: with another hash it does not."""
        policy = page().headers[0][1]
        assert policy.startswith("default-src") and "script-src 'sha256-" in policy
        wrong = re.sub(r"script-src '[^']+'", "script-src 'sha256-" + "A" * 43 + "='", policy)
        with stand_in_endpoint(answers=5, policy=wrong) as address:
            blocked = Dom(chromium.dump_dom(page_url(address)))
        with stand_in_endpoint(answers=5) as address:
            allowed = Dom(chromium.dump_dom(page_url(address)))
        assert blocked.text["state"].startswith("waiting for the first answer")
        assert blocked.text["pid"] == "\N{EN DASH}"
        assert allowed.text["state"] == "live" and allowed.text["pid"] == "4242"


SNAPSHOT = {
    "pid": 4242,
    "backend": "poll",
    "backend_capacity": None,
    "registered_fds": 9,
    "process_fds": 14,
    "fd_soft_limit": 1024,
    "fd_hard_limit": 4096,
    "fd_usage": 0.0137,
    "connections_open": 5,
    "connections_accepted": 7,
    "connections_closed": 2,
    "connections_refused": 0,
    "connections_limit": 990,
    "connections_idle_closed": 0,
    "connections_idle_reset": 0,
    "bytes_in": 100,
    "bytes_out": 400,
    "write_buffer_bytes": 0,
    "loop_iterations": 50,
    "events_total": 60,
    "uptime_s": 3.0,
}


@contextlib.contextmanager
def stand_in_endpoint(
    answers: int, policy: str | None = None, snapshot: Callable[[int], dict] | None = None
) -> Iterator[tuple[str, int]]:
    """Serves the real page (with another Content-Security-Policy if given), then /stats
    ``answers`` times (the ``snapshot`` of each answer's number, or SNAPSHOT a second later each
    time); later requests get no answer at all."""
    served = {"stats": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/":
                dashboard = page()
                headers = dict(dashboard.headers)
                if policy is not None:
                    headers["Content-Security-Policy"] = policy
                self._send(dashboard.content_type, dashboard.body, headers.items())
            elif self.path == "/stats" and served["stats"] < answers:
                served["stats"] += 1
                count = served["stats"]
                snap = snapshot(count) if snapshot else dict(SNAPSHOT, uptime_s=SNAPSHOT["uptime_s"] + count)
                self._send("application/json", json.dumps(snap).encode())
            else:
                self.close_connection = True  # closed unanswered: the client sees the server gone

        def _send(self, content_type: str, body: bytes, headers=()) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    with stand_in_server(Handler) as address:
        yield address
