"""End to end: ``pollserve --unix PATH``, the real command over real UNIX stream sockets.

Every socket path is under the test's tmp_path; every server is stopped by its PID at teardown.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import sys
import threading
from pathlib import Path

import psutil
import pytest
from clients import connect, recv_exactly
from serverproc import run_pollserve
from statsclient import get_stats, stats_address, wait_for

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or not hasattr(socket, "AF_UNIX"),
    reason="UNIX domain socket listeners and their files are POSIX here",
)

HELLO = b"Hello world\n"


def unix_connect(path: Path | str, timeout: float = 10) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except BaseException:
        sock.close()
        raise
    return sock


def hello_over_unix(path: Path | str) -> bytes:
    with unix_connect(path) as sock:
        sock.sendall(b"ping")
        return recv_exactly(sock, len(HELLO))


def echo_over_unix(path: Path | str, payload: bytes) -> bytes:
    """Send while reading: an echo larger than the socket buffers needs both at once."""
    with unix_connect(path, timeout=60) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        reply = recv_exactly(sock, len(payload))
        sender.join(30)
        return reply


def stale_socket_file(path: Path) -> None:
    """What a crashed server leaves: a bound socket's file with nothing listening on it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def listening_lines(server) -> list[str]:
    return [line for line in server.lines if "listening on" in line]


def tcp_listeners(pid: int) -> list:
    return [conn for conn in psutil.Process(pid).net_connections("inet") if conn.status == psutil.CONN_LISTEN]


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


class TestServing:
    def test_unix_alone_says_so_in_the_one_listening_line_and_binds_no_tcp(self, start_server, tmp_path) -> None:
        path = tmp_path / "s.sock"
        server = start_server("--unix", str(path))
        assert server.unix_path == str(path)
        assert [line.split(" INFO ", 1)[1] for line in listening_lines(server)] == [
            f"listening on unix:{path} (backend {server.backend}, app hello)"
        ]
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert tcp_listeners(server.proc.pid) == []  # not the default port 5001, nor any other

    def test_hello(self, start_server, tmp_path, backend_name: str) -> None:
        path = tmp_path / "s.sock"
        server = start_server("--unix", str(path), "--backend", backend_name)
        assert server.backend == backend_name
        for _ in range(3):
            assert hello_over_unix(path) == HELLO
        assert server.alive()

    def test_echo_returns_1_mib_byte_for_byte(self, start_server, tmp_path) -> None:
        path = tmp_path / "s.sock"
        start_server("--unix", str(path), "--app", "echo")
        payload = os.urandom(1 << 20)
        assert echo_over_unix(path, payload) == payload

    def test_stats_endpoint_counts_unix_clients(self, start_server, tmp_path) -> None:
        path = tmp_path / "s.sock"
        server = start_server("--unix", str(path), "--app", "echo", "--stats-port", "0")
        for _ in range(3):
            assert echo_over_unix(path, b"12345") == b"12345"
        address = stats_address(server)
        wait_for(lambda: get_stats(address)["connections_closed"] == 3, what="3 closed connections")
        stats = get_stats(address)
        assert stats["connections_accepted"] == 3 and stats["connections_open"] == 0
        assert stats["bytes_in"] == stats["bytes_out"] == 15

    def test_connection_limit_refuses_the_excess(self, start_server, tmp_path) -> None:
        path = tmp_path / "s.sock"
        server = start_server("--unix", str(path), "--max-connections", "1", "--stats-port", "0")
        with unix_connect(path) as held:
            held.sendall(b"x")
            assert recv_exactly(held, len(HELLO)) == HELLO
            # Accepted and closed at once: EOF, or a reset.
            with unix_connect(path) as refused, contextlib.suppress(ConnectionResetError):
                assert refused.recv(100) == b""
        assert get_stats(stats_address(server))["connections_refused"] == 1

    def test_idle_timeout_closes_a_silent_client(self, start_server, tmp_path) -> None:
        path = tmp_path / "s.sock"
        server = start_server("--unix", str(path), "--idle-timeout", "0.3")
        with unix_connect(path) as sock:
            assert sock.recv(100) == b""  # within 1.25 timeouts, far below the socket's 10 s
        assert server.alive()
        assert hello_over_unix(path) == HELLO

    def test_debug_logs_cope_with_an_unnamed_peer(self, start_server, tmp_path) -> None:
        path = tmp_path / "s.sock"
        server = start_server("--unix", str(path), "--app", "echo", "--log-level", "debug")
        assert echo_over_unix(path, b"12345") == b"12345"
        accepted = server.wait_for_log(r"DEBUG app: accepted unix \(fd (\d+)\)$")
        server.wait_for_log(
            rf"DEBUG app: closed unix \(fd {accepted[1]}\) after [\d.]+ s, 5 bytes in, 5 bytes out: the client closed"
        )
        assert "Traceback" not in server.log


class TestBesideTcp:
    def test_listening_line_names_tcp_and_the_path_has_a_line_of_its_own(self, start_server, tmp_path) -> None:
        path = tmp_path / "s.sock"
        server = start_server("--unix", str(path), "--port", "0")
        assert server.host == "127.0.0.1" and server.match["unix"] is None
        assert len(listening_lines(server)) == 1
        assert f"listening on 127.0.0.1:{server.port} " in listening_lines(server)[0]
        server.wait_for_log(rf"INFO also on unix:{re.escape(str(path))}$")
        path_lines = [line for line in server.lines if f"unix:{path}" in line]
        assert len(path_lines) == 1 and "listening on" not in path_lines[0], server.log
        assert hello_over_unix(path) == HELLO
        with connect(server.address) as sock:
            sock.sendall(b"ping")
            assert recv_exactly(sock, len(HELLO)) == HELLO


@pytest.mark.skipif(sys.platform == "win32", reason="signals are POSIX")
class TestShutdown:
    def test_sigterm_removes_the_file_and_exits_0(self, start_server, tmp_path) -> None:
        path = tmp_path / "s.sock"
        server = start_server("--unix", str(path), "--app", "echo")
        with unix_connect(path) as client:
            client.sendall(b"before")
            assert recv_exactly(client, 6) == b"before"
            server.signal(signal.SIGTERM)
            assert client.recv(100) == b""  # drained and closed by the shutdown
        assert server.wait() == 0
        assert not os.path.lexists(path)
        assert any("stopped: 1 connections accepted" in line for line in server.lines), server.log

    def test_a_file_replaced_meanwhile_is_left_to_its_new_owner(self, start_server, tmp_path) -> None:
        path = tmp_path / "s.sock"
        first = start_server("--unix", str(path))
        os.unlink(path)  # as an operator might, to start a second server on the same path
        second = start_server("--unix", str(path))
        first.signal(signal.SIGTERM)
        assert first.wait() == 0
        assert stat.S_ISSOCK(os.lstat(path).st_mode), "the first server removed the second one's socket"
        assert hello_over_unix(path) == HELLO
        second.signal(signal.SIGTERM)
        assert second.wait() == 0
        assert not os.path.lexists(path)


class TestExistingPaths:
    def test_a_stale_socket_file_is_replaced(self, start_server, tmp_path) -> None:
        path = tmp_path / "s.sock"
        stale_socket_file(path)  # bind() alone would fail on it with EADDRINUSE
        server = start_server("--unix", str(path))
        assert hello_over_unix(path) == HELLO
        assert server.alive()

    def test_a_live_servers_socket_is_refused_and_left_serving(self, start_server, tmp_path) -> None:
        path = tmp_path / "s.sock"
        live = start_server("--unix", str(path))
        result = run_pollserve("--unix", str(path))
        assert result.returncode == 1
        line = one_error_line(result)
        assert line == f"pollserve: cannot listen on unix:{path} (--unix): a server is answering there", line
        assert live.alive() and hello_over_unix(path) == HELLO

    @pytest.mark.parametrize("kind", ["regular file", "directory", "symlink to a regular file"])
    def test_a_path_that_is_not_a_socket_is_never_removed(self, tmp_path, kind: str) -> None:
        path = tmp_path / "s.sock"
        kept = tmp_path / "data.txt"
        kept.write_text("keep me")
        if kind == "regular file":
            path = kept
        elif kind == "directory":
            path.mkdir()
        else:
            path.symlink_to(kept)
        result = run_pollserve("--unix", str(path))
        assert result.returncode == 1
        line = one_error_line(result)
        assert line.startswith(f"pollserve: cannot listen on unix:{path} (--unix): "), line
        assert "not a socket; not removing it" in line
        assert os.path.lexists(path) and kept.read_text() == "keep me"

    def test_a_missing_directory_is_one_line_exit_1(self, tmp_path) -> None:
        path = tmp_path / "no" / "such" / "s.sock"
        result = run_pollserve("--unix", str(path))
        assert result.returncode == 1
        assert one_error_line(result).startswith(f"pollserve: cannot listen on unix:{path} (--unix): ")


class TestMode:
    @pytest.mark.parametrize(("given", "mode"), [("600", 0o600), ("0666", 0o666), ("660", 0o660)])
    def test_unix_mode_is_applied(self, start_server, tmp_path, given: str, mode: int) -> None:
        path = tmp_path / "s.sock"
        start_server("--unix", str(path), "--unix-mode", given)
        assert stat.S_IMODE(os.lstat(path).st_mode) == mode
        assert hello_over_unix(path) == HELLO  # the owner can still connect

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--unix-mode", "9x"], "--unix-mode needs octal permissions such as 660, not '9x'"),
            (["--unix-mode", "17777"], "--unix-mode needs octal permissions such as 660, not '17777'"),
            (["--unix-mode", "-1"], "--unix-mode needs octal permissions such as 660, not '-1'"),
            (["--unix-mode", ""], "--unix-mode needs octal permissions such as 660, not ''"),
            (["--unix-mode", "660", "NO-UNIX"], "--unix-mode applies to the --unix socket; give --unix PATH too"),
            (["--unix", ""], "--unix needs a path"),
        ],
    )
    def test_bad_options_are_one_line_exit_2(self, tmp_path, args: list[str], message: str) -> None:
        if "NO-UNIX" in args:
            args = [arg for arg in args if arg != "NO-UNIX"]
        elif "--unix" not in args:
            args = ["--unix", str(tmp_path / "s.sock"), *args]
        result = run_pollserve(*args, "--port", "0")
        assert result.returncode == 2
        assert one_error_line(result) == f"pollserve: {message}"
        assert not (tmp_path / "s.sock").exists()

    def test_unix_with_a_command_is_an_error(self, tmp_path) -> None:
        result = run_pollserve("--unix", str(tmp_path / "s.sock"), "backends")
        assert result.returncode == 2
        assert one_error_line(result) == "pollserve: --unix applies to the server, not to 'pollserve backends'"


def test_workers_share_the_unix_socket_and_the_parent_removes_it(start_server, tmp_path) -> None:
    path = tmp_path / "app.sock"
    server = start_server("--unix", str(path), "--workers", "2", "--stats-port", "0")
    assert server.unix_path == str(path)
    stats = stats_address(server)
    wait_for(lambda: len(get_stats(stats)["workers"]) == 2, what="two workers reporting")
    for _ in range(10):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(b"hi")
            assert recv_exactly(sock, 12) == b"Hello world\n"
    # The workers report once a second: the parent's sum reaches the ten served.
    wait_for(lambda: get_stats(stats)["connections_accepted"] == 10, what="ten connections in the sum")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert not path.exists()
