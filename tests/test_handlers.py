"""``pollserve --app module:handler`` with ``async def handler(reader, writer)``: the real command in a
subprocess, over loopback, with the features the protocol apps have."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from clients import connect, exchange, recv_exactly, recv_until_eof, request_rounds, reset
from serverproc import run_pollserve
from statsclient import get_stats, stats_address, wait_for
from test_proxy import read_line

TESTS_DIR = str(Path(__file__).resolve().parent)
ROOT = Path(__file__).resolve().parent.parent
APPS = {"PYTHONPATH": TESTS_DIR}
POSIX = sys.platform != "win32"
posix_only = pytest.mark.skipif(not POSIX, reason="signals, workers and UNIX sockets are POSIX")


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


def client_name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def ready(sock: socket.socket) -> None:
    """The handler has started and said so: it is in its read() from here on."""
    assert recv_exactly(sock, 6) == b"ready\n"


class TestShapes:
    @pytest.mark.parametrize(
        ("spec", "reply"),
        [
            ("handler_apps:echo", b"ping"),
            ("handler_apps:partial_echo", b"partial:ping"),
            ("handler_apps:object_echo", b"object:ping"),
            ("sample_apps:Upper", b"PING"),
            ("sample_apps:make_upper", b"PING"),
        ],
        ids=["coroutine-function", "partial", "async-call", "protocol-class", "protocol-factory"],
    )
    def test_each_shape_is_served_as_what_it_is(self, start_server, spec: str, reply: bytes) -> None:
        server = start_server("--app", spec, env=APPS)
        assert server.match["app"] == spec
        with connect(server.address) as sock:
            sock.sendall(b"ping")
            assert recv_exactly(sock, len(reply)) == reply
        assert_no_traceback(server.log)

    @pytest.mark.parametrize(
        ("spec", "message"),
        [
            ("handler_apps:NOT_CALLABLE", "is not callable (int)"),
            ("handler_apps:sync_two_arguments", "neither a coroutine function nor callable without arguments"),
            ("handler_apps:NeedsArguments", "neither a coroutine function nor callable without arguments"),
            ("handler_apps:one_argument", "cannot be called with (reader, writer)"),
            ("handler_apps:generator", "is an async generator function"),
        ],
    )
    def test_anything_else_is_one_line_saying_what_was_expected(self, spec: str, message: str) -> None:
        result = run_pollserve("--app", spec, "--port", "0", env=APPS)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert message in lines[0] and "async def handler(reader, writer)" in lines[0], lines[0]
        assert lines[0].startswith(f"pollserve: app {spec!r} ")


class TestServing:
    def test_echo_on_every_backend(self, start_server, backend_name: str) -> None:
        server = start_server("--backend", backend_name, "--app", "handler_apps:echo", env=APPS)
        assert server.backend == backend_name
        assert request_rounds(server.address, 50, 5, b"ping", b"ping", timeout=60) == 50 * 5
        payload = os.urandom(1 << 20)  # more than the reader's limit and the socket buffers: flow control both ways
        assert exchange(server.address, payload, len(payload)) == payload
        if POSIX:
            server.signal(signal.SIGTERM)
            assert server.wait() == 0
            assert "51 connections accepted" in server.log
        assert_no_traceback(server.log)

    def test_a_handler_that_raises_is_logged_once_naming_the_client(self, start_server) -> None:
        server = start_server("--app", "handler_apps:fails", env=APPS)
        with connect(server.address) as failing:
            name = client_name(failing)
            failing.sendall(b"boom")
            assert recv_until_eof(failing) == b""
        with connect(server.address) as sock:  # and the server goes on
            sock.sendall(b"still here")
            assert recv_exactly(sock, 10) == b"still here"
        server.wait_for_log(re.escape(f"app error in handler_apps:fails for {name}; closing it"))
        errors = [line for line in server.lines if "app error" in line]
        assert len(errors) == 1 and server.log.count("Traceback") == 1, server.log
        assert "ValueError: handler bug" in server.log
        assert server.alive()

    def test_writelines_write_eof_and_wait_closed(self, start_server) -> None:
        server = start_server("--app", "handler_apps:half_close", env=APPS)
        with connect(server.address) as sock:
            sock.sendall(b"x")
            assert recv_until_eof(sock) == b"x|True"  # the handler's half of the connection is shut
            sock.sendall(b"more")  # the other half still reads
            sock.shutdown(socket.SHUT_WR)
            server.wait_for_log(re.escape("after write_eof the handler read b'more'"))
        server.wait_for_log("^closed$")
        assert_no_traceback(server.log)

    def test_a_client_that_resets_is_no_app_error(self, start_server) -> None:
        server = start_server("--app", "handler_apps:echo", env=APPS)
        for _ in range(20):
            sock = connect(server.address)
            sock.sendall(b"x" * 100_000)  # the echo is mid-write when the reset comes
            reset(sock)
        with connect(server.address) as sock:
            sock.sendall(b"after")
            assert recv_exactly(sock, 5) == b"after"
        assert_no_traceback(server.log)
        assert "app error" not in server.log

    def test_proxy_protocol_gives_the_handler_the_clients_address(self, start_server) -> None:
        server = start_server("--app", "handler_apps:peer", "--proxy-protocol", env=APPS)
        with connect(server.address) as sock:
            sock.sendall(b"PROXY TCP4 192.0.2.1 192.0.2.2 56324 443\r\nhi")
            line = read_line(sock)
        assert line.split()[:2] == [b"192.0.2.1", b"56324"]

    @posix_only
    def test_workers_each_serve_the_handler(self, start_server) -> None:
        server = start_server("--workers", "2", "--app", "handler_apps:peer", "--stats-port", "0", env=APPS)
        from workerprocs import worker_pids

        workers = set(worker_pids(stats_address(server)).values())
        served = set()
        for _ in range(20):
            with connect(server.address) as sock:
                sock.sendall(b"hi")
                served.add(int(read_line(sock).split()[2]))
        assert served and served <= workers, (served, workers)
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        assert_no_traceback(server.log)

    @posix_only
    def test_a_unix_socket(self, start_server, tmp_path: Path) -> None:
        path = str(tmp_path / "handler.sock")
        server = start_server("--unix", path, "--app", "handler_apps:echo", env=APPS)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(server.unix_path)
            sock.sendall(b"over unix")
            assert recv_exactly(sock, 9) == b"over unix"

    @posix_only
    def test_systemd_socket_activation(self, start_server) -> None:
        from test_systemd import start_activated, tcp_listener

        listener = tcp_listener()
        port = listener.getsockname()[1]
        server = start_activated(start_server, [listener], "--app", "handler_apps:echo", env=APPS)
        assert server.port == port
        with connect(("127.0.0.1", port)) as sock:
            sock.sendall(b"activated")
            assert recv_exactly(sock, 9) == b"activated"

    @posix_only
    def test_the_windows_path(self, start_server) -> None:
        """Under tests/emulation's Windows constraints: select() alone, on sockets; no fcntl, no resource."""
        from test_windows_path import WINDOWS_EMULATION

        server = start_server("--app", "handler_apps:echo", env={**WINDOWS_EMULATION, **APPS})
        assert server.backend == "select"
        assert request_rounds(server.address, 5, 3, b"ping", b"ping") == 15
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        assert_no_traceback(server.log)

    def test_tls(self, start_server, tmp_path: Path) -> None:
        from tlshelpers import make_certs, recv_plain, tls_connect

        certs = make_certs(tmp_path)
        server = start_server(
            "--app", "handler_apps:tls_version", "--tls-cert", certs.cert_file, "--tls-key", certs.key_file, env=APPS
        )
        with tls_connect(server.address, certs.client_context()) as sock:
            sock.sendall(b"which")
            version = sock.version().encode() + b"\n"
            assert recv_plain(sock, len(version)) == version

    def test_stats_and_loop_health_name_the_handler(self, start_server) -> None:
        server = start_server("--app", "handler_apps:blocker", "--stats-port", "0", "--slow-callback", "0.1", env=APPS)
        stats = stats_address(server)
        with connect(server.address) as sock:
            name = client_name(sock)
            sock.sendall(b"go")
            assert recv_exactly(sock, 5) == b"done\n"
            figures = get_stats(stats)
        assert figures["connections_accepted"] == 1 and figures["connections_open"] == 1
        assert figures["slowest_callback_s"] >= 0.3
        assert "handler_apps:blocker" in figures["slowest_callback"] and name in figures["slowest_callback"]
        server.wait_for_log("loop held by a slow callback")


class TestLimits:
    def test_max_connections_refuses_before_any_handler_runs(self, start_server) -> None:
        server = start_server(
            "--app", "handler_apps:greet_then_wait", "--max-connections", "1", "--stats-port", "0", env=APPS
        )
        stats = stats_address(server)
        with connect(server.address) as first:
            ready(first)
            with connect(server.address) as refused:
                refused_name = client_name(refused)
                with contextlib.suppress(ConnectionResetError):
                    assert refused.recv(100) == b""
            wait_for(lambda: get_stats(stats)["connections_refused"] == 1, what="the refusal counted")
            first_name = client_name(first)
        server.wait_for_log(re.escape(f"handler saw b'' from {first_name}"))
        with connect(server.address) as third:  # room again
            ready(third)
        assert refused_name not in server.log

    def test_idle_timeout_gives_the_handler_eof(self, start_server) -> None:
        server = start_server("--app", "handler_apps:greet_then_wait", "--idle-timeout", "0.5", env=APPS)
        with connect(server.address) as sock:
            ready(sock)
            name = client_name(sock)
            assert recv_until_eof(sock) == b""  # within the socket's 10 s
        server.wait_for_log(re.escape(f"handler saw b'' from {name}"))
        assert_no_traceback(server.log)


@posix_only
class TestDrain:
    def test_idle_clients_get_eof_at_once_on_sigterm(self, start_server) -> None:
        count = 100
        server = start_server("--app", "handler_apps:greet_then_wait", "--shutdown-timeout", "60", env=APPS)
        socks = [connect(server.address) for _ in range(count)]
        try:
            for sock in socks:
                ready(sock)
            started = time.monotonic()
            server.signal(signal.SIGTERM)
            for sock in socks:
                assert recv_until_eof(sock) == b""
                sock.close()
            assert server.wait(timeout=30) == 0
            took = time.monotonic() - started
        finally:
            for sock in socks:
                sock.close()
        # A hang catcher, not a timing assertion: without the EOF the handlers would wait out the 60 s.
        assert took < 20, f"{count} idle handlers took {took:.2f} s to drain"
        assert len(re.findall(r"handler saw b'' from", server.log)) == count
        assert f"{count} connections accepted" in server.log
        assert_no_traceback(server.log)

    def test_a_handler_mid_reply_finishes_it(self, start_server) -> None:
        server = start_server("--app", "handler_apps:slow_reply", "--shutdown-timeout", "30", env=APPS)
        with connect(server.address) as sock:
            sock.sendall(b"go")
            assert recv_exactly(sock, 5) == b"part1"
            server.signal(signal.SIGTERM)
            assert recv_until_eof(sock) == b"part2"
        assert server.wait() == 0
        assert_no_traceback(server.log)

    def test_a_rolling_restart_gives_the_old_workers_handlers_eof_after_the_timeout(self, start_server) -> None:
        from workerprocs import worker_pids

        server = start_server(
            "--workers", "2", "--app", "handler_apps:greet_then_wait", "--shutdown-timeout", "1", "--stats-port", "0",
            env=APPS,
        )  # fmt: skip
        stats = stats_address(server)
        old = set(worker_pids(stats).values())
        with connect(server.address) as sock:
            ready(sock)
            name = client_name(sock)
            server.signal(signal.SIGHUP)  # the old workers retire: their clients may end on their own for 1 s
            assert recv_until_eof(sock) == b""
        server.wait_for_log(re.escape(f"handler saw b'' from {name}"))
        wait_for(lambda: old.isdisjoint(worker_pids(stats).values()), timeout=30, what="two new workers")
        with connect(server.address) as sock:
            ready(sock)
        assert_no_traceback(server.log)

    @pytest.mark.parametrize(
        ("timeout", "second_signal"), [("0.5", False), ("60", True)], ids=["past-the-timeout", "a-second-signal"]
    )
    def test_a_handler_that_does_not_end_is_cancelled(self, start_server, timeout: str, second_signal: bool) -> None:
        server = start_server("--app", "handler_apps:stubborn", "--shutdown-timeout", timeout, env=APPS)
        with connect(server.address) as sock:
            ready(sock)
            name = client_name(sock)
            server.signal(signal.SIGTERM)
            if second_signal:
                server.wait_for_log("no longer accepting")
                server.signal(signal.SIGTERM)
            assert recv_until_eof(sock) == b""
        assert server.wait() == 0
        assert f"handler for {name} cancelled" in server.log
        timed_out = "shutdown timeout: cancelling 1 handlers still running" in server.log
        assert timed_out is not second_signal, server.log
        assert "was destroyed but it is pending" not in server.log
        assert_no_traceback(server.log)


def test_the_readmes_async_example_is_examples_echo() -> None:
    """The README shows examples/echo.py whole; its blocks run it (tests/test_docs.py)."""
    text = (ROOT / "README.md").read_text()
    shown = re.search(r"```python\n(# examples/echo\.py\n.*?)```", text, re.S)
    assert shown, "README.md shows no examples/echo.py"
    assert shown[1] == (ROOT / "examples" / "echo.py").read_text()
    assert len(shown[1].splitlines()) == 5
