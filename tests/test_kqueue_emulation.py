"""The kqueue EMULATION pinned to kqueue(2), and pollserve's kqueue backend driven through it.

These run wherever epoll exists (Linux).  Each test quotes the kqueue(2) man
page (FreeBSD) or FreeBSD's sys/kern/kern_event.c for the behaviour it pins,
so the emulation cannot drift from the real thing unnoticed.  On a system with
a real kqueue, the conformance suite tests the real one and these are skipped.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Iterator

import pytest
from clients import reset

pytestmark = pytest.mark.skipif(not hasattr(select, "epoll"), reason="the kqueue emulation is built on epoll (Linux)")

import kqueue_emulation as kq  # noqa: E402

from pollserve.backends import READ, WRITE  # noqa: E402
from pollserve.backends.kqueue import KqueueBackend  # noqa: E402


@pytest.fixture
def kqueue() -> Iterator[kq.EmulatedKqueue]:
    queue = kq.EmulatedKqueue()
    yield queue
    queue.close()


def add(fd: int, filter: int = kq.KQ_FILTER_READ) -> kq.EmulatedKevent:
    return kq.EmulatedKevent(fd, filter, kq.KQ_EV_ADD)


def delete(fd: int, filter: int = kq.KQ_FILTER_READ) -> kq.EmulatedKevent:
    return kq.EmulatedKevent(fd, filter, kq.KQ_EV_DELETE)


def summary(events) -> list[tuple[int, int, int]]:
    return sorted((event.ident, event.filter, event.flags) for event in events)


class TestFilters:
    def test_read_filter_reports_bytes_available(self, kqueue, pair) -> None:
        """EVFILT_READ: "data contains the number of bytes of protocol data available to read"."""
        a, b = pair
        assert kqueue.control([add(a.fileno())], 4, 0) == []
        b.send(b"hello")
        (event,) = kqueue.control(None, 4, 5)
        assert (event.ident, event.filter, event.flags, event.data) == (a.fileno(), kq.KQ_FILTER_READ, 0, 5)

    def test_level_triggered_without_ev_clear(self, kqueue, pair) -> None:
        """Without EV_CLEAR the state is not reset after retrieval: the event repeats until read."""
        a, b = pair
        kqueue.control([add(a.fileno())], 4, 0)
        b.send(b"x")
        assert len(kqueue.control(None, 4, 5)) == 1
        assert len(kqueue.control(None, 4, 0)) == 1
        a.recv(1)
        assert kqueue.control(None, 4, 0) == []

    def test_write_filter(self, kqueue, pair) -> None:
        """EVFILT_WRITE: "Takes a descriptor as the identifier, and returns whenever it is possible to write"."""
        a, _ = pair
        (event,) = kqueue.control([add(a.fileno(), kq.KQ_FILTER_WRITE)], 4, 0)
        assert (event.ident, event.filter, event.flags) == (a.fileno(), kq.KQ_FILTER_WRITE, 0)

    def test_one_event_per_filter(self, kqueue, pair) -> None:
        """A knote is identified by (ident, filter): read and write readiness are separate kevents."""
        a, b = pair
        b.send(b"x")
        events = kqueue.control([add(a.fileno()), add(a.fileno(), kq.KQ_FILTER_WRITE)], 4, 5)
        assert summary(events) == [(a.fileno(), kq.KQ_FILTER_WRITE, 0), (a.fileno(), kq.KQ_FILTER_READ, 0)]

    def test_re_adding_does_not_duplicate(self, kqueue, pair) -> None:
        """EV_ADD: "Re-adding an existing event will modify the parameters of the original event,
        and not result in a duplicate entry"."""
        a, b = pair
        kqueue.control([add(a.fileno()), add(a.fileno())], 4, 0)
        b.send(b"x")
        assert len(kqueue.control(None, 4, 5)) == 1

    def test_ident_may_be_a_file_object(self, kqueue, pair) -> None:
        a, b = pair
        kqueue.control([kq.EmulatedKevent(a, kq.KQ_FILTER_READ, kq.KQ_EV_ADD)], 4, 0)
        b.send(b"x")
        assert kqueue.control(None, 4, 5)[0].ident == a.fileno()


class TestEof:
    def test_ev_eof_with_data_still_pending(self, kqueue, pair) -> None:
        """EVFILT_READ on sockets: "If the read direction of the socket has shutdown, then the filter
        also sets EV_EOF in flags" -- while data may still be buffered (data > 0)."""
        a, b = pair
        kqueue.control([add(a.fileno())], 4, 0)
        b.send(b"last words")
        b.close()
        (event,) = kqueue.control(None, 4, 5)
        assert event.flags & kq.KQ_EV_EOF and event.data == len(b"last words")
        assert a.recv(100) == b"last words"
        (event,) = kqueue.control(None, 4, 0)
        assert event.flags & kq.KQ_EV_EOF and event.data == 0
        assert a.recv(100) == b""

    def test_write_filter_eof_when_the_reader_is_gone(self, kqueue) -> None:
        """EVFILT_WRITE: "When the reader disconnects, the filter will set EV_EOF in flags"."""
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
        try:
            kqueue.control([add(server.fileno(), kq.KQ_FILTER_WRITE)], 4, 0)
            reset(client)
            deadline = time.monotonic() + 5
            while True:
                (event,) = kqueue.control(None, 4, 1)
                if event.flags & kq.KQ_EV_EOF:
                    break
                assert time.monotonic() < deadline, "EV_EOF never set"
            assert event.filter == kq.KQ_FILTER_WRITE
        finally:
            server.close()


class TestChangesAndErrors:
    def test_deleting_a_missing_knote_is_enoent(self, kqueue, pair) -> None:
        """EV_DELETE of an event that is not there fails: ENOENT "The event could not be found to be
        modified or deleted", placed in the eventlist "with EV_ERROR set in flags and the system error
        in data" (kern_event.c sets flags to EV_ERROR alone)."""
        a, _ = pair
        (error,) = kqueue.control([delete(a.fileno())], 4, 0)
        assert (error.ident, error.flags, error.data) == (a.fileno(), kq.KQ_EV_ERROR, errno.ENOENT)

    def test_adding_a_closed_fd_is_ebadf(self, kqueue) -> None:
        """EBADF: "The specified descriptor is invalid"."""
        a, b = socket.socketpair()
        fd = a.fileno()
        a.close()
        b.close()
        (error,) = kqueue.control([add(fd)], 4, 0)
        assert (error.flags, error.data) == (kq.KQ_EV_ERROR, errno.EBADF)

    def test_errors_return_at_once_without_waiting(self, kqueue, pair) -> None:
        """kern_event.c (kqueue_kevent): "if (nerrors) ... return" before kqueue_scan: no waiting."""
        a, _ = pair
        started = time.monotonic()
        assert len(kqueue.control([delete(a.fileno())], 4, None)) == 1
        assert time.monotonic() - started < 1

    def test_no_room_for_the_error_raises(self, kqueue, pair) -> None:
        """ "Otherwise, -1 will be returned, and errno will be set to indicate the error condition"."""
        a, _ = pair
        with pytest.raises(OSError) as caught:
            kqueue.control([delete(a.fileno())], 0, 0)
        assert caught.value.errno == errno.ENOENT

    def test_injected_error_fails_that_change_only(self, kqueue, pair) -> None:
        """A change the kernel cannot make comes back "with EV_ERROR set in flags and the system
        error in data"; the entry keeps ident and filter (kern_event.c copies the change into it)."""
        a, b = pair
        kqueue.inject_error(a.fileno(), kq.KQ_FILTER_READ, errno.ENOMEM)
        (error,) = kqueue.control([add(a.fileno())], 4, 0)
        assert (error.ident, error.filter, error.flags, error.data) == (
            a.fileno(),
            kq.KQ_FILTER_READ,
            kq.KQ_EV_ERROR,
            errno.ENOMEM,
        )
        b.send(b"x")
        assert kqueue.control(None, 4, 0) == []  # the knote was not added
        (event,) = kqueue.control([add(a.fileno())], 4, 5)  # the injection fired once
        assert event.ident == a.fileno() and event.filter == kq.KQ_FILTER_READ

    def test_changelist_is_applied_in_order(self, kqueue, pair) -> None:
        """Changes are applied one after the other before any event is returned."""
        a, b = pair
        b.send(b"x")
        assert kqueue.control([add(a.fileno()), delete(a.fileno())], 4, 0) == []  # added, then gone
        errors = kqueue.control([delete(a.fileno()), add(a.fileno())], 4, 0)
        assert [(e.flags, e.data) for e in errors] == [(kq.KQ_EV_ERROR, errno.ENOENT)]  # the delete came first
        assert summary(kqueue.control(None, 4, 0)) == [(a.fileno(), kq.KQ_FILTER_READ, 0)]  # the add stood

    def test_close_removes_the_knotes(self, kqueue) -> None:
        """ "Calling close() on a file descriptor will remove any kevents that reference the descriptor"."""
        a, b = socket.socketpair()
        fd = a.fileno()
        kqueue.control([add(fd)], 4, 0)
        a.close()
        (error,) = kqueue.control([delete(fd)], 4, 0)
        assert error.data == errno.EBADF  # the number is not open now
        c, d = socket.socketpair()  # likely reuses the number
        try:
            if c.fileno() == fd:
                (error,) = kqueue.control([delete(fd)], 4, 0)
                assert error.data == errno.ENOENT  # a new file: the old knote did not carry over
            d.send(b"x")
            assert kqueue.control(None, 4, 0.05) == []
        finally:
            for sock in (b, c, d):
                sock.close()

    def test_unsupported_requests_are_loud(self, kqueue, pair) -> None:
        a, _ = pair
        with pytest.raises(NotImplementedError):
            kqueue.control([kq.EmulatedKevent(a.fileno(), kq.KQ_FILTER_READ, kq.KQ_EV_ADD | kq.KQ_EV_ONESHOT)], 1, 0)
        with pytest.raises(NotImplementedError):
            kqueue.control([kq.EmulatedKevent(a.fileno(), -7, kq.KQ_EV_ADD)], 1, 0)  # EVFILT_TIMER
        with open(__file__) as regular, pytest.raises(NotImplementedError):
            kqueue.control([add(regular.fileno())], 1, 0)


class TestWaitingAndClosing:
    def test_timeouts(self, kqueue, pair) -> None:
        """timeout None waits forever, 0 "effect a poll", positive waits at most that long."""
        a, _ = pair
        kqueue.control([add(a.fileno())], 4, 0)
        started = time.monotonic()
        assert kqueue.control(None, 4, 0) == []
        assert time.monotonic() - started < 1
        started = time.monotonic()
        assert kqueue.control(None, 4, 0.2) == []
        assert 0.15 <= time.monotonic() - started < 5
        with pytest.raises(ValueError):
            kqueue.control(None, 4, -1)

    def test_max_events_bounds_the_result(self, kqueue) -> None:
        pairs = [socket.socketpair() for _ in range(5)]
        try:
            kqueue.control([add(a.fileno()) for a, _ in pairs], 8, 0)
            for _, b in pairs:
                b.send(b"x")
            assert len(kqueue.control(None, 2, 5)) == 2
            assert len(kqueue.control(None, 8, 5)) == 5  # level-triggered: nothing lost
        finally:
            for a, b in pairs:
                a.close()
                b.close()

    def test_close(self) -> None:
        queue = kq.EmulatedKqueue()
        fd = queue.fileno()
        queue.close()
        queue.close()
        assert queue.closed
        with pytest.raises(ValueError):
            queue.control(None, 1, 0)
        with pytest.raises(ValueError):
            queue.fileno()
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.fixture
def emulated(monkeypatch) -> None:
    """The kqueue backend, pointed at the emulation through the select module it reads."""
    if hasattr(select, "kqueue") and select.kqueue is not kq.EmulatedKqueue:
        pytest.skip("a real kqueue is here; the conformance suite tests it")
    monkeypatch.setattr(select, "kqueue", kq.EmulatedKqueue, raising=False)
    monkeypatch.setattr(select, "kevent", kq.EmulatedKevent, raising=False)
    for name, value in kq.CONSTANTS.items():
        monkeypatch.setattr(select, name, value, raising=False)


class TestBackendThroughEmulation:
    def test_changes_wait_for_the_next_poll(self, emulated, pair) -> None:
        """Batched: register/modify/unregister cost no system call until poll()."""
        a, b = pair
        backend = KqueueBackend()
        try:
            backend.register(a.fileno(), READ)
            backend.modify(a.fileno(), READ | WRITE)
            assert len(backend._changes) == 2
            b.send(b"x")
            assert sorted(backend.poll(5)) == [(a.fileno(), READ), (a.fileno(), WRITE)]
            assert backend._changes == []
        finally:
            backend.close()

    def test_register_then_unregister_before_poll(self, emulated, pair) -> None:
        a, b = pair
        backend = KqueueBackend()
        try:
            backend.register(a.fileno(), READ)
            backend.unregister(a.fileno())
            b.send(b"x")
            assert backend.poll(0.05) == []
        finally:
            backend.close()

    def test_unregister_close_and_reuse_of_the_number(self, emulated) -> None:
        """The server's path: unregister, close, accept a new client on the same fd number."""
        backend = KqueueBackend()
        a, b = socket.socketpair()
        fd = a.fileno()
        try:
            backend.register(fd, READ)
            backend.poll(0)
            backend.unregister(fd)
            a.close()
            c, d = socket.socketpair()
            try:
                backend.register(c.fileno(), READ)
                d.send(b"x")
                ready = backend.poll(5)
                if not ready:  # the stale delete's ENOENT came back alone (kern_event.c): poll again
                    ready = backend.poll(5)
                assert ready == [(c.fileno(), READ)]
            finally:
                c.close()
                d.close()
        finally:
            b.close()
            backend.close()

    def test_an_add_the_kernel_refused_is_retried(self, emulated, pair) -> None:
        """ENOMEM on EV_ADD: reported once as readiness, and the add is asked for again, so the
        fd is not left without events for the rest of its life."""
        a, b = pair
        backend = KqueueBackend()
        try:
            backend._kqueue.inject_error(a.fileno(), kq.KQ_FILTER_READ, errno.ENOMEM)
            backend.register(a.fileno(), READ | WRITE)
            assert backend.poll(0) == [(a.fileno(), READ | WRITE)]  # errors come back alone
            assert backend.poll(0) == [(a.fileno(), WRITE)]  # the retried add took: nothing to read
            b.send(b"x")
            assert sorted(backend.poll(5)) == [(a.fileno(), READ), (a.fileno(), WRITE)]
        finally:
            backend.close()

    def test_a_failed_delete_of_a_live_fd_is_retried(self, emulated, pair) -> None:
        a, b = pair
        backend = KqueueBackend()
        try:
            backend.register(a.fileno(), READ | WRITE)
            backend.poll(0)
            backend._kqueue.inject_error(a.fileno(), kq.KQ_FILTER_WRITE, errno.ENOMEM)
            backend.modify(a.fileno(), READ)  # the EV_DELETE of the write filter fails
            assert backend.poll(0) == []  # not ours any more: nothing to report
            b.send(b"x")
            assert backend.poll(5) == [(a.fileno(), READ)]  # the retried delete took
        finally:
            backend.close()
