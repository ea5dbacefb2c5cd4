"""The /dev/poll EMULATION pinned to what CPython documents for select.devpoll objects."""

from __future__ import annotations

import select
import time

import pytest

pytestmark = pytest.mark.skipif(not hasattr(select, "poll"), reason="the devpoll emulation is built on poll()")

from devpoll_emulation import EmulatedDevpoll  # noqa: E402


@pytest.fixture
def devpoll():
    poller = EmulatedDevpoll()
    yield poller
    poller.close()


def test_register_and_poll(devpoll, pair) -> None:
    a, b = pair
    devpoll.register(a.fileno(), select.POLLIN)
    assert devpoll.poll(0) == []
    b.send(b"x")
    assert devpoll.poll(5000) == [(a.fileno(), select.POLLIN)]


def test_registering_twice_is_refused(devpoll, pair) -> None:
    """ "Registering a file descriptor that's already registered is not an error, but the result is
    undefined" -- so the emulation makes it fail, and a backend relying on it fails here first."""
    devpoll.register(pair[0], select.POLLIN)
    with pytest.raises(AssertionError):
        devpoll.register(pair[0], select.POLLOUT)


def test_modify_replaces_the_mask(devpoll, pair) -> None:
    """modify(): "This method does an unregister() followed by a register()"."""
    a, b = pair
    b.send(b"x")
    devpoll.register(a.fileno(), select.POLLOUT)
    devpoll.modify(a.fileno(), select.POLLIN)
    assert devpoll.poll(0) == [(a.fileno(), select.POLLIN)]


def test_unregister_unknown_is_ignored(devpoll, pair) -> None:
    """ "Attempting to remove a file descriptor that was never registered is safely ignored"."""
    devpoll.unregister(pair[0].fileno())


def test_hangup_is_reported_unasked(devpoll, pair) -> None:
    a, b = pair
    devpoll.register(a.fileno(), select.POLLOUT)
    b.close()
    ((fd, events),) = devpoll.poll(5000)
    assert fd == a.fileno() and events & select.POLLHUP


def test_timeout_in_milliseconds(devpoll, pair) -> None:
    devpoll.register(pair[0].fileno(), select.POLLIN)
    started = time.monotonic()
    assert devpoll.poll(200) == []
    assert 0.15 <= time.monotonic() - started < 5


def test_close(pair) -> None:
    poller = EmulatedDevpoll()
    assert poller.fileno() >= 0
    poller.close()
    assert poller.closed
    with pytest.raises(ValueError):
        poller.poll(0)
