"""The backend contract as tests: what a backend must do for pollserve's event loop to run on it.

Subclass ``BackendContract`` (or ``suite.BackendSuite``, which adds the loop
and the server) and provide a ``backend_class`` fixture returning the class
under test.  Every class here shares the fixtures of ``KitFixtures``; none of
them is collected by itself, because none is named ``Test...``.

The checks are stricter than "it seems to work": ``ready()`` rejects a
readiness bit for a direction that is not registered and an fd that is not
registered at all, because a loop on such a backend wakes for nothing, or
calls a handler that is gone.  docs/backends.md states each rule.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator

import pytest

from pollserve.backends import READ, WRITE, AlreadyRegisteredError, Backend, CapacityError, NotRegisteredError

_NAMES = {0: "nothing", READ: "READ", WRITE: "WRITE", READ | WRITE: "READ|WRITE"}


def describe(readiness: dict[int, int]) -> str:
    """{fd: READ|WRITE} in words, for assertion messages."""
    if not readiness:
        return "nothing"
    return ", ".join(f"fd {fd} {_NAMES.get(events, hex(events))}" for fd, events in sorted(readiness.items()))


def fold(backend: Backend, events: Iterable[tuple[int, int]]) -> dict[int, int]:
    """A poll() result as the loop reads it: {fd: READ|WRITE}.

    READ and WRITE count for a direction the fd is registered for, and only
    then; any other bit of read_bits or write_bits is an error or hang-up,
    readiness of whatever is registered.  A backend may report the two
    directions of an fd apart: they are folded together.
    """
    meaningful = backend.read_bits | backend.write_bits
    result: dict[int, int] = {}
    for fd, mask in events:
        registered = backend.interest(fd)
        assert registered, f"{backend.name}: poll() reported fd {fd} (mask {mask:#x}), which is not registered"
        assert mask & meaningful, (
            f"{backend.name}: poll() reported fd {fd} with mask {mask:#x}, which has no bit of read_bits "
            f"({backend.read_bits:#x}) or write_bits ({backend.write_bits:#x})"
        )
        plain = mask & (READ | WRITE)
        assert not plain & ~registered, (
            f"{backend.name}: poll() reported fd {fd} {_NAMES[plain]}, but it is registered for "
            f"{_NAMES[registered]} only"
        )
        errors = mask & meaningful & ~(READ | WRITE)
        result[fd] = result.get(fd, 0) | plain | (registered if errors else 0)
    return result


def ready(backend: Backend, timeout: float | None = 0) -> dict[int, int]:
    """poll(timeout), folded."""
    return fold(backend, backend.poll(timeout))


def expect_ready(backend: Backend, expected: dict[int, int], timeout: float | None = 0, when: str = "") -> None:
    """Assert what one poll(timeout) reports."""
    got = ready(backend, timeout)
    assert got == expected, f"{backend.name}: {when}: poll() reported {describe(got)}; expected {describe(expected)}"


def fill(sock: socket.socket) -> None:
    """Send until the kernel takes no more, so the socket is not writable."""
    with pytest.raises(BlockingIOError):
        while True:
            sock.send(b"x" * 65536)


def drain(sock: socket.socket) -> None:
    """Read until nothing is left to read."""
    while True:
        try:
            if not sock.recv(1 << 20):
                return
        except BlockingIOError:
            return


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def fd_numbered(sock: socket.socket, number: int) -> int:
    """Duplicate sock onto fd ``number`` exactly (a capacity's boundary), raising the soft fd limit
    if needed; skipped if the limit cannot reach it or this process already uses that number
    (dup2() would close it)."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= number:
        if hard != resource.RLIM_INFINITY and hard <= number:
            pytest.skip(f"fd limit {hard} too low to open fd {number}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (number + 1, hard))
    try:
        os.fstat(number)
    except OSError:
        return os.dup2(sock.fileno(), number)
    pytest.skip(f"fd {number} is already open in this process")


def high_fd(sock: socket.socket, at_least: int) -> int:
    """Duplicate sock onto an fd number >= at_least."""
    return fd_numbered(sock, at_least + 16)


class KitFixtures:
    """The fixtures of every class of the kit.  ``backend_class`` is not one of them: it comes from
    the subclass, a conftest.py, or the plugin that ``python -m pollserve.testing`` loads."""

    @pytest.fixture
    def backend(self, backend_class: type[Backend]) -> Iterator[Backend]:
        if not backend_class.is_available():
            pytest.skip(f"backend {backend_class.name!r} is not available here")
        instance = backend_class()
        yield instance
        instance.close()

    @pytest.fixture
    def pair(self) -> Iterator[tuple[socket.socket, socket.socket]]:
        """A connected, non-blocking socketpair (AF_UNIX where there is one)."""
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        yield a, b
        a.close()
        b.close()

    @pytest.fixture
    def tcp_pair(self) -> Iterator[tuple[socket.socket, socket.socket]]:
        """A connected TCP pair on loopback (only TCP can be reset)."""
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
        yield server, client
        server.close()
        client.close()


class RegistrationContract(KitFixtures):
    """register(), modify(), unregister(), close(), and what the loop reads of them."""

    def test_class_attributes(self, backend: Backend) -> None:
        cls = type(backend)
        assert isinstance(cls.name, str) and cls.name, "name must be a non-empty string"
        assert cls.capacity is None or (isinstance(cls.capacity, int) and cls.capacity > 0), f"{cls.capacity=}"
        assert isinstance(cls.auto_candidate, bool), f"{cls.auto_candidate=}"
        assert cls.is_available() is True, "is_available() must be True where an instance can be created"

    def test_what_the_loop_reads(self, backend: Backend, pair) -> None:
        """The loop calls wait(timeout), reads read_bits and write_bits, and keeps its own records
        through interest() and len()."""
        assert callable(backend.wait), "wait must be callable: the loop calls it instead of poll()"
        assert len(backend) == 0 and backend.interest(pair[0].fileno()) == 0

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
        with pytest.raises(AlreadyRegisteredError):
            backend.register(fd, WRITE)
        assert backend.interest(fd) == READ
        expect_ready(backend, {}, when="after a refused second register(WRITE) of a READ fd")

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
        with pytest.raises(ValueError):
            backend.register(pair[0].fileno(), events)
        assert len(backend) == 0

    def test_negative_fd(self, backend: Backend) -> None:
        with pytest.raises(ValueError):
            backend.register(-1, READ)

    def test_closed_backend_refuses_registration(self, backend: Backend, pair) -> None:
        backend.close()
        backend.close()  # idempotent
        with pytest.raises(RuntimeError):
            backend.register(pair[0].fileno(), READ)

    def test_context_manager_closes(self, backend: Backend, pair) -> None:
        with type(backend)() as other:
            other.register(pair[0].fileno(), READ)
        with pytest.raises(RuntimeError):
            other.register(pair[1].fileno(), READ)


class ReadinessContract(KitFixtures):
    """Level-triggered readiness of exactly what is registered."""

    def test_read_readiness(self, backend: Backend, pair) -> None:
        a, b = pair
        backend.register(a.fileno(), READ)
        expect_ready(backend, {}, when="READ registered, nothing sent (the socket is writable)")
        b.send(b"x")
        expect_ready(backend, {a.fileno(): READ}, 5, "a byte sent")
        expect_ready(backend, {a.fileno(): READ}, 0, "again, not read yet (level-triggered)")
        assert a.recv(10) == b"x"
        expect_ready(backend, {}, when="the byte read")

    def test_write_readiness(self, backend: Backend, pair) -> None:
        a, _ = pair
        backend.register(a.fileno(), WRITE)
        expect_ready(backend, {a.fileno(): WRITE}, when="WRITE registered on an empty socket")

    def test_both_directions(self, backend: Backend, pair) -> None:
        a, b = pair
        backend.register(a.fileno(), READ | WRITE)
        b.send(b"x")
        expect_ready(backend, {a.fileno(): READ | WRITE}, 5, "READ|WRITE registered, a byte sent")

    def test_both_registered_only_one_ready(self, backend: Backend, pair) -> None:
        """Readiness of one direction is not readiness of everything registered."""
        a, b = pair
        backend.register(a.fileno(), READ | WRITE)
        expect_ready(backend, {a.fileno(): WRITE}, when="READ|WRITE registered, nothing sent")
        fill(a)
        b.send(b"x")
        expect_ready(backend, {a.fileno(): READ}, 5, "READ|WRITE registered, a byte sent, the send buffer full")

    def test_modify_changes_what_is_reported(self, backend: Backend, pair) -> None:
        a, b = pair
        b.send(b"x")
        backend.register(a.fileno(), WRITE)
        expect_ready(backend, {a.fileno(): WRITE}, when="WRITE registered, a byte waiting")
        backend.modify(a.fileno(), READ)
        expect_ready(backend, {a.fileno(): READ}, when="modified to READ")
        backend.modify(a.fileno(), READ)  # same mask: a no-op, not an error
        expect_ready(backend, {a.fileno(): READ}, when="modified to READ again")

    def test_modify_every_way(self, backend: Backend, pair) -> None:
        """Adding a direction, taking one away, swapping them: the fd is never lost."""
        a, b = pair
        b.send(b"x")  # readable and writable from now on
        fd = a.fileno()
        backend.register(fd, READ)
        for events in (READ | WRITE, READ, WRITE, READ | WRITE, WRITE, READ):
            backend.modify(fd, events)
            assert backend.interest(fd) == events
            expect_ready(backend, {fd: events}, when=f"modified to {_NAMES[events]}")

    def test_modify_leaves_the_other_fds_alone(self, backend: Backend) -> None:
        pairs = [socket.socketpair() for _ in range(5)]
        try:
            for a, b in pairs:
                b.send(b"x")
                backend.register(a.fileno(), READ)
            middle = pairs[2][0].fileno()
            backend.modify(middle, WRITE)
            expected = {a.fileno(): READ for a, _ in pairs} | {middle: WRITE}
            expect_ready(backend, expected, when=f"fd {middle} modified to WRITE")
        finally:
            for a, b in pairs:
                a.close()
                b.close()

    def test_a_bounded_wait_hands_out_every_ready_fd_over_its_calls(self, backend: Backend) -> None:
        """A backend with a ``kernel_wait`` returns at most ``wait_max_events`` a call, and the
        fds one call left out come in the next ones: none starves while others stay ready."""
        if backend.kernel_wait is None:
            pytest.skip(f"{backend.name} has no bounded kernel wait")
        bound = backend.wait_max_events
        assert bound > 0, "kernel_wait is set with no bound to pass it"
        pairs = [socket.socketpair() for _ in range(2 * bound + 5)]
        try:
            for a, b in pairs:
                b.send(b"x")
                backend.register(a.fileno(), READ)
            expected = {a.fileno() for a, _ in pairs}
            seen: set[int] = set()
            for _ in range(3):
                events = backend.kernel_wait(5, bound)
                assert 0 < len(events) <= bound, f"{len(events)} events from a wait bounded to {bound}"
                seen |= set(fold(backend, events))
            assert seen == expected, f"{len(expected - seen)} ready fds never reported in 3 calls"
        finally:
            for a, b in pairs:
                a.close()
                b.close()

    def test_unregistered_fd_is_not_reported(self, backend: Backend, pair) -> None:
        a, b = pair
        backend.register(a.fileno(), READ)
        backend.unregister(a.fileno())
        b.send(b"x")
        expect_ready(backend, {}, 0.05, "the fd unregistered, a byte sent")

    def test_unregistering_one_fd_keeps_the_others(self, backend: Backend) -> None:
        pairs = [socket.socketpair() for _ in range(5)]
        try:
            for a, b in pairs:
                b.send(b"x")
                backend.register(a.fileno(), READ | WRITE)
            gone = pairs[1][0].fileno()
            backend.unregister(gone)
            expected = {a.fileno(): READ | WRITE for a, _ in pairs if a.fileno() != gone}
            expect_ready(backend, expected, when=f"fd {gone} unregistered")
        finally:
            for a, b in pairs:
                a.close()
                b.close()

    def test_a_reused_fd_number_carries_nothing_over(self, backend: Backend) -> None:
        """The server's path: unregister, close, and a new client gets the same number."""
        a, b = socket.socketpair()
        fd = a.fileno()
        backend.register(fd, READ)
        backend.poll(0)
        backend.unregister(fd)
        a.close()
        b.close()
        c, d = socket.socketpair()
        try:
            d.send(b"x")
            expect_ready(backend, {}, 0.05, f"fd {fd} unregistered and closed, fd {c.fileno()} new and unregistered")
            backend.register(c.fileno(), WRITE)
            expected = {c.fileno(): WRITE}
            got = ready(backend, 5)
            if not got:  # a backend may spend one poll hearing that a change to the closed fd failed
                got = ready(backend, 5)
            assert got == expected, f"{backend.name}: poll() reported {describe(got)}; expected {describe(expected)}"
        finally:
            c.close()
            d.close()

    def test_write_readiness_returns_after_buffer_drains(self, backend: Backend, pair) -> None:
        a, b = pair
        fill(a)
        backend.register(a.fileno(), WRITE)
        expect_ready(backend, {}, when="WRITE registered, the send buffer full")
        drain(b)
        expect_ready(backend, {a.fileno(): WRITE}, 5, "the peer read everything")

    def test_many_fds(self, backend: Backend) -> None:
        pairs = [socket.socketpair() for _ in range(100)]
        try:
            for a, _ in pairs:
                backend.register(a.fileno(), READ)
            for _, b in pairs[::3]:
                b.send(b"x")
            expect_ready(backend, {a.fileno(): READ for a, _ in pairs[::3]}, 5, "34 of 100 fds sent a byte")
        finally:
            for a, b in pairs:
                backend.unregister(a.fileno())
                a.close()
                b.close()

    def test_read_and_write_bits(self, backend: Backend) -> None:
        """What the loop relies on: READ and WRITE are in them, and only error bits besides."""
        assert backend.read_bits & READ and not backend.read_bits & WRITE
        assert backend.write_bits & WRITE and not backend.write_bits & READ
        assert backend.read_bits & ~READ == backend.write_bits & ~WRITE, "the same error bits for both"

    def test_wait_agrees_with_poll(self, backend: Backend, pair) -> None:
        """wait(timeout) is poll() for a timeout that is None or >= 0: the loop's way in."""
        a, b = pair
        backend.register(a.fileno(), READ)
        assert fold(backend, backend.wait(0)) == {}
        started = time.monotonic()
        assert fold(backend, backend.wait(0.1)) == {}
        assert time.monotonic() - started >= 0.05, "wait(0.1) returned at once"
        b.send(b"x")
        assert fold(backend, backend.wait(5)) == {a.fileno(): READ}
        timer = threading.Timer(0.1, b.send, args=(b"y",))
        a.recv(10)
        timer.start()
        try:
            assert fold(backend, backend.wait(None)) == {a.fileno(): READ}
        finally:
            timer.cancel()


class HangUpContract(KitFixtures):
    """Error and hang-up conditions are readiness of what is registered."""

    def test_peer_close_is_read_readiness(self, backend: Backend, pair) -> None:
        a, b = pair
        backend.register(a.fileno(), READ)
        b.close()
        expect_ready(backend, {a.fileno(): READ}, 5, "the peer closed")
        assert a.recv(10) == b""

    def test_peer_close_wakes_a_write_only_registration(self, backend: Backend, pair) -> None:
        a, b = pair
        fill(a)
        backend.register(a.fileno(), WRITE)
        expect_ready(backend, {}, when="WRITE registered, the send buffer full")
        b.close()
        expect_ready(backend, {a.fileno(): WRITE}, 5, "the peer closed")
        with pytest.raises(OSError):
            a.send(b"x")

    def test_reset_is_reported_as_what_was_registered(self, backend: Backend, tcp_pair) -> None:
        server, client = tcp_pair
        server.setblocking(False)
        backend.register(server.fileno(), READ)
        reset(client)
        expect_ready(backend, {server.fileno(): READ}, 5, "the peer reset the connection")
        with pytest.raises(ConnectionResetError):
            server.recv(10)

    def test_reset_with_both_registered(self, backend: Backend, tcp_pair) -> None:
        server, client = tcp_pair
        server.setblocking(False)
        backend.register(server.fileno(), READ | WRITE)
        reset(client)
        deadline = time.monotonic() + 5
        while ready(backend, 1) != {server.fileno(): READ | WRITE}:  # WRITE alone until the RST lands
            assert time.monotonic() < deadline, f"{backend.name}: the RST was never reported as READ|WRITE"

    def test_fd_closed_without_unregister_does_not_break_poll(self, backend: Backend, pair) -> None:
        """The contract says unregister before close; a caller breaking it must not break poll()
        for the other fds.  The closed fd is reported as ready for what was registered (so its
        handler meets EBADF) or not at all, and a late unregister() is accepted."""
        a, b = pair
        victim, peer = socket.socketpair()
        fd = victim.fileno()
        backend.register(fd, READ | WRITE)
        backend.register(a.fileno(), READ)
        backend.poll(0)
        b.send(b"x")
        victim.close()
        try:
            result = ready(backend, 5)
            assert result.get(a.fileno()) == READ, f"{backend.name}: poll() reported {describe(result)}"
            assert result.get(fd) in (None, READ | WRITE), f"{backend.name}: poll() reported {describe(result)}"
            backend.unregister(fd)
            after = ready(backend, 0)
            if not after:  # a backend may spend one poll hearing that its change to the closed fd failed
                after = ready(backend, 0)
            assert after == {a.fileno(): READ}, f"{backend.name}: after the late unregister: {describe(after)}"
        finally:
            peer.close()


class TimeoutContract(KitFixtures):
    """poll(timeout): None waits for an event, 0 does not wait, a positive timeout waits that long."""

    def test_zero_timeout_returns_at_once(self, backend: Backend, pair) -> None:
        backend.register(pair[0].fileno(), READ)
        started = time.monotonic()
        assert list(backend.poll(0)) == []
        assert time.monotonic() - started < 1

    def test_positive_timeout_waits(self, backend: Backend, pair) -> None:
        backend.register(pair[0].fileno(), READ)
        started = time.monotonic()
        assert list(backend.poll(0.2)) == []
        elapsed = time.monotonic() - started
        assert 0.15 <= elapsed < 5, f"{backend.name}: poll(0.2) returned after {elapsed:.3f} s"

    def test_tiny_timeout_is_not_busy(self, backend: Backend, pair) -> None:
        """A 0.1 ms timeout still waits (poll() rounds milliseconds up), and returns."""
        backend.register(pair[0].fileno(), READ)
        assert list(backend.poll(0.0001)) == []

    def test_negative_timeout_is_zero(self, backend: Backend, pair) -> None:
        backend.register(pair[0].fileno(), READ)
        assert list(backend.poll(-1)) == []

    def test_blocking_poll_woken_by_wakeup_fd(self, backend: Backend, pair) -> None:
        wake_recv, wake_send = pair
        backend.register(wake_recv.fileno(), READ)
        timer = threading.Timer(0.1, wake_send.send, args=(b"\0",))
        timer.start()
        try:
            expect_ready(backend, {wake_recv.fileno(): READ}, None, "another thread wrote to the wakeup socket")
        finally:
            timer.cancel()


class CapacityContract(KitFixtures):
    """capacity: fds must be below it, and one that is not is a CapacityError, not a crash."""

    @staticmethod
    def _watches(backend: Backend, pair, fd: int, what: str) -> None:
        """fd, a duplicate of pair[0], is registered, reported readable once pair[1] writes, and
        unregistered; closed in any case."""
        try:
            backend.register(fd, READ)
            pair[1].send(b"x")
            expect_ready(backend, {fd: READ}, 5, what)
            backend.unregister(fd)
        finally:
            os.close(fd)

    def test_unbounded_backends_take_high_fds(self, backend: Backend, pair) -> None:
        if backend.capacity is not None:
            pytest.skip(f"{backend.name} is bounded")
        fd = high_fd(pair[0], 2048)
        self._watches(backend, pair, fd, f"fd {fd} registered")

    def test_bounded_backends_take_the_last_fd_below_capacity(self, backend: Backend, pair) -> None:
        """The boundary from below: fd capacity - 1 is watched like any other.  A capacity
        declared one too high (select's FD_SETSIZE + 1) fails here: select() cannot watch it."""
        if backend.capacity is None:
            pytest.skip(f"{backend.name} is unbounded")
        fd = fd_numbered(pair[0], backend.capacity - 1)
        self._watches(backend, pair, fd, f"fd {fd}, the last below the capacity, registered")

    @pytest.mark.parametrize("beyond", [0, 16])
    def test_bounded_backends_refuse_fds_from_capacity_on(self, backend: Backend, pair, beyond: int) -> None:
        """The boundary from above: fd capacity itself is refused (a check with ``>`` for ``>=``
        takes it), as is any beyond."""
        if backend.capacity is None:
            pytest.skip(f"{backend.name} is unbounded")
        fd = fd_numbered(pair[0], backend.capacity + beyond)
        try:
            with pytest.raises(CapacityError) as caught:
                backend.register(fd, READ)
            message = str(caught.value)
            assert backend.name in message and str(backend.capacity) in message, message
            assert len(backend) == 0 and backend.interest(fd) == 0
            backend.register(pair[0].fileno(), READ)  # a low fd still works
            pair[1].send(b"x")
            expect_ready(backend, {pair[0].fileno(): READ}, 5, "a low fd registered after the refusal")
        finally:
            os.close(fd)


class BackendContract(RegistrationContract, ReadinessContract, HangUpContract, TimeoutContract, CapacityContract):
    """The whole backend contract."""
