"""End to end: the real ``pollserve`` command in a subprocess, over loopback."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clients import connect, exchange, recv_exactly, recv_until_eof, request_rounds, reset
from conftest import AVAILABLE
from sample_apps import BIG_REPLY_SIZE, big_reply
from serverproc import run_pollserve

from pollserve.backends import BACKENDS

HELLO = b"Hello world\n"
TESTS_DIR = str(Path(__file__).parent)
POSIX = sys.platform != "win32"


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


class TestServing:
    def test_200_clients_20_rounds(self, start_server, backend_name: str) -> None:
        server = start_server("--backend", backend_name)
        assert server.backend == backend_name and server.host == "127.0.0.1"
        assert request_rounds(server.address, 200, 20, b"ping\n", HELLO, timeout=120) == 200 * 20
        assert server.alive()

    def test_echo_returns_1_mib_byte_for_byte(self, start_server, backend_name: str) -> None:
        server = start_server("--backend", backend_name, "--app", "echo")
        payload = os.urandom(1 << 20)
        assert exchange(server.address, payload, len(payload)) == payload
        assert server.alive()

    def test_abrupt_resets_leave_the_server_serving(self, start_server, backend_name: str) -> None:
        server = start_server("--backend", backend_name, "--app", "echo")
        socks = [connect(server.address) for _ in range(50)]
        for sock in socks:
            sock.sendall(b"x" * 1000)
        for sock in socks:
            reset(sock)
        assert request_rounds(server.address, 10, 5, b"after", b"after") == 50
        assert server.alive()
        assert_no_traceback(server.log)

    def test_clients_vanishing_mid_write(self, start_server, backend_name: str) -> None:
        server = start_server("--backend", backend_name, "--app", "sample_apps:BigReply", env={"PYTHONPATH": TESTS_DIR})
        for _ in range(20):
            sock = connect(server.address)
            sock.sendall(b"go")
            sock.recv(1000)  # the server is mid-write now
            reset(sock)
        with connect(server.address) as sock:
            sock.sendall(b"go")
            assert recv_exactly(sock, BIG_REPLY_SIZE) == big_reply()
        assert_no_traceback(server.log)

    def test_user_app(self, start_server) -> None:
        for spec in ("sample_apps:Upper", "sample_apps:make_upper"):
            server = start_server("--app", spec, env={"PYTHONPATH": TESTS_DIR})
            assert server.match["app"] == spec
            with connect(server.address) as sock:
                sock.sendall(b"shout")
                assert recv_exactly(sock, 5) == b"SHOUT"

    def test_ipv6_loopback(self, start_server) -> None:
        if not socket.has_ipv6:
            pytest.skip("Python built without IPv6")
        try:
            socket.create_server(("::1", 0), family=socket.AF_INET6).close()
        except OSError as exc:
            pytest.skip(f"no IPv6 loopback here: {exc}")
        server = start_server("--host", "::1")
        assert server.host == "::1"
        assert f"listening on [::1]:{server.port}" in server.log
        assert request_rounds(server.address, 5, 3, b"v6", HELLO) == 15


class TestBackendChoice:
    def test_env_variable_picks_the_backend(self, start_server) -> None:
        for name in AVAILABLE:
            server = start_server(env={"POLLSERVE_BACKEND": name})
            assert server.backend == name

    def test_flag_beats_env_variable(self, start_server) -> None:
        server = start_server("--backend", "select", env={"POLLSERVE_BACKEND": AVAILABLE[0]})
        assert server.backend == "select"

    def test_auto_picks_the_best(self, start_server) -> None:
        assert start_server("--backend", "auto").backend == AVAILABLE[0]
        assert start_server(env={"POLLSERVE_BACKEND": ""}).backend == AVAILABLE[0]  # unset: auto

    @pytest.mark.parametrize("missing", [name for name in BACKENDS if name not in AVAILABLE] or ["none"])
    def test_missing_backend_is_one_line_exit_2(self, missing: str) -> None:
        if missing == "none":
            pytest.skip("every backend is available here")
        for result in (
            run_pollserve("--backend", missing, "--port", "0"),
            run_pollserve("--port", "0", env={"POLLSERVE_BACKEND": missing}),
        ):
            assert result.returncode == 2
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1, result.stderr
            assert missing in lines[0] and "available: " + ", ".join(AVAILABLE) in lines[0]

    def test_unknown_backend_in_env_is_one_line(self) -> None:
        result = run_pollserve("--port", "0", env={"POLLSERVE_BACKEND": "iocp"})
        assert result.returncode == 2
        assert result.stderr.strip() == "pollserve: unknown backend 'iocp' (known: auto, " + ", ".join(BACKENDS) + ")"

    def test_backends_table(self) -> None:
        result = run_pollserve("backends")
        assert result.returncode == 0, result.stderr
        rows = {line.split()[0]: line.split() for line in result.stdout.strip().splitlines()[1:]}
        assert list(rows) == list(BACKENDS)
        for name, row in rows.items():
            assert row[1] == ("yes" if name in AVAILABLE else "no")
            assert ("<-" in row) == (name == AVAILABLE[0])
        if POSIX:
            assert "fd < 1024" in " ".join(rows["select"])
        assert "unbounded" in rows["poll"]


class TestUserErrors:
    @pytest.mark.parametrize(
        ("spec", "message"),
        [
            ("no_such_module_xyz:App", "cannot import module 'no_such_module_xyz'"),
            ("sample_apps:Missing", "module 'sample_apps' has no attribute 'Missing'"),
            ("sample_apps:NOT_CALLABLE", "is not callable"),
            ("nonsense", "unknown app 'nonsense'"),
        ],
    )
    def test_bad_app_is_one_line(self, spec: str, message: str) -> None:
        result = run_pollserve("--app", spec, "--port", "0", env={"PYTHONPATH": TESTS_DIR})
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr

    def test_port_in_use_is_one_line(self) -> None:
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            result = run_pollserve("--port", str(port))
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"pollserve: cannot listen on 127.0.0.1:{port}: ")
        if sys.platform.startswith("linux"):
            assert lines[0].endswith(": Address already in use")

    def test_bad_port_is_one_line(self) -> None:
        result = run_pollserve("--port", "70000")
        assert result.returncode == 2
        assert result.stderr.strip() == "pollserve: port 70000 is out of range 0-65535"


@pytest.mark.skipif(not POSIX, reason="RLIMIT_NOFILE is POSIX")
class TestFdExhaustion:
    def test_accept_emfile_backs_off_and_recovers(self, start_server, backend_name: str) -> None:
        """accept() failing with EMFILE must neither spin nor kill the server.

        The connection limit keeps a server within its fds; an app that takes fds of its
        own (two per connection here) overruns the budget, and EMFILE is the last defence.
        """
        server = start_server(
            "--backend", backend_name, "--max-fds", "64", "--app", "sample_apps:FdHog", env={"PYTHONPATH": TESTS_DIR}
        )
        socks = [connect(server.address) for _ in range(40)]  # the kernel queues what cannot be accepted
        try:
            server.wait_for_log(r"WARNING app: accept failed: Too many open files; pausing accepts")
            server.wait_for_log(r"WARNING fd usage at 100% of the soft limit")
            socks[0].sendall(b"hi")
            assert recv_exactly(socks[0], len(HELLO)) == HELLO  # the accepted ones are served
            cpu_before = psutil_cpu(server.proc.pid)
            time.sleep(1.0)
            assert psutil_cpu(server.proc.pid) - cpu_before < 0.5, "the server spins while out of fds"
            for sock in socks[:30]:  # frees 3 fds per accepted client: room for the 10 still queued
                sock.close()
            last = socks[-1]
            last.sendall(b"hi")
            assert recv_exactly(last, len(HELLO)) == HELLO  # queued clients are accepted once fds free up
            server.wait_for_log(r"accepting again")
        finally:
            for sock in socks:
                sock.close()
        assert server.alive()
        # One warning per episode, not one per second: each but the last is followed by "accepting again".
        failed = sum("accept failed" in line for line in server.lines)
        assert 1 <= failed <= sum("accepting again" in line for line in server.lines) + 1, server.log
        assert_no_traceback(server.log)


def psutil_cpu(pid: int) -> float:
    """CPU seconds a process has used."""
    psutil = pytest.importorskip("psutil")
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


@pytest.mark.skipif(not POSIX, reason="signals are POSIX")
class TestShutdown:
    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
    def test_signal_exits_0_with_a_summary(self, start_server, backend_name: str, signum: int) -> None:
        server = start_server("--backend", backend_name)
        assert request_rounds(server.address, 3, 2, b"hi", HELLO) == 6
        server.signal(signum)
        assert server.wait() == 0
        assert_no_traceback(server.log)
        summary = [line for line in server.lines if "stopped:" in line]
        assert len(summary) == 1, server.log
        assert "3 connections accepted" in summary[0]

    def test_sigterm_flushes_buffered_replies(self, start_server, backend_name: str) -> None:
        server = start_server("--backend", backend_name, "--app", "sample_apps:BigReply", env={"PYTHONPATH": TESTS_DIR})
        with connect(server.address) as sock:
            sock.sendall(b"go")
            assert sock.recv(1)  # the reply has started: most of it sits in the server's buffer
            server.signal(signal.SIGTERM)
            time.sleep(0.2)  # the server must not close before it has flushed
            rest = recv_until_eof(sock)
        assert len(rest) == BIG_REPLY_SIZE - 1
        assert server.wait() == 0
        assert "flushing 1 connections" in server.log

    def test_sigterm_delivers_every_byte_it_counts_to_a_client_still_sending(
        self, start_server, backend_name: str
    ) -> None:
        """The client has sent more than the server read (backpressure): closing then would make
        the kernel reset the connection and drop replies that send() had accepted."""
        server = start_server("--backend", backend_name, "--app", "echo")
        with connect(server.address) as sock:
            sock.settimeout(0.5)
            sent = 0
            with contextlib.suppress(TimeoutError, socket.timeout):
                while sent < (64 << 20):
                    sent += sock.send(b"x" * 65536)
            assert sent < (64 << 20), "the server never pushed back"
            server.signal(signal.SIGTERM)
            sock.settimeout(10)
            received = recv_until_eof(sock)  # ECONNRESET here is the bug
            sock.shutdown(socket.SHUT_WR)  # ends the server's lingering read
        assert server.wait() == 0
        out = int(re.search(r"stopped: .* (\d+) bytes out", server.log)[1])
        assert len(received) == out and received == b"x" * out
        assert_no_traceback(server.log)

    def test_shutdown_timeout_bounds_the_flush(self, start_server) -> None:
        server = start_server(
            "--app", "sample_apps:BigReply", "--shutdown-timeout", "0.5", env={"PYTHONPATH": TESTS_DIR}
        )
        with connect(server.address) as sock:
            sock.sendall(b"go")
            assert sock.recv(1)
            started = time.monotonic()
            server.signal(signal.SIGTERM)  # and never read again
            assert server.wait() == 0
            assert time.monotonic() - started < 10
        assert "aborting 1 connections" in server.log

    def test_no_fd_left_behind_while_serving(self, start_server, backend_name: str) -> None:
        psutil = pytest.importorskip("psutil")
        server = start_server("--backend", backend_name)
        process = psutil.Process(server.proc.pid)
        idle = process.num_fds()
        socks = [connect(server.address) for _ in range(50)]
        deadline = time.monotonic() + 10
        while process.num_fds() < idle + 50:
            assert time.monotonic() < deadline, "server never held the 50 connections"
            time.sleep(0.02)
        for sock in socks:
            sock.close()
        while process.num_fds() != idle:
            assert time.monotonic() < deadline, f"{process.num_fds() - idle} fds leaked"
            time.sleep(0.02)


def test_console_script() -> None:
    script = shutil.which("pollserve", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the pollserve script is not installed next to this interpreter")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert re.fullmatch(r"pollserve \d+\.\d+\.\d+\n", result.stdout)
