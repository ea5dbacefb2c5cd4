"""EventLoop: readers/writers, timers, signals, stop -- over every available backend.

The basic reader, writer and wakeup checks every backend must pass are the kit's
(pollserve.testing.end_to_end.LoopContract, run on the built-ins by test_backends.py)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from pollserve.backends import READ, WRITE, CapacityError
from pollserve.backends.select import FD_SETSIZE
from pollserve.loop import EventLoop


@pytest.fixture
def loop(backend_name: str) -> Iterator[EventLoop]:
    instance = EventLoop(backend_name)
    yield instance
    instance.close()


def stop_after(loop: EventLoop, seconds: float) -> None:
    """A guard so a broken test ends instead of hanging."""
    loop.call_later(seconds, loop.stop)


def test_remove_reader_stops_callbacks(loop: EventLoop, pair) -> None:
    a, b = pair
    calls = []
    loop.add_reader(a.fileno(), lambda: calls.append(1))
    assert loop.remove_reader(a.fileno()) is True
    assert loop.remove_reader(a.fileno()) is False
    assert loop.backend.interest(a.fileno()) == 0
    b.send(b"x")
    stop_after(loop, 0.1)
    loop.run_forever()
    assert calls == []


def test_reader_and_writer_share_one_registration(loop: EventLoop, pair) -> None:
    a, b = pair
    events = []
    loop.add_reader(a.fileno(), lambda: events.append("read"))
    loop.add_writer(a.fileno(), lambda: (events.append("write"), loop.remove_writer(a.fileno())))
    assert loop.backend.interest(a.fileno()) == READ | WRITE
    b.send(b"x")
    loop.call_later(0.2, loop.stop)
    loop.run_forever()
    assert "write" in events and events.count("write") == 1
    assert "read" in events
    assert loop.backend.interest(a.fileno()) == READ
    loop.remove_reader(a.fileno())
    assert loop.backend.interest(a.fileno()) == 0


def test_timers_run_in_order_and_cancel(loop: EventLoop) -> None:
    order = []
    loop.call_later(0.06, order.append, "c")
    loop.call_later(0.02, order.append, "a")
    cancelled = loop.call_later(0.03, order.append, "never")
    loop.call_later(0.04, order.append, "b")
    loop.call_soon(order.append, "soon")
    cancelled.cancel()
    loop.call_later(0.1, loop.stop)
    loop.run_forever()
    assert order == ["soon", "a", "b", "c"]


def test_timer_wakes_a_blocked_poll(loop: EventLoop) -> None:
    fired = []
    started = time.monotonic()
    loop.call_later(0.1, lambda: (fired.append(time.monotonic() - started), loop.stop()))
    loop.run_forever()
    assert len(fired) == 1 and fired[0] >= 0.09


def test_stop_from_another_thread_wakes_the_loop(loop: EventLoop) -> None:
    results = []
    threading.Timer(0.1, loop.call_soon_threadsafe, args=(results.append, "from thread")).start()
    threading.Timer(0.2, loop.stop).start()
    loop.call_later(10, loop.stop)  # guard
    started = time.monotonic()
    loop.run_forever()
    assert results == ["from thread"]
    assert time.monotonic() - started < 5


def test_callback_errors_are_logged_and_the_loop_goes_on(loop: EventLoop, pair, caplog) -> None:
    a, b = pair
    after = []

    def broken() -> None:
        a.recv(100)
        raise RuntimeError("app bug")

    loop.add_reader(a.fileno(), broken)
    loop.call_soon(lambda: 1 / 0)
    b.send(b"x")
    loop.call_later(0.1, after.append, "still running")
    loop.call_later(0.15, loop.stop)
    with caplog.at_level(logging.ERROR, logger="pollserve"):
        loop.run_forever()
    assert after == ["still running"]
    messages = [record.getMessage() for record in caplog.records]
    assert any(f"handler of fd {a.fileno()}" in message for message in messages)
    assert any("ZeroDivisionError" in (record.exc_text or "") for record in caplog.records)


def test_callbacks_scheduled_by_the_last_iteration_still_run(loop: EventLoop) -> None:
    ran = []
    loop.call_soon(lambda: (loop.stop(), loop.call_soon(ran.append, "late")))
    loop.run_forever()
    assert ran == ["late"]


def test_a_stop_before_the_run_makes_one_pass_without_waiting(loop: EventLoop, pair) -> None:
    """As asyncio's loops do: what is readable is read, what is ready runs, and the run returns."""
    a, b = pair
    got, ran = [], []
    b.send(b"x")
    loop.add_reader(a.fileno(), lambda: got.append(a.recv(10)))
    loop.call_soon(ran.append, "soon")
    loop.stop()
    loop.run_forever()
    assert got == [b"x"] and ran == ["soon"]
    assert not loop.is_running()


def test_without_the_run_after_stop_what_the_last_pass_scheduled_waits_for_the_next_run(loop: EventLoop) -> None:
    """asyncio's stop(): the batch under way finishes, what it scheduled runs at the next run_forever()."""
    loop.run_ready_after_stop = False
    ran = []
    loop.call_soon(lambda: (loop.stop(), loop.call_soon(ran.append, "late")))
    loop.run_forever()
    assert ran == []
    loop.stop()
    loop.run_forever()
    assert ran == ["late"]


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this OS")
def test_signal_handler_runs_in_the_loop(loop: EventLoop) -> None:
    received = []
    previous = signal.getsignal(signal.SIGUSR1)
    loop.add_signal_handler(signal.SIGUSR1, lambda: (received.append("usr1"), loop.stop()))
    loop.call_later(0.05, os.kill, os.getpid(), signal.SIGUSR1)
    loop.call_later(10, loop.stop)  # guard
    loop.run_forever()
    assert received == ["usr1"]
    assert loop.remove_signal_handler(signal.SIGUSR1) is True
    assert signal.getsignal(signal.SIGUSR1) == previous


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this OS")
def test_a_signal_handler_runs_while_another_python_handler_replaces_the_loops(loop: EventLoop) -> None:
    """A program may put its own handler over the loop's for a while (uvicorn's Server.capture_signals
    does): the signal still reaches the loop's handler, from the byte the C handler writes to the
    wakeup fd, as asyncio's loop runs it, and the program's handler runs too."""
    received = []
    replaced = []
    loop.add_signal_handler(signal.SIGUSR1, lambda: (received.append("loop"), loop.stop()))
    loops_own = signal.signal(signal.SIGUSR1, lambda signum, frame: replaced.append(signum))
    try:
        loop.call_later(0.05, os.kill, os.getpid(), signal.SIGUSR1)
        loop.call_later(10, loop.stop)  # guard
        loop.run_forever()
        assert replaced == [signal.SIGUSR1]
        assert received == ["loop"]
        # The loop's own handler back in place: one signal, one run, as before.
        signal.signal(signal.SIGUSR1, loops_own)
        loop.call_later(0.05, os.kill, os.getpid(), signal.SIGUSR1)
        loop.call_later(0.3, loop.stop)
        loop.run_forever()
        assert received == ["loop", "loop"]
    finally:
        signal.signal(signal.SIGUSR1, loops_own)
        loop.remove_signal_handler(signal.SIGUSR1)


class Marker:
    """Something a callback holds, to see when it is let go."""


@pytest.mark.parametrize("kind", ["reader", "call_soon"])
def test_a_kept_error_does_not_keep_the_last_callback_alive(loop: EventLoop, pair, kind: str) -> None:
    """A callback that keeps an error keeps its traceback, whose frames reach the loop's own (pure
    Python) through f_back: the loop's frames must not hold the callback they ran last, or what the
    callback holds stays alive until a collection (anyio's test_happy_eyeballs_refcycles; asyncio's
    loop sets its handle to None)."""
    import functools
    import gc
    import weakref

    kept: list[BaseException] = []

    def fail_and_keep() -> None:
        if kind == "reader":
            loop.remove_reader(pair[0].fileno())
        try:
            raise ValueError("kept")
        except ValueError as exc:
            kept.append(exc)
        loop.stop()

    callback = functools.partial(fail_and_keep)
    callback.marker = Marker()  # held by the callback only, not by its frame
    marker = weakref.ref(callback.marker)
    if kind == "reader":
        loop.add_reader(pair[0].fileno(), callback)
        pair[1].send(b"x")
    else:
        loop.call_soon(callback)
    del callback
    gc.disable()
    try:
        loop.call_later(10, loop.stop)  # guard
        loop.run_forever()
        assert kept and marker() is None
    finally:
        gc.enable()


def test_close_releases_every_fd(backend_name: str) -> None:
    psutil = pytest.importorskip("psutil")
    process = psutil.Process()
    count = process.num_handles if sys.platform == "win32" else process.num_fds
    before = count()
    for _ in range(20):
        loop = EventLoop(backend_name)
        loop.call_soon(loop.stop)
        loop.run_forever()
        loop.close()
    assert count() == before


def test_capacity_error_leaves_no_state(pair) -> None:
    if sys.platform == "win32":
        pytest.skip("Windows select limits the count of sockets, not fd numbers")
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= FD_SETSIZE + 1:
        if hard != resource.RLIM_INFINITY and hard <= FD_SETSIZE + 1:
            pytest.skip("fd limit too low")
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_SETSIZE + 2, hard))
    high = os.dup2(pair[0].fileno(), FD_SETSIZE)
    loop = EventLoop("select")
    try:
        with pytest.raises(CapacityError, match="select"):
            loop.add_reader(high, lambda: None)
        assert loop.remove_reader(high) is False
        assert loop.backend.interest(high) == 0
    finally:
        loop.close()
        os.close(high)


def test_run_forever_twice_in_a_row(loop: EventLoop) -> None:
    for _ in range(2):
        loop.call_soon(loop.stop)
        loop.run_forever()
    assert loop.iterations >= 2


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this OS")
def test_signal_is_not_lost_when_wakeups_pile_up(loop: EventLoop) -> None:
    """Hundreds of unread wakeups fill the wakeup socket; a signal arriving then must still run."""
    received = []
    loop.add_signal_handler(signal.SIGUSR1, lambda: (received.append("usr1"), loop.stop()))

    def busy_while_others_wake_us() -> None:
        waker = threading.Thread(target=lambda: [loop.call_soon_threadsafe(int) for _ in range(20_000)])
        waker.start()
        waker.join(30)
        os.kill(os.getpid(), signal.SIGUSR1)

    loop.call_soon(busy_while_others_wake_us)
    loop.call_later(5, loop.stop)  # guard: the handler would never run
    try:
        loop.run_forever()
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
    assert received == ["usr1"]


def test_wakeups_leave_at_most_one_byte_pending(loop: EventLoop) -> None:
    pending = []

    def busy_while_others_wake_us() -> None:
        waker = threading.Thread(target=lambda: [loop.call_soon_threadsafe(int) for _ in range(1000)])
        waker.start()
        waker.join(30)
        pending.append(len(loop._wakeup_recv.recv(65536, socket.MSG_PEEK)))

    loop.call_soon(busy_while_others_wake_us)
    loop.call_later(0.2, loop.stop)
    loop.run_forever()
    assert pending == [1]


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
def test_stop_from_a_plain_signal_handler_returns_at_once(loop: EventLoop) -> None:
    """PEP 475 retries the interrupted poll: stop() must wake it, whatever thread it runs on."""
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: loop.stop())
    main = threading.get_ident()
    try:
        threading.Timer(0.1, signal.pthread_kill, args=(main, signal.SIGUSR1)).start()
        loop.call_later(10, loop.stop)  # guard
        started = time.monotonic()
        loop.run_forever()
        elapsed = time.monotonic() - started
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert elapsed < 5, f"run_forever returned after {elapsed:.1f} s"


def test_cancelled_timers_release_their_callbacks_and_the_heap_shrinks(loop: EventLoop) -> None:
    import gc
    import weakref

    class Payload:
        def run(self) -> None:
            pass

    refs = []
    for _ in range(20_000):
        payload = Payload()
        refs.append(weakref.ref(payload))
        loop.call_later(300, payload.run).cancel()
    del payload
    gc.collect()
    assert sum(ref() is not None for ref in refs) == 0
    assert len(loop._timers) < 200
    # Live timers survive the rebuilds, in order.
    order = []
    loop.call_later(0.03, order.append, "b")
    for _ in range(500):
        loop.call_later(300, order.append, "never").cancel()
    loop.call_later(0.01, order.append, "a")
    loop.call_later(0.05, loop.stop)
    loop.run_forever()
    assert order == ["a", "b"]


def test_cancel_after_the_timer_ran_is_harmless(loop: EventLoop) -> None:
    ran = []
    handle = loop.call_later(0, ran.append, 1)
    loop.call_later(0.02, loop.stop)
    loop.run_forever()
    handle.cancel()
    handle.cancel()
    assert ran == [1] and loop._cancelled_timers == 0


def test_loop_survives_a_reader_whose_fd_was_closed_without_remove_reader(loop: EventLoop, pair) -> None:
    """A contract violation (close without remove_reader) must not take the loop down."""
    a, b = pair
    victim, peer = socket.socketpair()
    loop.add_reader(victim.fileno(), lambda: None)
    victim.close()
    received = []
    loop.add_reader(a.fileno(), lambda: (received.append(a.recv(10)), loop.stop()))
    b.send(b"alive")
    loop.call_later(5, loop.stop)  # guard
    try:
        loop.run_forever()
    finally:
        peer.close()
    assert received == [b"alive"]


def test_nan_delay_is_refused(loop: EventLoop) -> None:
    with pytest.raises(ValueError, match="NaN"):
        loop.call_later(float("nan"), print)
    with pytest.raises(ValueError, match="NaN"):
        loop.call_at(float("nan"), print)
    assert loop._timers == []


@pytest.mark.parametrize("delay", [float("inf"), 1e12, 1e300])
def test_a_timer_that_never_comes_does_not_break_the_wait(loop: EventLoop, delay: float) -> None:
    fired = []
    loop.call_later(delay, fired.append, "never")  # the earliest timer: it sets poll()'s timeout
    stopper = threading.Timer(0.1, loop.stop)
    stopper.start()
    try:
        loop.run_forever()  # OverflowError from epoll/poll/select would end up here
    finally:
        stopper.cancel()
    assert fired == []
    loop.call_soon(loop.stop)
    loop.run_forever()


@pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="no SIGUSR1/SIGUSR2 on this OS")
@pytest.mark.parametrize("sent", ["by a callback", "while a callback holds the loop"])
def test_two_signals_arriving_together_are_both_handled(loop: EventLoop, sent: str) -> None:
    """Two signals recorded before the loop reads its wakeup channel (a SIGTERM right after a
    SIGHUP) are both dispatched then: the second must not wait for a third to come."""
    received = []

    def handled(name: str) -> None:
        received.append(name)
        if len(received) == 2:
            loop.stop()

    def send_both() -> None:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR2)

    loop.add_signal_handler(signal.SIGUSR1, handled, "usr1")
    loop.add_signal_handler(signal.SIGUSR2, handled, "usr2")
    sender = threading.Timer(0.05, send_both)
    if sent == "by a callback":
        loop.call_soon(send_both)
    else:
        sender.start()
        loop.call_soon(time.sleep, 0.3)  # both arrive while the loop is held
    loop.call_later(5, loop.stop)  # guard: no third signal comes to deliver the second
    try:
        loop.run_forever()
    finally:
        if sender.is_alive():
            sender.cancel()
            sender.join(5)
        loop.remove_signal_handler(signal.SIGUSR1)
        loop.remove_signal_handler(signal.SIGUSR2)
    assert received == ["usr1", "usr2"]


def test_a_callback_that_reschedules_itself_lets_the_loop_go_on(loop: EventLoop, pair) -> None:
    """A callback queued by a callback waits for the next pass, so one that reschedules itself
    for ever still lets I/O, timers and stop() through, each within a pass of being due."""
    a, b = pair
    runs = 0
    seen: dict[str, int] = {}
    give_up = time.monotonic() + 10  # bounds, should callbacks queued by callbacks run in their pass

    def again() -> None:
        nonlocal runs
        runs += 1
        if runs == 100:
            b.send(b"x")
        if runs < 1_000_000 and time.monotonic() < give_up:
            loop.call_soon(again)

    def on_readable() -> None:
        a.recv(10)
        seen["read at run"] = runs

    def on_timer() -> None:
        seen["timer at run"] = runs
        loop.stop()

    loop.add_reader(a.fileno(), on_readable)
    loop.call_soon(again)
    loop.call_later(0.05, on_timer)
    loop.run_forever()
    assert seen["read at run"] <= 101, seen
    assert seen["timer at run"] < 1_000_000 and time.monotonic() < give_up, seen
    assert runs <= seen["timer at run"] + 1, "after stop(), only what was queued runs"
