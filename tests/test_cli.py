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
from conftest import AVAILABLE, TESTED_BUILD
from sample_apps import BIG_REPLY_SIZE, big_reply
from serverproc import run_pollserve
from statsclient import get_stats

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

    @pytest.mark.parametrize("where", ["flag", "env"])
    def test_unknown_backend_is_one_line(self, where: str) -> None:
        """Checked by the registry, not argparse choices (which cannot list plugins or MODULE:CLASS)."""
        if where == "flag":
            result = run_pollserve("--backend", "iocp", "--port", "0")
        else:
            result = run_pollserve("--port", "0", env={"POLLSERVE_BACKEND": "iocp"})
        assert result.returncode == 2
        known = ", ".join(["auto", *BACKENDS])
        source = "POLLSERVE_BACKEND=iocp: " if where == "env" else ""  # the user may not know it is set
        assert result.stderr.strip() == f"pollserve: {source}unknown backend 'iocp' (known: {known}; or MODULE:CLASS)"

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
        assert len(lines) == 1 and lines[0].startswith(f"pollserve: cannot listen on 127.0.0.1:{port} (--port): ")
        if sys.platform.startswith("linux"):
            assert lines[0].endswith(": Address already in use")

    def test_bad_port_is_one_line(self) -> None:
        result = run_pollserve("--port", "70000")
        assert result.returncode == 2
        assert result.stderr.strip() == "pollserve: --port 70000 is out of range 0-65535"


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
        # The least of a few readings: the server reads its own fd count through /proc once a
        # second (stats.py), an fd that one reading can catch open, after which idle + 50 never comes.
        readings = []
        for _ in range(5):
            readings.append(process.num_fds())
            time.sleep(0.03)
        idle = min(readings)
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
    assert re.fullmatch(r"pollserve \d+\.\d+\.\d+ \((compiled|pure Python)\)\n", result.stdout)
    assert result.stdout.endswith(f"({TESTED_BUILD})\n")  # the script runs the installed build


def one_line(result, status: int) -> str:
    """The single stderr line of a command that failed with `status`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr
    assert len(lines) == 1, result.stderr
    assert_no_traceback(result.stderr)
    return lines[0]


class TestOneLineErrors:
    def test_stats_url_at_the_apps_port_says_what_it_found(self, start_server) -> None:
        server = start_server()
        line = one_line(run_pollserve("stats", "--url", f"http://127.0.0.1:{server.port}"), 1)
        assert "answered, but not with HTTP: is this the app's port rather than --stats-port?" in line, line

    @pytest.mark.parametrize("url", ["not a url", "http://127.0.0.1:abc", "http://[::1", "ftp://127.0.0.1:1"])
    def test_malformed_stats_url_is_exit_2(self, url: str) -> None:
        line = one_line(run_pollserve("stats", "--url", url), 2)
        assert line.startswith("pollserve: ") and "URL" in line, line

    @pytest.mark.parametrize("pid", ["-5", "0"])
    def test_impossible_pid_is_exit_2(self, pid: str) -> None:
        line = one_line(run_pollserve("stats", "--pid", pid), 2)
        assert f"--pid {pid}" in line, line

    @pytest.mark.parametrize(
        "args",
        [
            ["--shutdown-timeout", "nan"],
            ["--shutdown-timeout", "-1"],
            ["--shutdown-timeout", "inf"],
            ["--stats-interval", "nan"],
            ["--stats-interval", "0"],
            ["--idle-timeout", "inf"],
            ["--max-fds", "0"],
        ],
    )
    def test_numeric_options_are_checked(self, args: list[str]) -> None:
        line = one_line(run_pollserve("--port", "0", *args), 2)
        assert args[0] in line, line

    @pytest.mark.parametrize("value", ["nan", "0", "-1", "inf"])
    def test_watch_is_checked(self, value: str) -> None:
        line = one_line(run_pollserve("stats", "--pid", str(os.getpid()), "--watch", value), 2)
        assert "--watch" in line, line

    def test_equal_ports_are_refused_before_binding(self) -> None:
        with socket.create_server(("127.0.0.1", 0)) as probe:
            port = str(probe.getsockname()[1])
        line = one_line(run_pollserve("--port", port, "--stats-port", port), 2)
        assert line == f"pollserve: --port and --stats-port are both {port}; give the stats endpoint a port of its own"
        # A wildcard address shares its port with every other address of the host.
        line = one_line(run_pollserve("--host", "0.0.0.0", "--port", port, "--stats-port", port), 2)
        assert "give the stats endpoint a port of its own" in line, line

    def test_equal_ports_on_two_specific_addresses_both_serve(self, start_server) -> None:
        if not socket.has_ipv6:
            pytest.skip("no IPv6 here")
        with socket.create_server(("127.0.0.1", 0)) as probe:
            port = probe.getsockname()[1]
        try:
            socket.create_server(("::1", port), family=socket.AF_INET6).close()
        except OSError as exc:
            pytest.skip(f"cannot bind [::1]:{port}: {exc}")
        server = start_server("--port", str(port), "--stats-port", str(port), "--stats-host", "::1")
        assert request_rounds(("127.0.0.1", port), 1, 1, b"hi", b"Hello world\n") == 1
        assert get_stats(("::1", port))["pid"] == server.proc.pid

    def test_bind_errors_name_the_option(self) -> None:
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            line = one_line(run_pollserve("--port", "0", "--stats-port", str(port)), 1)
        assert line.startswith(f"pollserve: cannot listen on 127.0.0.1:{port} (--stats-port): "), line

    def test_server_options_with_a_subcommand_are_an_error(self) -> None:
        line = one_line(run_pollserve("--port", "0", "backends"), 2)
        assert "--port" in line and "backends" in line, line
        # Given at its default value, an option is still given: the user meant something by it.
        line = one_line(run_pollserve("--port", "5001", "--host", "127.0.0.1", "backends"), 2)
        assert line == "pollserve: --host, --port apply to the server, not to 'pollserve backends'", line

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["stats", "--pid", "abc"], "pollserve stats: error: argument --pid: invalid int value: 'abc'"),
            (["stats"], "pollserve stats: error: one of the arguments --pid --url is required"),
            (["bench", "--rate"], "pollserve bench: error: argument --rate: expected one argument"),
        ],
    )
    def test_a_command_usage_error_names_the_command(self, args: list[str], message: str) -> None:
        result = run_pollserve(*args)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert lines[-1] == message, result.stderr
        assert len(lines) <= 3 and lines[0].startswith(f"usage: pollserve {args[0]} "), result.stderr

    @pytest.mark.parametrize("host", ["[::1", "::1]", "[]", "[[::1]]"])
    def test_a_malformed_bracketed_host_is_a_usage_error(self, host: str) -> None:
        line = one_line(run_pollserve("--host", host, "--port", "0"), 2)
        assert line.startswith(f"pollserve: --host {host!r} is not a host name or address"), line

    def test_usage_error_ends_with_the_one_line_error(self) -> None:
        result = run_pollserve("--log-level", "nope")
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("pollserve: error: argument --log-level: invalid choice: 'nope'"), result.stderr
        assert len(lines) <= 3, result.stderr  # a short usage line, not the whole synopsis

    def test_factory_returning_a_non_protocol_closes_the_connection_once_per_episode(self, start_server) -> None:
        server = start_server("--app", "sample_apps:not_a_protocol", env={"PYTHONPATH": TESTS_DIR})
        for _ in range(5):
            with connect(server.address) as sock:
                assert recv_until_eof(sock) == b""  # closed at once (a client that had sent bytes gets a reset)
        server.wait_for_log(r"app 'sample_apps:not_a_protocol' returned int \(42\), not a protocol")
        assert sum("not a protocol" in line for line in server.lines) == 1, server.log
        assert_no_traceback(server.log)
        assert server.alive()


class TestAddresses:
    def test_bracketed_ipv6_host_is_accepted(self, start_server) -> None:
        try:
            socket.create_server(("::1", 0), family=socket.AF_INET6).close()
        except OSError as exc:
            pytest.skip(f"no IPv6 loopback here: {exc}")
        server = start_server("--host", "[::1]")
        assert server.host == "::1"
        assert request_rounds(server.address, 2, 2, b"v6", HELLO) == 4

    def test_localhost_binds_every_address(self, start_server) -> None:
        addresses = {info[4][0] for info in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)}
        if not {"127.0.0.1", "::1"} <= addresses:
            pytest.skip(f"localhost is not both 127.0.0.1 and ::1 here: {sorted(addresses)}")
        try:
            socket.create_server(("::1", 0), family=socket.AF_INET6).close()
        except OSError as exc:
            pytest.skip(f"no IPv6 loopback here: {exc}")
        server = start_server("--host", "localhost")
        assert sum("listening on" in line for line in server.lines) == 1
        also = server.wait_for_log(r"also on (\S+)")
        for host in ("127.0.0.1", "::1"):
            assert request_rounds((host, server.port), 2, 2, b"hi", HELLO) == 4
        assert str(server.port) in also[1]


@pytest.mark.skipif(not POSIX, reason="signals are POSIX")
class TestSignalsAndLogs:
    def test_sighup_reloads_and_keeps_serving(self, start_server) -> None:
        server = start_server()
        server.signal(signal.SIGHUP)
        server.wait_for_log(r"INFO SIGHUP: reload: nothing to reload; still serving")
        assert request_rounds(server.address, 2, 2, b"hi", HELLO) == 4
        server.signal(signal.SIGTERM)
        assert server.wait() == 0

    def test_debug_logs_each_connection(self, start_server) -> None:
        server = start_server("--log-level", "debug", "--app", "echo")
        with connect(server.address) as sock:
            sock.sendall(b"12345")
            assert recv_exactly(sock, 5) == b"12345"
        found = server.wait_for_log(r"DEBUG app: accepted 127\.0\.0\.1:(\d+) \(fd (\d+)\)")
        closed = server.wait_for_log(
            rf"DEBUG app: closed 127\.0\.0\.1:{found[1]} \(fd {found[2]}\) after [\d.]+ s, 5 bytes in, 5 bytes out: "
            r"the client closed"
        )
        assert closed
        failing = start_server(
            "--log-level", "debug", "--app", "sample_apps:FailsOnData", env={"PYTHONPATH": TESTS_DIR}
        )
        with connect(failing.address) as sock:
            sock.sendall(b"x")
            assert recv_until_eof(sock) == b""
        # The read that ended in the app's exception is counted in the connection's closing line.
        failing.wait_for_log(
            r"DEBUG app: closed 127\.0\.0\.1:\d+ \(fd \d+\) after [\d.]+ s, 1 bytes in, 0 bytes out: "
            r"ValueError: app bug"
        )
        quiet = start_server("--app", "echo")
        with connect(quiet.address) as sock:
            sock.sendall(b"x")
            recv_exactly(sock, 1)
        assert not any("DEBUG" in line for line in quiet.lines)
