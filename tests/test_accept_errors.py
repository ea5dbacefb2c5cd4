"""accept(2) on Linux passes a pending connection's network error out of accept(): ENETDOWN,
EPROTO, ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH, EOPNOTSUPP, ENETUNREACH, which its man page
asks to "treat like EAGAIN by retrying".  Loopback cannot be made to produce them, so the
listener here is a real listening socket whose accept() raises each of them once before the
kernel's own accept() runs; it reaches the server the way every listener does, through
``Server.start(sockets=...)`` (a supervisor's or systemd's sockets come in there too).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from clients import connect

from pollserve.apps import Echo
from pollserve.loop import EventLoop
from pollserve.server import Server

NETWORK_ERRORS = [
    getattr(errno, name)
    for name in ("ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH")
    if hasattr(errno, name)
]


class FlakyListener(socket.socket):
    """A real listening socket on 127.0.0.1 whose accept() first raises the errors given, one
    per call, then is the kernel's accept()."""

    def __init__(self, errors: list[int]) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        super().__init__(listener.family, listener.type, listener.proto, listener.detach())
        self.errors = list(errors)

    def accept(self) -> tuple[socket.socket, object]:
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code))
        return super().accept()


@contextlib.contextmanager
def serving_on(backend_name: str, listener: socket.socket, **options) -> Iterator[tuple[Server, Callable[[], None]]]:
    """An Echo server on that listener and the function that starts its loop, which the block
    calls once it has set things up; everything is closed when the block ends."""
    loop = EventLoop(backend_name)
    server = Server(loop, Echo, "127.0.0.1", 0, **options)
    server.start(sockets=[listener])
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    try:
        yield server, thread.start
    finally:
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        server.close()
        loop.close()


def test_network_errors_from_accept_skip_one_client_without_a_traceback(
    backend_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    listener = FlakyListener(NETWORK_ERRORS)
    with caplog.at_level(logging.DEBUG, logger="pollserve"), serving_on(backend_name, listener) as (_, run):
        run()
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(connect(listener.getsockname())) for _ in range(3)]
            for index, sock in enumerate(clients):
                sock.sendall(b"ping %d" % index)
            for index, sock in enumerate(clients):
                assert sock.recv(100) == b"ping %d" % index
    assert listener.errors == []
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_network_errors_in_the_shutdowns_backlog_pass_leave_no_client_reset(backend_name: str) -> None:
    """The shutdown accepts what the kernel queued before it closes the listener (closing it
    would reset them); an error for one pending client must not end that pass."""
    listener = FlakyListener(NETWORK_ERRORS[:2])
    with serving_on(backend_name, listener, linger_timeout=5) as (server, run), contextlib.ExitStack() as stack:
        # Queued in the kernel: the loop is not running yet.
        clients = [stack.enter_context(connect(listener.getsockname())) for _ in range(3)]
        for sock in clients:
            sock.sendall(b"before the shutdown")
        drained = threading.Event()
        server.shutdown(5, drained.set)
        run()
        for sock in clients:
            assert sock.recv(100) == b"before the shutdown"
            assert sock.recv(100) == b""  # the server's FIN, not a reset
            sock.close()
        assert drained.wait(10)
        assert server.connections_accepted == 3
