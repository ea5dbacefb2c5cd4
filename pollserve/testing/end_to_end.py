"""The event loop and the server on the backend under test: the contract, as pollserve uses it.

A backend can pass every check of ``contract`` one call at a time and still
fail where calls interleave: the loop adds and drops WRITE interest on every
partial send, wakes itself from another thread, and sleeps in ``wait()``
between timers.  ``ServerContract`` ends with the real ``pollserve`` command
started in a subprocess with ``--backend MODULE:CLASS``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import pollserve
from pollserve.apps import HELLO_REPLY, Echo, Hello, Protocol
from pollserve.backends import Backend
from pollserve.loop import EventLoop
from pollserve.server import Server

from .contract import KitFixtures, reset

#: the line the server logs once it listens
LISTENING = re.compile(r"listening on (?P<host>[^\s:]+):(?P<port>\d+) \(backend (?P<backend>[^,]+), app ")


def run_until(loop: EventLoop, done: Callable[[], bool], timeout: float = 5) -> None:
    """Run the loop until a callback that made done() true stops it, or timeout seconds pass."""
    guard = loop.call_later(timeout, loop.stop)
    loop.run_forever()
    guard.cancel()
    assert done(), f"{loop.backend.name}: not done after {timeout} s of the loop"


@contextlib.contextmanager
def serving(backend: Backend, factory: Callable[[], Protocol]) -> Iterator[Server]:
    """A Server on 127.0.0.1, port 0, its loop on a background thread; the caller is the client."""
    loop = EventLoop(backend)
    server = Server(loop, factory, "127.0.0.1", 0)
    server.start()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def close_and_stop() -> None:
        server.close()
        loop.stop()

    try:
        yield server
    finally:
        loop.call_soon_threadsafe(close_and_stop)
        thread.join(10)
        assert not thread.is_alive(), f"{backend.name}: the loop did not stop"
        loop.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.01)


def import_root(cls: type) -> Path | None:
    """The folder to put on PYTHONPATH so that another process imports cls by MODULE:CLASS."""
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__file__", None)
    if file is None or cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        return None
    root = Path(file).resolve().parent
    if Path(file).stem == "__init__":
        root = root.parent
    for _ in range(cls.__module__.count(".")):
        root = root.parent
    return root


class LoopContract(KitFixtures):
    """EventLoop on the backend: readers, writers, timers, wakeups."""

    @pytest.fixture
    def loop(self, backend: Backend) -> Iterator[EventLoop]:
        instance = EventLoop(backend)
        yield instance
        instance.close()

    def test_reader_is_called_when_readable(self, loop: EventLoop, pair) -> None:
        a, b = pair
        received = []

        def on_readable() -> None:
            received.append(a.recv(100))
            loop.stop()

        loop.add_reader(a.fileno(), on_readable)
        b.send(b"ping")
        run_until(loop, lambda: received == [b"ping"])

    def test_dropping_the_writer_keeps_the_reader(self, loop: EventLoop, pair) -> None:
        """The connection's path on every partial send: WRITE interest added, then taken away."""
        a, b = pair
        calls: list[str] = []

        def on_writable() -> None:
            calls.append("write")
            loop.remove_writer(a.fileno())
            b.send(b"x")

        def on_readable() -> None:
            calls.append("read:" + a.recv(10).decode())
            loop.stop()

        loop.add_reader(a.fileno(), on_readable)
        loop.add_writer(a.fileno(), on_writable)
        run_until(loop, lambda: calls == ["write", "read:x"])

    def test_reader_sees_the_peer_close(self, loop: EventLoop, pair) -> None:
        a, b = pair
        received = []

        def on_readable() -> None:
            received.append(a.recv(100))
            loop.remove_reader(a.fileno())
            loop.stop()

        loop.add_reader(a.fileno(), on_readable)
        b.close()
        run_until(loop, lambda: received == [b""])
        assert len(loop.backend) == 1  # the loop's own wakeup socket

    def test_many_fds_ready_at_once(self, loop: EventLoop) -> None:
        pairs = [socket.socketpair() for _ in range(50)]
        done: set[int] = set()

        def reader(sock: socket.socket) -> Callable[[], None]:
            def on_readable() -> None:
                sock.recv(10)
                loop.remove_reader(sock.fileno())
                done.add(sock.fileno())
                if len(done) == 25:
                    loop.stop()

            return on_readable

        try:
            for a, _ in pairs:
                loop.add_reader(a.fileno(), reader(a))
            for _, b in pairs[::2]:
                b.send(b"x")
            run_until(loop, lambda: done == {a.fileno() for a, _ in pairs[::2]})
        finally:
            for a, b in pairs:
                loop.remove_reader(a.fileno())
                a.close()
                b.close()

    def test_timers_wait_in_the_backend(self, loop: EventLoop, pair) -> None:
        """A timer 0.2 s away is one wait, not a busy loop, and does not fire early."""
        loop.add_reader(pair[0].fileno(), lambda: None)
        fired: list[float] = []
        started = time.monotonic()

        def fire() -> None:
            fired.append(time.monotonic() - started)
            loop.stop()

        loop.call_later(0.2, fire)
        run_until(loop, lambda: bool(fired))
        assert fired[0] >= 0.19, f"the timer fired after {fired[0]:.3f} s"
        assert loop.iterations < 20, f"{loop.iterations} wakeups in 0.2 s: the backend does not wait"

    def test_another_thread_wakes_a_blocked_loop(self, loop: EventLoop) -> None:
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        wait_until(loop.is_running, "the loop running")
        time.sleep(0.1)  # blocked in wait(None) by now
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        assert not thread.is_alive(), f"{loop.backend.name}: call_soon_threadsafe did not wake wait(None)"


class ServerContract(KitFixtures):
    """pollserve's server on the backend, in this process and as the real command."""

    @pytest.fixture
    def command_env(self) -> dict[str, str]:
        """The environment of the ``pollserve`` subprocess: override it to add what your backend needs."""
        return dict(os.environ)

    def test_hello_to_many_clients(self, backend: Backend) -> None:
        with serving(backend, Hello) as server:
            clients = [socket.create_connection(server.address, timeout=10) for _ in range(20)]
            try:
                for _ in range(3):
                    for sock in clients:
                        sock.sendall(b"hi")
                    for sock in clients:
                        assert recv_exactly(sock, len(HELLO_REPLY)) == HELLO_REPLY
            finally:
                for sock in clients:
                    sock.close()

    def test_echo_to_a_client_that_reads_late(self, backend: Backend) -> None:
        """8 MiB to a client with a small window that starts reading late: the server's sends stop
        part way, it waits for WRITE, stops reading and resumes.  Then, with WRITE interest gone,
        the same connection must still be read."""
        payload = os.urandom(1 << 16) * 128
        with serving(backend, Echo) as server, socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            sock.settimeout(10)
            sock.connect(server.address)
            sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
            sender.start()
            time.sleep(0.3)  # the server fills this client's window and buffers the rest
            assert recv_exactly(sock, len(payload)) == payload
            sender.join(10)
            sock.sendall(b"again")
            assert recv_exactly(sock, 5) == b"again"

    def test_resets_leave_the_server_serving(self, backend: Backend) -> None:
        with serving(backend, Echo) as server:
            for _ in range(10):
                sock = socket.create_connection(server.address, timeout=10)
                sock.sendall(b"x" * 1000)
                reset(sock)
            with socket.create_connection(server.address, timeout=10) as sock:
                sock.sendall(b"still there?")
                assert recv_exactly(sock, 12) == b"still there?"
            wait_until(lambda: not server.connections, "every connection closed")
            wait_until(lambda: len(server.loop.backend) == 2, "only the listener and the wakeup socket registered")

    def test_the_pollserve_command_serves_on_it(self, backend: Backend, command_env: dict[str, str]) -> None:
        cls = type(backend)
        root = import_root(cls)
        if root is None:
            pytest.skip(f"{cls.__qualname__} cannot be imported by another process as MODULE:CLASS")
        spec = f"{cls.__module__}:{cls.__qualname__}"
        env = dict(command_env)
        paths = [str(root), str(Path(pollserve.__file__).resolve().parent.parent)]
        env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
        command = [sys.executable, "-m", "pollserve", "--backend", spec, "--port", "0", "--app", "echo"]
        proc = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        lines: queue.Queue[str | None] = queue.Queue()
        output: list[str] = []

        def read_stderr() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                output.append(line)
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        try:
            match = _wait_for_listening(lines, output)
            assert match["backend"] == cls.name, match.group(0)
            with socket.create_connection((match["host"], int(match["port"])), timeout=10) as sock:
                sock.sendall(b"ping")
                assert recv_exactly(sock, 4) == b"ping"
        finally:
            proc.terminate()
            proc.wait(10)
            reader.join(10)
        if sys.platform != "win32":
            assert proc.returncode == 0, "".join(output)
        assert "Traceback" not in "".join(output), "".join(output)


def _wait_for_listening(lines: queue.Queue[str | None], output: list[str], timeout: float = 30) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no 'listening on' line after {timeout} s:\n{''.join(output)}") from None
        if line is None:
            raise AssertionError(f"pollserve exited before listening:\n{''.join(output)}")
        match = LISTENING.search(line)
        if match:
            return match
