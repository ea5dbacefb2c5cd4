"""The Windows path, proven on Linux: the server under an interpreter with Windows' constraints.

The subprocesses run with POLLSERVE_TEST_EMULATE=windows (tests/emulation/windows_emulation.py):
no fcntl, no resource, a select module with select() alone, which takes sockets
only, set_wakeup_fd taking sockets only, and no SIGUSR1.  It is an EMULATION: it
does not make sys.platform "win32", so Windows-only branches are left to the
Windows CI job.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys

import pytest
from clients import exchange, request_rounds
from serverproc import pollserve_env, run_pollserve

from pollserve.loop import EventLoop

#: auto (unset POLLSERVE_BACKEND), which must find select alone
WINDOWS_EMULATION = {"POLLSERVE_TEST_EMULATE": "windows", "POLLSERVE_BACKEND": ""}

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="on Windows the real thing is tested")


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env=pollserve_env(WINDOWS_EMULATION),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_emulation_is_in_force() -> None:
    result = python(
        "import select, signal\n"
        "for name in ('fcntl', 'resource'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError:\n"
        "        print(name, 'missing')\n"
        "print([n for n in ('poll', 'epoll', 'devpoll', 'kqueue', 'POLLIN') if hasattr(select, n)])\n"
        "print(hasattr(signal, 'SIGUSR1'))\n"
        "import os\n"
        "r, w = os.pipe()\n"
        "try:\n"
        "    select.select([r], [], [], 0)\n"
        "except OSError as exc:\n"
        "    print('pipe refused', exc.errno)\n"
    )
    assert result.stdout.split("\n")[:5] == ["fcntl missing", "resource missing", "[]", "False", "pipe refused 10038"]


def test_import_and_only_select_is_available() -> None:
    result = python("import pollserve, pollserve.stats; print(pollserve.available_backends())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['select']"


def test_backends_command() -> None:
    result = run_pollserve("backends", env=WINDOWS_EMULATION)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:]}
    assert rows == {"epoll": "no", "kqueue": "no", "devpoll": "no", "poll": "no", "select": "yes"}
    assert "<- auto" in next(line for line in result.stdout.splitlines() if line.startswith("select"))


def test_missing_backend_message() -> None:
    result = run_pollserve("--backend", "epoll", "--port", "0", env=WINDOWS_EMULATION)
    assert result.returncode == 2
    assert result.stderr.strip() == "pollserve: backend 'epoll' is not available on this system (available: select)"


def test_server_end_to_end(start_server) -> None:
    """Serving, a large echo, stats and a clean SIGTERM -- every fd select sees must be a socket,
    so this also proves the loop's wakeup channel and signal wakeup fd are sockets."""
    server = start_server("--app", "echo", "--stats-port", "0", env=WINDOWS_EMULATION)
    assert server.backend == "select"
    assert request_rounds(server.address, 20, 5, b"ping", b"ping") == 100
    payload = os.urandom(1 << 20)
    assert exchange(server.address, payload, len(payload)) == payload
    found = server.wait_for_log(r"stats on http://127\.0\.0\.1:(\d+)")
    with socket.create_connection(("127.0.0.1", int(found[1])), timeout=10) as sock:
        sock.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200 OK")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert "Traceback" not in server.log and "stopped:" in server.log


def test_wakeup_channel_is_a_socketpair() -> None:
    loop = EventLoop("select")
    try:
        loop.add_signal_handler(signal.SIGTERM, loop.stop)
        wakeup_fd = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(wakeup_fd)
        assert stat.S_ISSOCK(os.fstat(wakeup_fd).st_mode)
        for fd in loop.backend._interest:
            assert stat.S_ISSOCK(os.fstat(fd).st_mode)
    finally:
        loop.close()
