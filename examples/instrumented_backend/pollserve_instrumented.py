"""pollserve backends that count and time every call a built-in backend makes.

Installed, this module adds one backend per built-in through the
``pollserve.backends`` entry points of its pyproject.toml: ``instrumented-epoll``,
``instrumented-poll``, ``instrumented-select``, ``instrumented-kqueue`` and
``instrumented-devpoll``, each available where its built-in is.  A server run
with ``pollserve --backend instrumented-epoll`` serves exactly as on epoll, and
logs one line when it stops: for register, modify, unregister and the waits,
how many calls, how long they took in all and the slowest one (a wait's time
includes the time it blocked), and how many events the waits returned.
``report()`` gives the same numbers to a program.
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

from pollserve.backends import BACKENDS, Backend

log = logging.getLogger("pollserve.instrumented")

OPERATIONS = ("register", "modify", "unregister", "wait")


class Timing:
    """The calls of one operation: how many, and how long they took in all and at most."""

    __slots__ = ("calls", "seconds", "slowest")

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0
        self.slowest = 0.0

    def add(self, seconds: float) -> None:
        self.calls += 1
        self.seconds += seconds
        if seconds > self.slowest:
            self.slowest = seconds


class InstrumentedBackend(Backend):
    """An instance of ``inner``, every call passed through and timed.

    The inner backend keeps the registrations, so ``interest()`` and ``len()``
    ask it; the class attributes the loop reads are the inner class's.
    """

    inner: ClassVar[type[Backend]]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = f"instrumented-{cls.inner.name}"
        cls.read_bits, cls.write_bits = cls.inner.read_bits, cls.inner.write_bits
        cls.capacity, cls.capacity_hint = cls.inner.capacity, cls.inner.capacity_hint

    def __init__(self) -> None:
        super().__init__()
        self._inner = self.inner()
        self.timings = {operation: Timing() for operation in OPERATIONS}
        self.events = 0
        # The loop calls wait(); time the inner backend's own wait, which may be the kernel call itself.
        self.wait = self._timed_wait

    def __len__(self) -> int:
        return len(self._inner)

    def interest(self, fd: int) -> int:
        return self._inner.interest(fd)

    def register(self, fd: int, events: int) -> None:
        started = time.perf_counter()
        try:
            self._inner.register(fd, events)
        finally:
            self.timings["register"].add(time.perf_counter() - started)

    def modify(self, fd: int, events: int) -> None:
        started = time.perf_counter()
        try:
            self._inner.modify(fd, events)
        finally:
            self.timings["modify"].add(time.perf_counter() - started)

    def unregister(self, fd: int) -> None:
        started = time.perf_counter()
        try:
            self._inner.unregister(fd)
        finally:
            self.timings["unregister"].add(time.perf_counter() - started)

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        started = time.perf_counter()
        events = self._inner.poll(timeout)
        self.timings["wait"].add(time.perf_counter() - started)
        self.events += len(events)
        return events

    def _timed_wait(self, timeout: float | None) -> list[tuple[int, int]]:
        started = time.perf_counter()
        events = self._inner.wait(timeout)
        self.timings["wait"].add(time.perf_counter() - started)
        self.events += len(events)
        return events

    def report(self) -> dict[str, dict[str, float]]:
        """{operation: {"calls", "seconds", "slowest"}}; the waits also have "events"."""
        numbers = {
            operation: {"calls": timing.calls, "seconds": timing.seconds, "slowest": timing.slowest}
            for operation, timing in self.timings.items()
        }
        numbers["wait"]["events"] = self.events
        return numbers

    def close(self) -> None:
        if not self._closed and any(timing.calls for timing in self.timings.values()):
            log.info("%s: %s", self.name, summary(self.report()))
        super().close()
        self._inner.close()


def summary(report: dict[str, dict[str, float]]) -> str:
    """One line: each operation's calls, total and slowest time; the events the waits returned."""
    parts = []
    for operation, numbers in report.items():
        part = (
            f"{operation} {numbers['calls']:.0f} calls, {numbers['seconds'] * 1e3:.3f} ms in all, "
            f"slowest {numbers['slowest'] * 1e6:.0f} us"
        )
        if "events" in numbers:
            part += f", {numbers['events']:.0f} events"
        parts.append(part)
    return "; ".join(parts)


class InstrumentedEpoll(InstrumentedBackend):
    inner = BACKENDS["epoll"]


class InstrumentedKqueue(InstrumentedBackend):
    inner = BACKENDS["kqueue"]


class InstrumentedDevpoll(InstrumentedBackend):
    inner = BACKENDS["devpoll"]


class InstrumentedPoll(InstrumentedBackend):
    inner = BACKENDS["poll"]


class InstrumentedSelect(InstrumentedBackend):
    inner = BACKENDS["select"]


#: the wrapper of each built-in, by the built-in's name
WRAPPERS: dict[str, type[InstrumentedBackend]] = {
    cls.inner.name: cls
    for cls in (InstrumentedEpoll, InstrumentedKqueue, InstrumentedDevpoll, InstrumentedPoll, InstrumentedSelect)
}
