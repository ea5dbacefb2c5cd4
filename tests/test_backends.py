"""Backend conformance: one suite, run over every backend this OS has."""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from clients import reset
from conftest import EMULATED

from pollserve.backends import (
    BACKENDS,
    READ,
    WRITE,
    AlreadyRegisteredError,
    Backend,
    BackendUnavailableError,
    CapacityError,
    NotRegisteredError,
    auto_backend,
    available_backends,
    create_backend,
    get_backend,
)
from pollserve.backends.select import FD_SETSIZE, SelectBackend


@pytest.fixture
def backend(backend_name: str) -> Iterator[Backend]:
    instance = create_backend(backend_name)
    yield instance
    instance.close()


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair on loopback (socketpair is AF_UNIX, which cannot RST)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    yield server, client
    server.close()
    client.close()


def ready(backend: Backend, timeout: float | None = 0) -> dict[int, int]:
    """poll() folded into {fd: READ|WRITE}, as the loop reads it: READ and WRITE as they are, an
    error or hang-up bit (in read_bits and write_bits besides READ and WRITE) as what the fd is
    registered for; a backend may report the two directions apart."""
    error_bits = backend.read_bits & ~READ
    result: dict[int, int] = {}
    for fd, events in backend.poll(timeout):
        assert events & (backend.read_bits | backend.write_bits), f"mask {events:#x} means nothing"
        folded = events & (READ | WRITE) | (backend.interest(fd) if events & error_bits else 0)
        result[fd] = result.get(fd, 0) | folded
    return result


def high_fd(sock: socket.socket, at_least: int) -> int:
    """Duplicate sock onto an fd number >= at_least, raising the soft limit if needed."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = at_least + 16
    if soft <= target:
        if hard != resource.RLIM_INFINITY and hard <= target:
            pytest.skip(f"fd limit {hard} too low to open fd {target}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (target + 1, hard))
    return os.dup2(sock.fileno(), target)


class TestRegistration:
    def test_register_modify_unregister(self, backend: Backend, pair) -> None:
        a, _ = pair
        fd = a.fileno()
        backend.register(fd, READ)
        assert len(backend) == 1 and backend.interest(fd) == READ
        backend.modify(fd, READ | WRITE)
        assert backend.interest(fd) == READ | WRITE
        backend.unregister(fd)
        assert len(backend) == 0 and backend.interest(fd) == 0
        backend.register(fd, WRITE)  # registering again after unregister is fine
        assert backend.interest(fd) == WRITE

    def test_double_registration_is_an_error(self, backend: Backend, pair) -> None:
        fd = pair[0].fileno()
        backend.register(fd, READ)
        with pytest.raises(AlreadyRegisteredError, match=f"fd {fd} is already registered"):
            backend.register(fd, WRITE)
        assert backend.interest(fd) == READ

    def test_unknown_fd_is_an_error(self, backend: Backend, pair) -> None:
        fd = pair[0].fileno()
        with pytest.raises(NotRegisteredError):
            backend.modify(fd, READ)
        with pytest.raises(NotRegisteredError):
            backend.unregister(fd)
        # Both are KeyErrors too, as with the selectors module.
        with pytest.raises(KeyError):
            backend.unregister(fd)

    @pytest.mark.parametrize("events", [0, 8, READ | WRITE | 64])
    def test_bad_event_mask(self, backend: Backend, pair, events: int) -> None:
        with pytest.raises(ValueError, match="events must be"):
            backend.register(pair[0].fileno(), events)
        assert len(backend) == 0

    def test_negative_fd(self, backend: Backend) -> None:
        with pytest.raises(ValueError, match="invalid file descriptor"):
            backend.register(-1, READ)

    def test_closed_backend_refuses_registration(self, backend: Backend, pair) -> None:
        backend.close()
        backend.close()  # idempotent
        with pytest.raises(RuntimeError, match="closed"):
            backend.register(pair[0].fileno(), READ)


class TestReadiness:
    def test_read_readiness(self, backend: Backend, pair) -> None:
        a, b = pair
        backend.register(a.fileno(), READ)
        assert ready(backend) == {}
        b.send(b"x")
        assert ready(backend, 5) == {a.fileno(): READ}
        # Level-triggered: still ready until read.
        assert ready(backend) == {a.fileno(): READ}
        assert a.recv(10) == b"x"
        assert ready(backend) == {}

    def test_write_readiness(self, backend: Backend, pair) -> None:
        a, _ = pair
        backend.register(a.fileno(), WRITE)
        assert ready(backend) == {a.fileno(): WRITE}

    def test_both_directions(self, backend: Backend, pair) -> None:
        a, b = pair
        backend.register(a.fileno(), READ | WRITE)
        b.send(b"x")
        assert ready(backend, 5) == {a.fileno(): READ | WRITE}

    def test_modify_changes_what_is_reported(self, backend: Backend, pair) -> None:
        a, b = pair
        b.send(b"x")
        backend.register(a.fileno(), WRITE)
        assert ready(backend) == {a.fileno(): WRITE}
        backend.modify(a.fileno(), READ)
        assert ready(backend) == {a.fileno(): READ}
        backend.modify(a.fileno(), READ)  # same mask: a no-op, not an error
        assert ready(backend) == {a.fileno(): READ}

    def test_unregistered_fd_is_not_reported(self, backend: Backend, pair) -> None:
        a, b = pair
        backend.register(a.fileno(), READ)
        backend.unregister(a.fileno())
        b.send(b"x")
        assert ready(backend, 0.05) == {}

    def test_write_readiness_returns_after_buffer_drains(self, backend: Backend, pair) -> None:
        a, b = pair
        with pytest.raises(BlockingIOError):
            while True:
                a.send(b"x" * 65536)
        backend.register(a.fileno(), WRITE)
        assert ready(backend) == {}
        while True:
            try:
                b.recv(1 << 20)
            except BlockingIOError:
                break
        assert ready(backend, 5) == {a.fileno(): WRITE}

    def test_many_fds(self, backend: Backend) -> None:
        pairs = [socket.socketpair() for _ in range(100)]
        try:
            for a, _ in pairs:
                backend.register(a.fileno(), READ)
            for _, b in pairs[::3]:
                b.send(b"x")
            assert ready(backend, 5) == {a.fileno(): READ for a, _ in pairs[::3]}
        finally:
            for a, b in pairs:
                backend.unregister(a.fileno())
                a.close()
                b.close()

    def test_read_and_write_bits(self, backend: Backend) -> None:
        """The contract the loop relies on: READ and WRITE are in them, and only error bits besides."""
        assert backend.read_bits & READ and not backend.read_bits & WRITE
        assert backend.write_bits & WRITE and not backend.write_bits & READ
        assert backend.read_bits & ~READ == backend.write_bits & ~WRITE  # the same error bits for both


class TestHangUpAndErrors:
    def test_peer_close_is_read_readiness(self, backend: Backend, pair) -> None:
        a, b = pair
        backend.register(a.fileno(), READ)
        b.close()
        assert ready(backend, 5) == {a.fileno(): READ}
        assert a.recv(10) == b""

    def test_peer_close_wakes_a_write_only_registration(self, backend: Backend, pair) -> None:
        a, b = pair
        with pytest.raises(BlockingIOError):  # fill the buffer: WRITE is not ready
            while True:
                a.send(b"x" * 65536)
        backend.register(a.fileno(), WRITE)
        assert ready(backend) == {}
        b.close()
        assert ready(backend, 5) == {a.fileno(): WRITE}
        with pytest.raises(OSError):
            a.send(b"x")

    def test_reset_is_reported_as_what_was_registered(self, backend: Backend, tcp_pair) -> None:
        server, client = tcp_pair
        server.setblocking(False)
        backend.register(server.fileno(), READ)
        reset(client)
        assert ready(backend, 5) == {server.fileno(): READ}
        with pytest.raises(ConnectionResetError):
            server.recv(10)

    def test_reset_with_both_registered(self, backend: Backend, tcp_pair) -> None:
        server, client = tcp_pair
        server.setblocking(False)
        backend.register(server.fileno(), READ | WRITE)
        reset(client)
        deadline = time.monotonic() + 5
        while ready(backend, 1) != {server.fileno(): READ | WRITE}:  # WRITE alone until the RST lands
            assert time.monotonic() < deadline, "RST never reported"

    def test_registered_fd_closed_without_unregister(self, backend: Backend, pair) -> None:
        """The contract says unregister before close; breaking it must not break poll().

        select(2) fails the whole call with EBADF, poll(2) and /dev/poll report POLLNVAL: both
        become readiness of what was registered, so the handler's own recv() meets EBADF.  epoll
        and kqueue drop a closed fd from their interest lists, so it is never reported again.
        """
        a, b = pair
        victim, peer = socket.socketpair()
        fd = victim.fileno()
        backend.register(fd, READ | WRITE)
        backend.register(a.fileno(), READ)
        backend.poll(0)  # kqueue hands its registrations to the kernel here
        b.send(b"x")
        victim.close()
        try:
            result = ready(backend, 5)
            assert result.get(a.fileno()) == READ
            if backend.name in ("epoll", "kqueue"):
                assert fd not in result
            else:
                assert result.get(fd) == READ | WRITE
            backend.unregister(fd)  # late, but still accepted
            after = ready(backend, 0)
            if backend.name == "kqueue" and not after:  # the failed EV_DELETE came back alone
                after = ready(backend, 0)
            assert after == {a.fileno(): READ}
        finally:
            peer.close()


class TestRegularFiles:
    def test_regular_file(self, backend: Backend, tmp_path) -> None:
        """epoll_ctl(2): EPERM "The target file fd does not support epoll" (a regular file);
        poll(2) and select(2) report regular files as always ready."""
        if backend.name not in ("epoll", "poll", "select"):
            pytest.skip(f"{backend.name}: regular-file semantics differ and are not asserted")
        with open(tmp_path / "file", "wb") as file:
            if backend.name == "epoll":
                with pytest.raises(PermissionError):
                    backend.register(file.fileno(), READ)
                assert len(backend) == 0 and backend.interest(file.fileno()) == 0
            else:
                backend.register(file.fileno(), READ | WRITE)
                assert ready(backend) == {file.fileno(): READ | WRITE}


class TestTimeouts:
    def test_zero_timeout_returns_at_once(self, backend: Backend, pair) -> None:
        backend.register(pair[0].fileno(), READ)
        started = time.monotonic()
        assert backend.poll(0) == []
        assert time.monotonic() - started < 1

    def test_positive_timeout_waits(self, backend: Backend, pair) -> None:
        backend.register(pair[0].fileno(), READ)
        started = time.monotonic()
        assert backend.poll(0.2) == []
        elapsed = time.monotonic() - started
        assert 0.15 <= elapsed < 5, elapsed

    def test_tiny_timeout_is_not_busy(self, backend: Backend, pair) -> None:
        """A 0.1 ms timeout still waits (poll() rounds milliseconds up), and returns."""
        backend.register(pair[0].fileno(), READ)
        assert backend.poll(0.0001) == []

    def test_negative_timeout_is_zero(self, backend: Backend, pair) -> None:
        backend.register(pair[0].fileno(), READ)
        assert backend.poll(-1) == []

    def test_blocking_poll_woken_by_wakeup_fd(self, backend: Backend, pair) -> None:
        wake_recv, wake_send = pair
        backend.register(wake_recv.fileno(), READ)
        timer = threading.Timer(0.1, wake_send.send, args=(b"\0",))
        timer.start()
        try:
            assert ready(backend, None) == {wake_recv.fileno(): READ}
        finally:
            timer.cancel()


class TestCapacity:
    def test_select_refuses_fds_beyond_fd_setsize(self, pair) -> None:
        if sys.platform == "win32":
            pytest.skip("Windows select limits the count of sockets, not fd numbers")
        backend = create_backend("select")
        fd = high_fd(pair[0], FD_SETSIZE)
        try:
            with pytest.raises(CapacityError) as caught:
                backend.register(fd, READ)
            message = str(caught.value)
            assert "select" in message and str(FD_SETSIZE) in message and "poll" in message
            assert len(backend) == 0
            backend.register(pair[0].fileno(), READ)  # a low fd still works
        finally:
            os.close(fd)
            backend.close()

    def test_unbounded_backends_take_high_fds(self, backend: Backend, pair) -> None:
        if backend.capacity is not None:
            pytest.skip(f"{backend.name} is bounded")
        fd = high_fd(pair[0], 2048)
        try:
            backend.register(fd, READ)
            pair[1].send(b"x")
            assert ready(backend, 5) == {fd: READ}
            backend.unregister(fd)
        finally:
            os.close(fd)


class TestRegistry:
    def test_a_backend_that_cannot_be_created_is_unavailable(self) -> None:
        """bpo-41182: the function may exist while the system call fails (ENOSYS in a sandbox)."""

        class Refused(SelectBackend):
            name = "refused"

            def __init__(self) -> None:
                raise OSError(errno.ENOSYS, "Function not implemented")

        assert SelectBackend.is_available() is True
        assert Refused.is_available() is False

    def test_auto_order(self) -> None:
        assert list(BACKENDS) == ["epoll", "kqueue", "devpoll", "poll", "select"]
        names = available_backends()
        assert names == [name for name in BACKENDS if name in names]
        assert auto_backend().name == names[0]
        assert "select" in names  # every OS has select

    def test_expected_backends_for_this_os(self) -> None:
        names = set(available_backends()) - set(EMULATED)
        if sys.platform.startswith("linux"):
            assert {"epoll", "poll", "select"} <= names and "kqueue" not in names
        elif sys.platform == "darwin" or "bsd" in sys.platform:
            assert {"kqueue", "poll", "select"} <= names and "epoll" not in names
        elif sys.platform == "win32":
            assert names == {"select"}

    def test_lookup_by_name(self) -> None:
        for name in available_backends():
            assert get_backend(name).name == name
        assert get_backend("auto") is auto_backend()

    def test_unknown_name(self) -> None:
        with pytest.raises(BackendUnavailableError, match=r"unknown backend 'nope'.*known: auto, epoll"):
            get_backend("nope")

    def test_missing_backend_names_the_available_ones(self) -> None:
        missing = [name for name in BACKENDS if name not in available_backends()]
        if not missing:
            pytest.skip("every backend is available here")
        with pytest.raises(BackendUnavailableError) as caught:
            get_backend(missing[0])
        assert str(caught.value) == (
            f"backend {missing[0]!r} is not available on this system (available: {', '.join(available_backends())})"
        )
