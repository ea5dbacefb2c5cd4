"""systemd socket activation and notification: pollserve started the way systemd starts it.

systemd binds the sockets, puts them on fds 3, 4, ... of the service, sets LISTEN_PID to the
service's own pid, LISTEN_FDS and LISTEN_FDNAMES (sd_listen_fds(3)), and listens on the datagram
socket named by NOTIFY_SOCKET (sd_notify(3)).  A test cannot know the child's pid before it
exists, so a small launcher takes systemd's part in the child: it moves the passed fds onto 3, 4,
..., sets LISTEN_PID to its own pid and execs ``python -m pollserve`` -- exec keeps the pid.
(A preexec_fn cannot do the moving: subprocess closes every fd not in pass_fds after it runs.)
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from clients import connect, recv_exactly
from serverproc import pollserve_env
from statsclient import get_stats, wait_for

from pollserve import systemd

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or not hasattr(socket, "AF_UNIX"), reason="systemd and its AF_UNIX sockets are POSIX"
)

HELLO = b"Hello world\n"

LAUNCHER = """
import fcntl, os, sys
fds = [int(fd) for fd in os.environ.pop("TEST_PASS_FDS").split(",") if fd]
# Out of the way first: a passed fd may sit on 3 or 4 already.
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + len(fds)) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(moved):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ["LISTEN_PID"] = os.environ.pop("TEST_LISTEN_PID", "") or str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "pollserve", *sys.argv[1:]])
"""

#: an app that answers with what a child of the server would inherit: the variables, and fd 3
ENV_APP = """
import json, os
from pollserve import Protocol

class Inherited(Protocol):
    def data_received(self, data):
        names = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET")
        report = {name: os.environ.get(name) for name in names}
        report["fd 3 inheritable"] = os.get_inheritable(3)
        self.transport.write(json.dumps(report).encode() + b"\\n")
"""


def tcp_listener() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0))


def unix_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    return sock


def start_activated(start_server, passed: list[socket.socket], *args: str, env: dict[str, str] | None = None):
    """pollserve with ``passed`` on fds 3, 4, ...; the test's copies are closed once it serves, so
    that every connection afterwards can only be accepted by the server."""
    fds = tuple(sock.fileno() for sock in passed)
    environment = {"TEST_PASS_FDS": ",".join(map(str, fds)), "LISTEN_FDS": str(len(passed)), **(env or {})}
    try:
        return start_server(*args, env=environment, launcher=[sys.executable, "-c", LAUNCHER], pass_fds=fds)
    finally:
        for sock in passed:
            sock.close()


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"EOF after {line!r}")
        line += chunk
    return line


def hello(address) -> bytes:
    with connect(address) as sock:
        sock.sendall(b"ping")
        return recv_exactly(sock, len(HELLO))


@pytest.fixture
def notify_socket(tmp_path: Path):
    """The datagram socket systemd listens on for sd_notify messages."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(15)
    yield sock
    sock.close()


def receive(notify: socket.socket) -> dict[str, str]:
    message = notify.recv(4096).decode()
    return dict(line.split("=", 1) for line in message.splitlines())


class TestActivation:
    def test_serves_on_the_passed_sockets_and_tells_systemd(self, start_server, tmp_path, notify_socket) -> None:
        app, stats = tcp_listener(), tcp_listener()
        app_port, stats_port = app.getsockname()[1], stats.getsockname()[1]
        never = tmp_path / "never.sock"
        with tcp_listener() as taken:  # --port names a port in use: binding it would fail
            server = start_activated(
                start_server,
                [app, stats],
                "--host", "127.0.0.1", "--port", str(taken.getsockname()[1]), "--unix", str(never),
                "--stats-port", "0",
                env={"LISTEN_FDNAMES": "app:stats", "NOTIFY_SOCKET": notify_socket.getsockname()},
            )  # fmt: skip
            ready = receive(notify_socket)
        # The line was in the pipe before the datagram was sent: the reader has it at once.
        server.wait_for_log(rf"listening on 127\.0\.0\.1:{app_port} \(backend", timeout=2)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(server.proc.pid)
        assert ready["STATUS"] == f"serving on 127.0.0.1:{app_port}"
        assert server.port == app_port
        assert len([line for line in server.lines if "listening on" in line]) == 1
        server.wait_for_log(
            rf"INFO socket activation: serving on the sockets systemd passed \(app 127\.0\.0\.1:{app_port}, "
            rf"stats 127\.0\.0\.1:{stats_port}\); --host, --port, --unix, --stats-host and --stats-port are ignored$"
        )
        server.wait_for_log(rf"INFO stats on http://127\.0\.0\.1:{stats_port}$")
        assert not never.exists()

        assert hello(("127.0.0.1", app_port)) == HELLO
        figures = get_stats(("127.0.0.1", stats_port))
        assert figures["connections_accepted"] == 1 and figures["pid"] == server.proc.pid

        server.signal(signal.SIGTERM)
        stopping = receive(notify_socket)
        assert stopping["STOPPING"] == "1"
        assert server.wait() == 0
        assert "Traceback" not in server.log

    def test_unnamed_sockets_all_serve_the_app(self, start_server) -> None:
        first, second = tcp_listener(), tcp_listener()
        ports = [first.getsockname()[1], second.getsockname()[1]]
        server = start_activated(start_server, [first, second])
        assert server.port == ports[0]
        server.wait_for_log(rf"also on 127\.0\.0\.1:{ports[1]}$")
        for port in ports:
            assert hello(("127.0.0.1", port)) == HELLO
        assert not any("stats on" in line for line in server.lines)

    def test_a_passed_unix_socket_is_served_and_left_to_systemd(self, start_server, tmp_path) -> None:
        path = tmp_path / "app.sock"
        server = start_activated(start_server, [unix_listener(path)], env={"LISTEN_FDNAMES": "pollserve.socket"})
        assert server.unix_path == str(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(b"ping")
            assert recv_exactly(sock, len(HELLO)) == HELLO
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        assert path.exists()  # systemd's socket: removing it is systemd's business (RemoveOnStop=)

    def test_children_inherit_neither_the_variables_nor_the_sockets(self, start_server, tmp_path, notify_socket):
        (tmp_path / "envapp.py").write_text(ENV_APP)
        app = tcp_listener()
        port = app.getsockname()[1]
        start_activated(
            start_server,
            [app],
            "--app", "envapp:Inherited",
            env={"PYTHONPATH": str(tmp_path), "LISTEN_FDNAMES": "app", "NOTIFY_SOCKET": notify_socket.getsockname()},
        )  # fmt: skip
        with connect(("127.0.0.1", port)) as sock:
            sock.sendall(b"?")
            report = read_line(sock)
        assert report == (
            b'{"LISTEN_PID": null, "LISTEN_FDS": null, "LISTEN_FDNAMES": null, "NOTIFY_SOCKET": null, '
            b'"fd 3 inheritable": false}\n'
        )


class TestNotActivated:
    def test_variables_for_another_process_are_ignored(self, start_server) -> None:
        app = tcp_listener()
        port = app.getsockname()[1]
        server = start_activated(start_server, [app], env={"TEST_LISTEN_PID": "1", "LISTEN_FDNAMES": "app"})
        assert server.port != port  # it bound --port 0 itself
        assert hello(server.address) == HELLO
        assert not any("socket activation" in line for line in server.lines)
        with connect(("127.0.0.1", port), timeout=0.5) as sock:  # queued by the kernel, never accepted
            sock.sendall(b"ping")
            with pytest.raises(TimeoutError):
                sock.recv(100)

    @pytest.mark.parametrize(
        ("env", "warning"),
        [
            ({"LISTEN_FDS": "two"}, "LISTEN_FDS='two' is not a number of fds; ignoring socket activation"),
            ({"TEST_LISTEN_PID": "me"}, "LISTEN_PID='me' is not a process id; ignoring socket activation"),
        ],
    )
    def test_a_malformed_value_is_one_warning(self, start_server, env: dict[str, str], warning: str) -> None:
        server = start_activated(start_server, [tcp_listener()], env=env)
        assert hello(server.address) == HELLO  # on --port 0, bound as usual
        warnings = [line for line in server.lines if "WARNING" in line]
        assert len(warnings) == 1 and warnings[0].endswith(f"WARNING {warning}"), server.log

    def test_a_socket_that_is_not_listening_is_one_line_exit_1(self, tmp_path) -> None:
        bound = socket.socket()
        bound.bind(("127.0.0.1", 0))
        with bound:
            result = subprocess_activated(tmp_path, [bound])
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert lines == ["pollserve: socket activation: fd 3 (unknown) cannot be served on: fd 3 is not listening"]

    def test_only_a_stats_socket_is_one_line_exit_1(self, tmp_path) -> None:
        result = subprocess_activated(tmp_path, [tcp_listener()], LISTEN_FDNAMES="stats")
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            "pollserve: socket activation: every socket systemd passed is named 'stats'; none is for the app"
        ]


def subprocess_activated(tmp_path: Path, passed: list[socket.socket], **env: str):
    """Run an activated pollserve that is expected to exit by itself."""
    fds = tuple(sock.fileno() for sock in passed)
    environment = pollserve_env({"TEST_PASS_FDS": ",".join(map(str, fds)), "LISTEN_FDS": str(len(fds)), **env})
    try:
        return subprocess.run(
            [sys.executable, "-c", LAUNCHER, "--port", "0"],
            env=environment,
            pass_fds=fds,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        for sock in passed:
            sock.close()


class TestNotifyFailure:
    def test_an_unreachable_notify_socket_is_one_warning_and_serving_goes_on(self, start_server, tmp_path) -> None:
        missing = tmp_path / "gone.sock"
        server = start_activated(start_server, [tcp_listener()], env={"NOTIFY_SOCKET": str(missing)})
        assert hello(server.address) == HELLO
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        warnings = [line for line in server.lines if "WARNING" in line]
        assert len(warnings) == 1 and f"cannot notify systemd at {missing}: " in warnings[0], server.log


# -- the parsing, without processes ----------------------------------------------------------------

PID = 4242


class TestParseListenEnvironment:
    def test_nothing_without_listen_pid(self) -> None:
        assert systemd.parse_listen_environment({"LISTEN_FDS": "2"}, PID) == ([], None)

    def test_named_fds_from_3(self) -> None:
        environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": "3", "LISTEN_FDNAMES": "app:stats:app"}
        assert systemd.parse_listen_environment(environ, PID) == ([(3, "app"), (4, "stats"), (5, "app")], None)

    def test_unnamed_fds_are_unknown(self) -> None:
        environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": "2"}
        assert systemd.parse_listen_environment(environ, PID) == ([(3, "unknown"), (4, "unknown")], None)

    def test_another_pid_is_silently_not_ours(self) -> None:
        environ = {"LISTEN_PID": str(PID + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "app"}
        assert systemd.parse_listen_environment(environ, PID) == ([], None)

    def test_zero_fds_is_nothing(self) -> None:
        assert systemd.parse_listen_environment({"LISTEN_PID": str(PID), "LISTEN_FDS": "0"}, PID) == ([], None)

    @pytest.mark.parametrize(
        ("environ", "variable"),
        [
            ({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, "LISTEN_PID='x'"),
            ({"LISTEN_PID": "", "LISTEN_FDS": "1"}, "LISTEN_PID=''"),
            ({"LISTEN_PID": str(PID)}, "LISTEN_FDS is not set"),
            ({"LISTEN_PID": str(PID), "LISTEN_FDS": "-1"}, "LISTEN_FDS='-1'"),
            ({"LISTEN_PID": str(PID), "LISTEN_FDS": "1.5"}, "LISTEN_FDS='1.5'"),
            ({"LISTEN_PID": str(PID), "LISTEN_FDS": "99999999999"}, "LISTEN_FDS='99999999999'"),
        ],
    )
    def test_a_malformed_value_is_a_warning_and_nothing(self, environ: dict[str, str], variable: str) -> None:
        passed, warning = systemd.parse_listen_environment(environ, PID)
        assert passed == []
        assert warning is not None and variable in warning and "ignoring socket activation" in warning

    def test_names_that_do_not_fit_are_ignored_with_a_warning(self) -> None:
        environ = {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "stats"}
        passed, warning = systemd.parse_listen_environment(environ, PID)
        assert passed == [(3, "unknown"), (4, "unknown")]
        assert warning is not None and "LISTEN_FDNAMES='stats' names 1 sockets but LISTEN_FDS is 2" in warning

    def test_the_variables_are_unset_even_when_not_ours(self) -> None:
        environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "app", "OTHER": "kept"}
        assert systemd.listen_sockets(environ) == []
        assert environ == {"OTHER": "kept"}

    def test_a_malformed_value_is_logged_once(self, caplog) -> None:
        environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "many"}
        with caplog.at_level(logging.WARNING, logger="pollserve"):
            assert systemd.listen_sockets(environ) == []
        assert [record.getMessage() for record in caplog.records] == [
            "LISTEN_FDS='many' is not a number of fds; ignoring socket activation"
        ]
        assert environ == {}


class TestNotifier:
    @pytest.mark.parametrize(
        ("value", "address"),
        [("/run/systemd/notify", "/run/systemd/notify"), ("@sd-notify", "\0sd-notify"), ("@", None), ("x", None)],
    )
    def test_notify_address(self, value: str, address: str | None) -> None:
        assert systemd.notify_address(value) == address

    def test_no_variable_no_notifier(self) -> None:
        assert systemd.Notifier.from_environment({}) is None

    def test_the_variable_is_taken_out_of_the_environment(self, tmp_path) -> None:
        environ = {"NOTIFY_SOCKET": str(tmp_path / "n.sock")}
        notifier = systemd.Notifier.from_environment(environ)
        assert notifier is not None and notifier.address == str(tmp_path / "n.sock")
        assert environ == {}

    def test_messages_arrive_as_one_datagram_each(self, notify_socket) -> None:
        notifier = systemd.Notifier(notify_socket.getsockname())
        assert notifier.ready("serving on 127.0.0.1:5001")
        assert notify_socket.recv(4096) == f"READY=1\nSTATUS=serving on 127.0.0.1:5001\nMAINPID={os.getpid()}".encode()
        assert notifier.stopping("stopping")
        assert notify_socket.recv(4096) == b"STOPPING=1\nSTATUS=stopping"

    @pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the abstract namespace is Linux's (unix(7))")
    def test_an_abstract_address(self) -> None:
        name = f"pollserve-test-{os.getpid()}-{id(self)}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind("\0" + name)
            listener.settimeout(10)
            notifier = systemd.Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
            assert notifier is not None and notifier.notify("READY=1")
            assert listener.recv(100) == b"READY=1"

    def test_failures_are_logged_once_and_never_raised(self, tmp_path, caplog) -> None:
        notifier = systemd.Notifier(str(tmp_path / "nobody.sock"))
        with caplog.at_level(logging.WARNING, logger="pollserve"):
            assert not notifier.ready("serving")
            assert not notifier.stopping("stopping")
        assert len(caplog.records) == 1
        assert caplog.records[0].getMessage().startswith(f"cannot notify systemd at {tmp_path / 'nobody.sock'}: ")


class TestActivationWithWorkers:
    def test_the_workers_share_the_passed_sockets_and_systemd_hears_from_the_parent(
        self, start_server, notify_socket
    ) -> None:
        app, stats = tcp_listener(), tcp_listener()
        app_port, stats_port = app.getsockname()[1], stats.getsockname()[1]
        server = start_activated(
            start_server,
            [app, stats],
            "--workers", "2",
            env={"LISTEN_FDNAMES": "app:stats", "NOTIFY_SOCKET": notify_socket.getsockname()},
        )  # fmt: skip
        ready = receive(notify_socket)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(server.proc.pid)
        assert server.port == app_port
        for _ in range(10):
            assert hello(("127.0.0.1", app_port)) == HELLO
        wait_for(lambda: len(get_stats(("127.0.0.1", stats_port))["workers"]) == 2, what="two workers reporting")
        assert get_stats(("127.0.0.1", stats_port))["pid"] == server.proc.pid
        server.signal(signal.SIGTERM)
        assert receive(notify_socket)["STOPPING"] == "1"
        assert server.wait() == 0
