"""The handles asyncio code gets from the loop: asyncio's own classes, scheduled on pollserve's core.

The core (``pollserve.loop``) queues and times its own small handles; each of these rides on one,
whose callback is the asyncio handle's ``_run_from_core``.  So asyncio code sees the standard
``asyncio.Handle`` and ``asyncio.TimerHandle`` (``cancelled()``, ``when()``, the context captured
when it was scheduled, errors to the loop's exception handler), and the core keeps its one queue and
one heap, its timing of callbacks and its health figures.

A slow callback is named by what a person recognises (``_describe_handler``, read by the core's
``describe_callback``): a task by its name and its coroutine, a protocol method by its class.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from ..loop import Handle as CoreHandle
from ..loop import describe_callback


def describe_asyncio_callback(callback: Any) -> str:
    """``task Task-3 (main.<locals>.handler)`` for a task's step or wakeup; else the callback's own
    name (``module:Class.method``)."""
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        what = getattr(coro, "__qualname__", None) or type(coro).__name__
        return f"task {owner.get_name()} ({what})"
    return describe_callback(callback)


class Handle(asyncio.Handle):
    """``asyncio.Handle`` that the core runs: skipped once cancelled, as asyncio's loop skips it."""

    __slots__ = ()

    def _run_from_core(self) -> None:
        if not self._cancelled:
            self._run()

    def _report_error(self, exc: BaseException) -> None:
        report_error(self, exc)

    def _describe_handler(self, callback: object) -> str:
        return describe_handle(self)


def report_error(handle: Any, exc: BaseException) -> None:
    """What ``asyncio.Handle._run`` reports when its callback raises: the core runs the asyncio face's
    handles without that method (loop.py's ``_run_ready``) and calls their ``_report_error``."""
    debug = {"debug": handle._loop.get_debug()} if sys.version_info >= (3, 13) else {}
    source = asyncio.format_helpers._format_callback_source(handle._callback, handle._args, **debug)
    context = {"message": f"Exception in callback {source}", "exception": exc, "handle": handle}
    if handle._source_traceback:
        context["source_traceback"] = handle._source_traceback
    handle._loop.call_exception_handler(context)


def describe_handle(handle: Any) -> str:
    """A handle named for the health figures: by its callback, or as it prints once cancelled."""
    return describe_asyncio_callback(handle._callback) if handle._callback is not None else repr(handle)


class TimerHandle(asyncio.TimerHandle):
    """``asyncio.TimerHandle`` over an entry of the core's heap: cancel() takes the entry out of the
    heap's reckoning (its rebuild, the poll timeout), so 10,000 cancelled timers cost nothing."""

    __slots__ = ("_core",)

    def __init__(self, when: float, callback: Any, args: tuple[Any, ...], loop: Any, context: Any = None) -> None:
        super().__init__(when, callback, args, loop, context)
        self._core: CoreHandle | None = None

    def _run_from_core(self) -> None:
        self._core = None  # the core let go of its entry; no cycle left between the two
        if self._cancelled:
            return
        loop = self._loop
        if loop._clock_followed() and loop.time() < self._when:
            # A loop.time() of its own (a test's, a subclass's) says it is not time yet: never early.
            self._core = loop._arm(self._when, self._run_from_core)
            return
        self._scheduled = False
        self._run()

    def cancel(self) -> None:
        """asyncio's ``TimerHandle.cancel()``, which calls the loop's ``_timer_handle_cancelled()``
        and then ``Handle.cancel()``, in one frame: a web server cancels a timer per request."""
        if self._cancelled:
            return
        core, self._core = self._core, None  # _forget_core(), inline
        self._scheduled = False
        if core is not None:
            core.cancel()
        self._cancelled = True
        if self._loop.get_debug():
            self._repr = repr(self)
        self._callback = None
        self._args = None  # type: ignore[assignment]  # as asyncio's Handle.cancel() does

    def _forget_core(self) -> None:
        """Cancelled: the core's entry goes too (cancel(), and the loop's _timer_handle_cancelled)."""
        core, self._core = self._core, None
        self._scheduled = False
        if core is not None:
            core.cancel()

    def _describe_handler(self, callback: object) -> str:
        return describe_handle(self)
