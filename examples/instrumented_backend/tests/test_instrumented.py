"""The instrumented backends: pollserve's own backend tests, and the counting on top.

The suite comes from the pollserve.testing kit (``pip install 'pollserve[testing]'``),
pulled in by subclassing BackendSuite; ``python -m pollserve.testing
instrumented-epoll`` runs the same tests from the command line.
"""

from __future__ import annotations

import logging
import socket

import pollserve_instrumented as instrumented
import pytest

from pollserve.backends import READ, WRITE, auto_backend
from pollserve.testing.suite import BackendSuite


class TestInstrumentedSuite(BackendSuite):
    @pytest.fixture
    def backend_class(self) -> type[instrumented.InstrumentedBackend]:
        """The wrapper of the best built-in here."""
        return instrumented.WRAPPERS[auto_backend().name]


@pytest.fixture
def backend():
    instance = instrumented.WRAPPERS[auto_backend().name]()
    yield instance
    instance.close()


def test_every_call_is_counted(backend) -> None:
    a, b = socket.socketpair()
    try:
        backend.register(a.fileno(), READ)
        backend.modify(a.fileno(), READ | WRITE)
        b.send(b"x")
        assert backend.wait(5)
        backend.unregister(a.fileno())
        with pytest.raises(KeyError):
            backend.unregister(a.fileno())  # a failed call is a call too
    finally:
        a.close()
        b.close()
    report = backend.report()
    assert {name: numbers["calls"] for name, numbers in report.items()} == {
        "register": 1,
        "modify": 1,
        "unregister": 2,
        "wait": 1,
    }
    assert report["wait"]["events"] >= 1
    assert 0 < report["wait"]["slowest"] <= report["wait"]["seconds"]


def test_the_class_says_what_the_inner_one_says() -> None:
    for name, cls in instrumented.WRAPPERS.items():
        assert cls.name == f"instrumented-{name}"
        assert (cls.read_bits, cls.write_bits, cls.capacity) == (
            cls.inner.read_bits,
            cls.inner.write_bits,
            cls.inner.capacity,
        )
        assert cls.is_available() == cls.inner.is_available()


def test_close_logs_one_line_when_used(backend, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="pollserve.instrumented"):
        backend.wait(0)
        backend.close()
        backend.close()
        type(backend).is_available()  # creates and closes an instance that made no call: no line
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith(f"{backend.name}: register 0 calls")
