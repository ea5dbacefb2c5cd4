"""EventLoop: the only caller of the backend's ``wait()`` (``poll()`` without the checks).

One thread, one backend.  Per fd the loop keeps at most one reader and one
writer callback; an event is dispatched with one dict lookup and one call,
reading the kernel's mask through the backend's ``read_bits`` and
``write_bits``.  The loop counts its passes and the events they brought.
Timers live in a heap, callbacks scheduled with ``call_soon`` in a deque.  A
socketpair is the loop's wakeup channel, and only that: its bytes carry no
meaning.  A signal is recorded by the Python-level handler in a deque the loop
reads, because the byte ``signal.set_wakeup_fd`` writes is dropped when the
socket is full (CPython issue 74224; curio issue 118).  The C
handler's byte still matters: it wakes a poll() that a signal landing just
before it would otherwise not interrupt, and, compiled, it says that a signal
came whose Python-level handler may not have run yet (CPython 3.10 runs it only
when bytecode runs: ``compiled.let_signal_handlers_run``).  ``call_soon_threadsafe`` and
``stop`` write a byte only when none is pending.  A socketpair rather than a
pipe because on Windows select() accepts sockets only.

Loop health costs one more clock reading per pass, taken just before the
backend's wait: the time from the reading after one wait to the reading
before the next is the pass's busy time, summed in ``busy_time``.  Callbacks
from ``call_soon`` and timers, which are not on the per-request path, are timed
one by one when the check is on.  A pass whose handlers took longer than
``slow_callback`` seconds (its time less those callbacks') is then explained
after the fact: when it dispatched one event, its handler held the loop that
long (``on_slow_callback``); when it dispatched more, the loop cannot tell
which, so it reports the pass as such (``on_slow_pass``) and times each
handler for a while (``time_handlers_for``), so that the next slow one is named
with its own time.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import heapq
import logging
import math
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from mypy_extensions import mypyc_attr

from .backends import READ, WRITE, Backend, create_backend
from .compiled import let_signal_handlers_run

log = logging.getLogger("pollserve")

#: --slow-callback's default: asyncio's slow_callback_duration
DEFAULT_SLOW_CALLBACK = 0.1

# Compiled, a Final is a C static: time.monotonic() would be a module attribute lookup per call.
_monotonic: Final = time.monotonic

#: fds below this have their handlers in a list indexed by fd as well as in the dict (``_by_fd``):
#: the dispatch indexes it, ~110 instructions an event fewer than a dict lookup (callgrind).  Above
#: it (a Windows socket handle can be any number, an fd dup2()'d anywhere) the dispatch looks in the
#: dict: a table of 64 Ki entries is 512 KiB.
FD_TABLE_LIMIT: Final = 1 << 16


def describe_callback(callback: object) -> str:
    """A callback as its author knows it: ``module:Class.method``, or what the object it is bound
    to says of it through a ``_describe_handler(callback)`` method (a connection names its app's
    protocol and peer).  Underscored: it is the loop's business, not part of the Transport."""
    while isinstance(callback, functools.partial):
        func = callback.func
        # partial(context.run, fn): run in a context (the asyncio face's transports); fn is the callback.
        if isinstance(getattr(func, "__self__", None), contextvars.Context) and callback.args:
            callback = callback.args[0]
        else:
            callback = func
    # A bound method's object names it; so does an object that is queued itself (an asyncio.Handle).
    owner = getattr(callback, "__self__", callback)
    describe = getattr(owner, "_describe_handler", None)
    if callable(describe):
        return str(describe(callback))
    module = getattr(callback, "__module__", None)
    name = getattr(callback, "__qualname__", None) or repr(callback)
    return f"{module}:{name}" if module else name


def log_slow_callback(name: str, seconds: float) -> None:
    """What the loop does about a slow callback when nobody asked for more (service.py does)."""
    log.warning("slow callback: %s took %.3f s", name, seconds)


def log_slow_pass(what: str, seconds: float) -> None:
    """What the loop does about a slow pass of several handlers when nobody asked for more."""
    log.warning("slow pass: %.3f s over %s", seconds, what)


def describe_pass(handlers: list[Callable[[], Any]], removed: int) -> str:
    """What a slow pass ran, for its report: ``2 handlers (A, B)``, with at most three names, and
    the events whose handler was removed before the pass ended."""
    parts = []
    if handlers:
        names = sorted({describe_callback(handler) for handler in handlers})
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        parts.append(f"{len(handlers)} handler{'' if len(handlers) == 1 else 's'} ({shown})")
    if removed:
        parts.append(f"{removed} event{'' if removed == 1 else 's'} whose handler has since been removed")
    return " and ".join(parts)


class Handle:
    """A scheduled callback; ``cancel()`` keeps it from running and lets go of the callback."""

    __slots__ = ("callback", "args", "cancelled", "when", "_loop")

    def __init__(
        self, callback: Callable[..., Any], args: tuple[Any, ...], when: float = 0.0, loop: EventLoop | None = None
    ) -> None:
        self.callback: Callable[..., Any] | None = callback
        self.args = args
        self.cancelled = False
        self.when = when
        #: set while the handle sits in the loop's timer heap, so cancel() can count it there
        self._loop = loop

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        # A cancelled timer stays in the heap until its deadline or a rebuild: without
        # this, it would keep its callback (a protocol, a connection) alive that long.
        self.callback = None
        self.args = ()
        loop, self._loop = self._loop, None
        if loop is not None:
            loop._timer_cancelled()

    def __repr__(self) -> str:
        state = " cancelled" if self.cancelled else ""
        return f"<Handle {getattr(self.callback, '__qualname__', self.callback)}{state}>"


class QueuedCallback:
    """A callback queued as it is and run by its own ``_run()``: the asyncio face's compiled handles
    (``aio/soon.py``), which run in a context and report their errors as asyncio's do.  Compiled, the
    pass reads ``_cancelled`` and calls ``_run`` with no attribute lookup: through an ``asyncio.Handle``'s
    interface that was four lookups and a method call's, about 500 instructions a callback."""

    _cancelled: bool = False

    def _run(self) -> None:
        raise NotImplementedError


# Compiled, it stays a base that interpreted code may subclass (setup.py, DESIGN.md).
@mypyc_attr(allow_interpreted_subclasses=True)
class EventLoop:
    """A readiness event loop over one backend."""

    def __init__(self, backend: Backend | str | None = None) -> None:
        if backend is None or isinstance(backend, str):
            backend = create_backend(backend or "auto")
        self.backend: Backend = backend
        self._readers: dict[int, Callable[[], Any]] = {}
        self._writers: dict[int, Callable[[], Any]] = {}
        #: the same handlers indexed by fd, None where there is none, for the dispatch: kept by
        #: add_reader() and the others (_by_fd), grown to the highest fd with a handler below
        #: ``_fd_table_limit`` (FD_TABLE_LIMIT; lower in a test, for fds past it)
        self._readers_by_fd: list[Callable[[], Any] | None] = []
        self._writers_by_fd: list[Callable[[], Any] | None] = []
        self._fd_table_limit = FD_TABLE_LIMIT
        #: what call_soon and the due timers queued: the core's Handles, and the asyncio face's
        #: ``asyncio.Handle``s queued as they are (``_run_ready``), with no Handle of the core around each
        self._ready: deque[Any] = deque()
        self._timers: list[tuple[float, int, Handle]] = []
        self._timer_seq = 0
        #: in asyncio's order, the last timer set before the pass's queued callbacks ran: the timers
        #: those set run at the next pass at the earliest, as on asyncio's loop (_pass_in_asyncio_order)
        self._timers_settled = 0
        #: cancelled handles still in the heap
        self._cancelled_timers = 0
        self._stopping = False
        self._running = False
        self._closed = False
        #: run what the last pass scheduled once stop() took effect (the callback API's promise);
        #: asyncio's loops leave it for the next run, and the asyncio face says so (aio.loop)
        self.run_ready_after_stop = True
        #: order each pass as asyncio's loops do: the callbacks queued before the poll run before its
        #: I/O handlers, and the timers it found due after them (read when run_forever() starts);
        #: the callback API runs the I/O handlers first, the asyncio face asks for this (aio.loop)
        self.asyncio_order = False
        #: how many times the loop has returned from poll(), and the (fd, events) pairs it got in all
        self.iterations = 0
        self.events_total = 0
        #: the monotonic clock, read once per iteration right after poll() returns: a
        #: timestamp for handlers that need one per event without a clock call each
        self.now = time.monotonic()
        #: seconds spent outside the backend's wait while running, up to the pass that last ran
        #: timers (the loop publishes it then, not every pass); busy_seconds() adds that pass so far
        self.busy_time = 0.0
        #: a handler or callback running longer than this is reported to ``on_slow_callback``
        #: with its own time, and a pass of several handlers not timed one by one to ``on_slow_pass``
        #: with what it ran (0 disables); read when run_forever() starts
        self.slow_callback = DEFAULT_SLOW_CALLBACK
        self.on_slow_callback: Callable[[str, float], object] = log_slow_callback
        self.on_slow_pass: Callable[[str, float], object] = log_slow_pass
        #: after a slow pass that ran several handlers, each is timed this long, to name the next one
        self.time_handlers_for = 60.0
        self._time_handlers_until = 0.0
        #: the pass whose ready callbacks were timed, and the seconds they took
        self._ready_pass = -1
        self._ready_seconds = 0.0
        #: the asyncio face's timers set by a loop.time() of their own, due by that clock
        #: (pollserve.aio.clock); None while there are none
        self._own_clock_timers: Callable[[], int] | None = None
        self._signal_handlers: dict[int, Handle] = {}
        #: signal numbers the Python-level handler recorded, for the loop to dispatch
        self._pending_signals: deque[int] = deque()
        #: that handler, as given to signal.signal(), to know it again in signal.getsignal()
        self._signal_recorder: Callable[[int, object], None] = self._record_signal
        #: a wakeup byte was written and the loop has not drained it yet
        self._wakeup_pending = False
        self._saved_signal_handlers: dict[int, Any] = {}
        self._saved_wakeup_fd: int | None = None
        self._wakeup_recv, self._wakeup_send = socket.socketpair()
        self._wakeup_recv.setblocking(False)
        self._wakeup_send.setblocking(False)
        # Not through add_reader(), which a subclass may override (the asyncio face does).
        self._set_interest(self._wakeup_recv.fileno(), READ)
        on_wakeup = self._on_wakeup
        self._readers[self._wakeup_recv.fileno()] = on_wakeup
        _by_fd(self._readers_by_fd, self._wakeup_recv.fileno(), on_wakeup, self._fd_table_limit)

    # -- fd interest ------------------------------------------------------------

    def _set_interest(self, fd: int, events: int) -> None:
        backend = self.backend
        old = backend.interest(fd)
        if events == old:
            return
        if not old:
            backend.register(fd, events)
        elif not events:
            backend.unregister(fd)
        else:
            backend.modify(fd, events)

    def add_reader(self, fd: int, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` whenever fd is readable.  May raise CapacityError."""
        self._set_interest(fd, self.backend.interest(fd) | READ)
        self._readers[fd] = callback
        _by_fd(self._readers_by_fd, fd, callback, self._fd_table_limit)

    def remove_reader(self, fd: int) -> bool:
        if self._readers.pop(fd, None) is None:
            return False
        _by_fd(self._readers_by_fd, fd, None, self._fd_table_limit)
        self._set_interest(fd, self.backend.interest(fd) & ~READ)
        return True

    def has_reader(self, fd: int) -> bool:
        return fd in self._readers

    def add_writer(self, fd: int, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` whenever fd is writable.  May raise CapacityError."""
        self._set_interest(fd, self.backend.interest(fd) | WRITE)
        self._writers[fd] = callback
        _by_fd(self._writers_by_fd, fd, callback, self._fd_table_limit)

    def has_writer(self, fd: int) -> bool:
        return fd in self._writers

    def remove_writer(self, fd: int) -> bool:
        if self._writers.pop(fd, None) is None:
            return False
        _by_fd(self._writers_by_fd, fd, None, self._fd_table_limit)
        self._set_interest(fd, self.backend.interest(fd) & ~WRITE)
        return True

    # -- callbacks and timers ---------------------------------------------------

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> Handle:
        """Run callback(*args) on the next iteration, after I/O callbacks."""
        handle = Handle(callback, args)
        self._ready.append(handle)
        return handle

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> Handle:
        """call_soon from any thread: also wakes the loop if it is blocked in poll()."""
        handle = self.call_soon(callback, *args)
        self._wake()
        return handle

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Handle:
        """Run callback(*args) after delay seconds (monotonic clock)."""
        return self.call_at(time.monotonic() + delay, callback, *args)

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Handle:
        """Run callback(*args) at loop time ``when``; an infinite time is a timer that never fires."""
        if when != when:
            raise ValueError("a timer cannot be set for NaN seconds")
        handle = Handle(callback, args, when, self)
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, handle))
        return handle

    #: poll() waits at most this long, so an infinite or far-off timer (which epoll, poll and
    #: select refuse with OverflowError) only costs a wakeup an hour
    max_poll_timeout = 3600.0

    #: the heap is rebuilt only past this size (asyncio's _MIN_SCHEDULED_TIMER_HANDLES)
    _min_heap_to_rebuild = 100

    def _timer_cancelled(self) -> None:
        """Rebuild the heap once cancelled entries are more than half of it (asyncio's rule).

        Rebuilding costs O(n) after n/2 cancellations, so O(1) per cancel; it runs here,
        on cancel, so the loop's iteration pays nothing for it.
        """
        self._cancelled_timers += 1
        timers = self._timers
        if len(timers) >= self._min_heap_to_rebuild and 2 * self._cancelled_timers > len(timers):
            timers[:] = [entry for entry in timers if not entry[2].cancelled]
            heapq.heapify(timers)
            self._cancelled_timers = 0

    def time(self) -> float:
        """The monotonic clock, read now (``now`` is the reading of this iteration)."""
        return time.monotonic()

    # -- signals -----------------------------------------------------------------

    def add_signal_handler(self, signum: int, callback: Callable[..., Any], *args: Any) -> None:
        """Run callback(*args) in the loop when signum arrives.  Main thread only."""
        if not self._signal_handlers:
            # The C-level handler writes the signal number here, waking poll().
            self._saved_wakeup_fd = signal.set_wakeup_fd(self._wakeup_send.fileno(), warn_on_full_buffer=False)
        try:
            previous = signal.signal(signum, self._signal_recorder)
        except (ValueError, OSError):
            if not self._signal_handlers:
                signal.set_wakeup_fd(self._saved_wakeup_fd if self._saved_wakeup_fd is not None else -1)
                self._saved_wakeup_fd = None
            raise
        self._saved_signal_handlers.setdefault(signum, previous)
        self._signal_handlers[signum] = Handle(callback, args)

    def remove_signal_handler(self, signum: int) -> bool:
        if self._signal_handlers.pop(signum, None) is None:
            return False
        signal.signal(signum, self._saved_signal_handlers.pop(signum))
        if not self._signal_handlers:
            signal.set_wakeup_fd(self._saved_wakeup_fd if self._saved_wakeup_fd is not None else -1)
            self._saved_wakeup_fd = None
        return True

    def _record_signal(self, signum: int, frame: object) -> None:
        """The Python-level handler: runs on the main thread between bytecodes, even mid-poll."""
        self._pending_signals.append(signum)
        self._wake()

    def _wake(self) -> None:
        if self._wakeup_pending:
            return
        self._wakeup_pending = True
        # Full (a byte is pending, so the loop wakes anyway) or closed (the loop is gone): both fine.
        with contextlib.suppress(OSError):
            self._wakeup_send.send(b"\0")

    def _on_wakeup(self) -> None:
        signalled = b""
        while True:
            try:
                data = self._wakeup_recv.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            # The C handler writes the signal's number; our own wakeups write zeros.
            if data.strip(b"\0"):
                signalled += data.replace(b"\0", b"")
        # Cleared only after draining: a thread that saw the flag set has queued its
        # callback already, and one that sees it clear writes a byte of its own.
        self._wakeup_pending = False
        pending = self._pending_signals
        if signalled:
            if not pending:
                let_signal_handlers_run()  # compiled, the Python-level handler may not have run yet
            self._dispatch_unrecorded_signals(signalled)
        while pending:
            handle = self._signal_handlers.get(pending.popleft())
            if handle is not None:
                self._ready.append(handle)

    def _dispatch_unrecorded_signals(self, signalled: bytes) -> None:
        """Run the handlers of the signals whose bytes came while another Python-level handler stood
        in for the loop's (uvicorn's ``Server.capture_signals`` puts its own over it for a while): the
        C handler writes the byte whichever Python handler runs, and asyncio's loop dispatches every
        signal from those bytes.  While the loop's own handler is in place, the deque it fills is the
        record, since a byte is dropped when the wakeup socket is full."""
        recorded = set(self._pending_signals)
        for signum in signalled:
            handle = self._signal_handlers.get(signum)
            if handle is None or signum in recorded or signal.getsignal(signum) is self._signal_recorder:
                continue
            self._ready.append(handle)

    # -- running -----------------------------------------------------------------

    def stop(self) -> None:
        """Make run_forever() return after the current iteration.  Safe from any thread."""
        self._stopping = True
        # Even on the loop's own thread: from a signal handler, stop() runs inside an
        # interrupted poll() that Python retries (PEP 475) unless something is readable.
        if self._running:
            self._wake()

    def is_running(self) -> bool:
        return self._running

    def run_forever(self) -> None:
        if self._running:
            raise RuntimeError("the loop is already running")
        if self._closed:
            raise RuntimeError("the loop is closed")
        self._running = True
        self.now = time.monotonic()
        try:
            # At least one pass, as asyncio's loops do: a stop() before the run polls once, without
            # waiting, and runs what is ready.  Handlers timed since a slow pass of several go on
            # being timed across runs.
            timed = self.now < self._time_handlers_until
            while True:
                if timed:
                    self._run_timed()
                    timed = False
                elif not self._run():
                    break
                else:
                    timed = True
                if self._stopping:
                    break
            # What the last iteration scheduled (connection_lost calls, say) still runs.
            if self.run_ready_after_stop:
                _run_ready(self)
        finally:
            self._stopping = False
            self._running = False

    def _run(self) -> bool:
        """The hot path: one pass per wakeup of the backend, until stop() (one pass at least);
        True instead when a slow pass ran several handlers, for run_forever() to time each for a
        while (_run_timed).

        Everything a pass uses is a local variable, and a pass calls no function
        of its own but the dispatch unless there is work for it (a due timer, a
        ready callback, a slow pass), and no method: at a steady load a wakeup often brings a single
        event, so what a pass costs is paid per request.  Two clock readings per
        pass, one on each side of poll(): the one after is the loop's ``now``, the
        one before ends the pass for ``busy_time`` (the queued callbacks' last,
        when they ran).  The timeout is reckoned from ``now``, so a timer may fire
        late by the time the pass took, never early.
        """
        poll = self.backend.wait
        batch = self._wait_batch()
        kernel_wait = self.backend.kernel_wait if batch else None
        read_bits = self.backend.read_bits
        write_bits = self.backend.write_bits
        readers = self._readers
        writers = self._writers
        readers_by_fd = self._readers_by_fd
        writers_by_fd = self._writers_by_fd
        ready = self._ready
        timers = self._timers  # rebuilt and cleared in place, never replaced
        monotonic = time.monotonic
        max_timeout = self.max_poll_timeout
        slow = self.slow_callback if self.slow_callback > 0 else math.inf
        events: list[tuple[int, int]] = []
        now = self.now
        # A local, published to busy_time when timers run (the health probe's tick reads it there)
        # and on the way out: a store per pass cost ~200 instructions (callgrind).
        busy_total = self.busy_time
        asyncio_order = self.asyncio_order
        while True:
            callbacks_ended = -1.0
            if asyncio_order:
                self._timers_settled = self._timer_seq
                if ready:
                    # the queued callbacks, before the poll (_pass_in_asyncio_order)
                    callbacks_ended = _run_ready(self)
            if ready or self._stopping:
                timeout: float | None = 0
            elif timers:
                # Comparisons, not min()/max(): the builtins cost ~1,500 instructions here.  On a
                # float of its own, boxed once: compiled, ``timeout`` is an object.
                due_in = timers[0][0] - now
                if due_in < 0:
                    timeout = 0
                elif due_in > max_timeout:
                    timeout = max_timeout
                else:
                    timeout = due_in
            else:
                timeout = None
            # The callbacks' last reading, just taken, ends the pass as a reading of its own would.
            waited = callbacks_ended if callbacks_ended >= 0 else monotonic()
            busy = waited - now
            busy_total += busy
            if busy > slow and self._slow_pass(events, busy):
                self.busy_time = busy_total
                self.now = waited  # _run_timed counts its passes from here
                return True
            events = poll(timeout) if kernel_wait is None else kernel_wait(timeout, batch)
            self.now = now = monotonic()
            self.iterations += 1
            self.events_total += len(events)
            if asyncio_order:
                if timers and timers[0][0] <= now:
                    self.busy_time = busy_total
                _pass_in_asyncio_order(
                    self, events, False, readers, writers, readers_by_fd, writers_by_fd, read_bits, write_bits
                )
                if self._stopping:
                    break
                continue
            _dispatch(events, readers, writers, readers_by_fd, writers_by_fd, read_bits, write_bits)
            if timers and timers[0][0] <= now:
                self.busy_time = busy_total
                _collect_due_timers(self)
            if ready:
                _run_ready(self)
            if self._stopping:
                break
        busy = monotonic() - now
        self.busy_time = busy_total + busy
        if busy > slow:  # the last pass, before stop() took effect
            self._slow_pass(events, busy)
        return False

    def _run_timed(self) -> None:
        """The loop as _run, but with each handler timed, until ``time_handlers_for`` has passed
        since the last slow pass that ran several (or stop()), one pass at least: the slow one is
        named.  Rare, so plain rather than fast."""
        while True:
            if self.asyncio_order:
                self._timers_settled = self._timer_seq
                if self._ready:
                    _run_ready(self)
            if self._ready or self._stopping:
                timeout: float | None = 0.0
            elif self._timers:
                timeout = min(max(self._timers[0][0] - self.now, 0.0), self.max_poll_timeout)
            else:
                timeout = None
            self.busy_time += time.monotonic() - self.now
            kernel_wait = self.backend.kernel_wait if self._wait_batch() else None
            if kernel_wait is None:
                events = self.backend.wait(timeout)
            else:
                events = kernel_wait(timeout, self.backend.wait_max_events)
            self.now = time.monotonic()
            self.iterations += 1
            self.events_total += len(events)
            if self.asyncio_order:
                backend = self.backend
                _pass_in_asyncio_order(
                    self,
                    events,
                    True,
                    self._readers,
                    self._writers,
                    self._readers_by_fd,
                    self._writers_by_fd,
                    backend.read_bits,
                    backend.write_bits,
                )
            else:
                self._dispatch_timed(events)
                if self._timers and self._timers[0][0] <= self.now:
                    _collect_due_timers(self)
                if self._ready:
                    _run_ready(self)
            if self._stopping or self.now >= self._time_handlers_until:
                break
        waited = time.monotonic()
        self.busy_time += waited - self.now
        self.now = waited  # _run counts its passes from here

    def _wait_batch(self) -> int:
        """The bound to pass as the backend's wait's second argument; 0 to call it with one."""
        backend = self.backend
        if backend.kernel_wait is not None and backend.wait is backend.kernel_wait:
            return backend.wait_max_events
        return 0

    def busy_seconds(self) -> float:
        """``busy_time`` with the pass under way: exact in a timer's callback (the health probe's)."""
        return self.busy_time + (time.monotonic() - self.now if self._running else 0.0)

    def _handlers(self, events: list[tuple[int, int]]) -> tuple[list[Callable[[], Any]], int]:
        """The handlers a pass's events called, as far as they are still registered, and how many
        of its events have none now (a connection that closed, say).  The loop's own wakeup reader
        is left out: it reads a byte, and a signal or stop() often comes with it.  (A handler that
        removed another fd's handler, or its own fd's other one, hides that one's run: rare.)"""
        read_bits = self.backend.read_bits
        write_bits = self.backend.write_bits
        wakeup = self._wakeup_recv.fileno()
        found: list[Callable[[], Any]] = []
        removed = 0
        for fd, mask in events:
            if fd == wakeup:
                continue
            before = len(found)
            for bits, table in ((read_bits, self._readers), (write_bits, self._writers)):
                callback = table.get(fd) if mask & bits else None
                if callback is not None:
                    found.append(callback)
            if len(found) == before:
                removed += 1
        return found, removed

    def _slow_pass(self, events: list[tuple[int, int]], seconds: float) -> bool:
        """A pass held the loop past slow_callback: say what it knows.  Its time less that of the
        callbacks timed one by one (reported on their own) is its handlers'.  One handler is named
        with that time.  Several, or one since removed, are reported as a pass, never as one of
        them with the time of all, and from then on each handler is timed for a while (True), so
        that the next slow one is named with its own time."""
        if self._ready_pass == self.iterations:
            seconds -= self._ready_seconds  # the timed callbacks have been reported already
        if seconds <= self.slow_callback:
            return False
        handlers, removed = self._handlers(events)
        if not handlers and not removed:
            # No handler ran: the time is the loop's own (its timers' heap, a garbage collection,
            # the process not scheduled), which the lag and utilization show.  Nothing to name.
            return False
        if len(handlers) == 1 and not removed:
            self._report_slow(handlers[0], seconds)
            return False
        self._time_handlers_until = self.now + self.time_handlers_for
        what = describe_pass(handlers, removed)
        try:
            self.on_slow_pass(what, seconds)
        except Exception:
            log.exception("unhandled error reporting the slow pass over %s", what)
        return True

    def _dispatch_timed(self, events: list[tuple[int, int]]) -> None:
        """A pass's dispatch with each handler timed: the slow one is named."""
        read_bits = self.backend.read_bits
        write_bits = self.backend.write_bits
        slow = self.slow_callback
        started = time.monotonic()
        for fd, mask in events:
            for bits, table in ((read_bits, self._readers), (write_bits, self._writers)):
                callback = table.get(fd) if mask & bits else None
                if callback is None:
                    continue
                try:
                    callback()
                except Exception:
                    log.exception("unhandled error in the handler of fd %d", fd)
                ended = time.monotonic()
                if ended - started > slow:
                    self._report_slow(callback, ended - started)
                started = ended

    def _report_slow(self, callback: object, seconds: float) -> None:
        self._notify_slow(describe_callback(callback), seconds)

    def _notify_slow(self, name: str, seconds: float) -> None:
        try:
            self.on_slow_callback(name, seconds)
        except Exception:
            log.exception("unhandled error reporting the slow callback %s", name)

    def close(self) -> None:
        """Restore signal handlers, close the wakeup socketpair and the backend."""
        if self._running:
            raise RuntimeError("cannot close a running loop")
        if self._closed:
            return
        self._closed = True
        for signum in list(self._signal_handlers):
            self.remove_signal_handler(signum)
        self._readers.pop(self._wakeup_recv.fileno(), None)
        _by_fd(self._readers_by_fd, self._wakeup_recv.fileno(), None, self._fd_table_limit)
        self._set_interest(self._wakeup_recv.fileno(), 0)
        self._wakeup_recv.close()
        self._wakeup_send.close()
        self._readers.clear()
        self._writers.clear()
        self._readers_by_fd.clear()
        self._writers_by_fd.clear()
        self._ready.clear()
        self._timers.clear()
        self._cancelled_timers = 0
        self._pending_signals.clear()
        self.backend.close()

    def __enter__(self) -> EventLoop:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# The pass's steps below are functions of the loop rather than its methods: compiled, a method
# that an interpreted subclass (the asyncio face) may override is called through a Python-level
# lookup and call, ~450 instructions each (callgrind), where a function is one C call.


def _pass_in_asyncio_order(
    loop: EventLoop,
    events: list[tuple[int, int]],
    timed: bool,
    readers: dict[int, Callable[[], Any]],
    writers: dict[int, Callable[[], Any]],
    readers_by_fd: list[Callable[[], Any] | None],
    writers_by_fd: list[Callable[[], Any] | None],
    read_bits: int,
    write_bits: int,
) -> None:
    """A pass after the poll in asyncio's order (``_run_once``): the callbacks queued before it, the
    I/O handlers, then the timers due; what those schedule runs at the next pass.  (A task's first
    step runs before the I/O already waiting for it: code counts on that.)

    The queued callbacks run before the poll rather than after it (``_run`` and ``_run_timed`` run
    them at the top of each pass), so the order of every callback is asyncio's and only the poll
    moves: a pass whose callbacks scheduled nothing then waits in one poll, where asyncio's order
    polls once more without waiting before it runs them.  That is a system call and a pass per
    request on a streams server (the reader's data wakes its task), as libuv runs its idle
    callbacks before it polls.  A timer those callbacks set is not run in this pass even when due
    (``_timers_settled``): on asyncio's loop they run after the timers are collected, and a task
    they queued runs before a timer they set (CPython's test_wait_for_waits_for_task_cancellation)."""
    due = 0
    if loop._timers and loop._timers[0][0] <= loop.now:
        due = _collect_due_timers(loop, True, loop._timers_settled)
    if loop._own_clock_timers is not None:
        due += loop._own_clock_timers()
    if timed:
        loop._dispatch_timed(events)
    else:
        # The backend's bits and the fd maps from the caller's locals: the backend is an
        # interpreted object, and two attribute lookups a pass cost about 300 instructions.
        _dispatch(events, readers, writers, readers_by_fd, writers_by_fd, read_bits, write_bits)
    if due:
        _run_ready(loop, due)


def _by_fd(table: list[Callable[[], Any] | None], fd: int, callback: Callable[[], Any] | None, limit: int) -> None:
    """Keep a dispatch table (``EventLoop._readers_by_fd``) as its dict: ``callback`` at ``fd``,
    or None.  It grows only to hold a handler, and not to ``limit``: an fd beyond its end is
    looked up in the dict."""
    if fd < 0:
        return
    if fd >= len(table):
        if callback is None or fd >= limit:
            return
        table.extend([None] * (fd + 1 - len(table)))
    table[fd] = callback


def _dispatch(
    events: list[tuple[int, int]],
    readers: dict[int, Callable[[], Any]],
    writers: dict[int, Callable[[], Any]],
    readers_by_fd: list[Callable[[], Any] | None],
    writers_by_fd: list[Callable[[], Any] | None],
    read_bits: int,
    write_bits: int,
) -> None:
    """A pass's I/O handlers: one list index and one call per event.  (A handler may add or
    remove handlers, so each lookup reads the table's length again.)"""
    for fd, mask in events:
        try:
            if mask & read_bits:
                callback = readers_by_fd[fd] if fd < len(readers_by_fd) else readers.get(fd)
                if callback is not None:
                    callback()
            if mask & write_bits:
                callback = writers_by_fd[fd] if fd < len(writers_by_fd) else writers.get(fd)
                if callback is not None:
                    callback()
        except Exception:
            log.exception("unhandled error in the handler of fd %d", fd)
    # An error's traceback holds this frame (pure Python), which must not hold the last handler and
    # so what the handler holds: asyncio's loop lets go of its handle so (``handle = None``).
    callback = None


def _collect_due_timers(loop: EventLoop, first: bool = False, settled: int = -1) -> int:
    """The timers due at the pass's ``now``, to the ready queue (at its head when ``first``, in
    deadline order, to run before what is queued); how many.  With ``settled``, only those set up to
    that sequence number: the later ones go back to the heap."""
    timers = loop._timers
    now = loop.now
    due: list[Handle] = []
    later: list[tuple[float, int, Handle]] = []
    while timers and timers[0][0] <= now:
        entry = heapq.heappop(timers)
        handle = entry[2]
        if handle.cancelled:
            loop._cancelled_timers -= 1
        elif 0 <= settled < entry[1]:
            later.append(entry)
        else:
            handle._loop = None  # out of the heap: a late cancel() has nothing to count
            due.append(handle)
    for entry in later:
        heapq.heappush(timers, entry)
    if first:
        due.reverse()
        loop._ready.extendleft(due)
    else:
        loop._ready.extend(due)
    return len(due)


def _run_ready(loop: EventLoop, count: int = -1) -> float:
    """Run the first ``count`` queued callbacks (all that are queued now, by default); the clock's
    reading when the last one ended, or -1.0 when they are not timed."""
    ready = loop._ready
    popleft = ready.popleft  # compiled, a deque's method is looked up at each call otherwise
    slow = loop.slow_callback
    timed = slow > 0
    started = first = _monotonic() if timed else 0.0
    callback: Any = None  # what ran, named if it was slow
    # Only what is queued now: callbacks queued by these callbacks wait a turn,
    # so I/O cannot starve.
    for _ in range(len(ready) if count < 0 else count):
        handle = popleft()
        if isinstance(handle, Handle):
            callback = handle.callback
            if callback is None:  # cancelled
                continue
            try:
                callback(*handle.args)
            except Exception:
                log.exception("unhandled error in callback %r", handle)
        elif isinstance(handle, QueuedCallback):
            if handle._cancelled:
                continue
            callback = handle
            handle._run()
        else:
            # An asyncio.Handle (the asyncio face's in debug mode, call_soon_threadsafe's), run as its
            # _run() runs it, without that method's frame; an error goes to the handle's report, which
            # says it as _run() does, to the loop's exception handler.  (A Handle of the core around it
            # cost two more objects and two Python frames per callback.)
            if handle._cancelled:
                continue
            callback = handle
            try:
                handle._context.run(handle._callback, *handle._args)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                handle._report_error(exc)
        if timed:
            ended = _monotonic()
            if ended - started > slow:
                loop._report_slow(callback, ended - started)
            started = ended
    handle = callback = None  # not held by a traceback that holds this frame (_dispatch says why)
    if not timed:
        return -1.0
    # Twice in a pass in asyncio's order: the pass's callbacks took both times.
    if loop._ready_pass == loop.iterations:
        loop._ready_seconds += started - first
    else:
        loop._ready_pass = loop.iterations
        loop._ready_seconds = started - first
    return started
