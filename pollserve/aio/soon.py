"""The asyncio face's ``call_soon``, ``create_future`` and ``get_debug`` on the per-request path, compiled where the
install can (``compiled.MODULES``).

Every wakeup of a task is a ``call_soon``: the C ``Future`` calls ``loop.call_soon(callback, future,
context=...)`` for each of its done callbacks, and a streams request wakes its task once.  As the
loop's interpreted method, with ``asyncio.Handle.__init__`` and its ``loop.get_debug()`` behind it,
that is three Python frames (about 5,300 instructions a request on the streams hello, callgrind,
where uvloop's C call_soon costs about 1,500).  A compiled object's bound method set on the loop
instance (``AsyncioLoop._use_compiled_calls``) is what the C Future and asyncio code then find: the
handle is made as ``asyncio.Handle.__init__`` makes it, with no frame.

Timers likewise: a web server sets a keep-alive timer per request and cancels it
(uvicorn: ``call_later`` then ``cancel()``), which through the loop's methods, asyncio's
``TimerHandle.__init__`` and ``loop.time()`` was eleven Python frames and 24,000 instructions, against
uvloop's 7,000 and asyncio's own loop's 16,000.  ``call_later`` and ``call_at`` here make a compiled
``LaterHandle`` and put its entry in the core's heap, with no frame.

Only the plain case is here.  In debug mode the loop's own methods run (the thread check, the
callback check, the traceback of where a handle was made): the loop takes these off when debug is
set.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from contextvars import copy_context
from typing import Any, Final

from ..loop import EventLoop, QueuedCallback
from ..loop import Handle as CoreHandle
from .handles import describe_handle, report_error

_monotonic: Final = time.monotonic


class SoonHandle(QueuedCallback):
    """What ``call_soon`` returns when not in debug mode: ``asyncio.Handle``'s interface and
    attributes (``cancel()``, ``cancelled()``, ``get_context()``, ``_run()``, its repr) as a compiled
    object, made and freed without the attribute lookups an ``asyncio.Handle`` instance costs from
    compiled code (seven stores through its slots' descriptors, about 3,500 instructions a request
    on uvicorn's hello).  Like uvloop's handles, it is not an ``asyncio.Handle`` instance; in debug
    mode the loop's own ``call_soon`` makes those (handles.Handle)."""

    def __init__(self, callback: Any, args: tuple[Any, ...], loop: Any, context: Any) -> None:
        self._callback: Any = callback
        self._args: Any = args
        self._loop: Any = loop
        self._context: Any = context
        self._cancelled = False
        self._repr: Any = None
        self._source_traceback: Any = None

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            if self._loop.get_debug():
                self._repr = repr(self)
            self._callback = None
            self._args = None

    def cancelled(self) -> bool:
        return self._cancelled

    def get_context(self) -> Any:
        return self._context

    def _run(self) -> None:
        # A call for each common count of arguments: compiled, ``*args`` builds a list and then a
        # tuple, and the bound ``run`` is made first, ~700 instructions a callback (callgrind); a
        # call with its arguments spelled out is one method call.  A task's wakeup has one.
        args = self._args
        try:
            count = len(args)
            if count == 1:
                self._context.run(self._callback, args[0])
            elif count == 0:
                self._context.run(self._callback)
            else:
                self._context.run(self._callback, *args)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._report_error(exc)

    def _report_error(self, exc: BaseException) -> None:
        report_error(self, exc)

    def _repr_info(self) -> list[str]:
        info: list[str] = asyncio.Handle._repr_info(self)  # its attributes are asyncio.Handle's
        info[0] = "Handle"  # as asyncio's prints, not this class's name
        return info

    def __repr__(self) -> str:
        if self._repr is not None:
            return str(self._repr)
        return "<{}>".format(" ".join(self._repr_info()))

    def _describe_handler(self, callback: object) -> str:
        return describe_handle(self)


class LaterHandle(SoonHandle):
    """What ``call_later`` and ``call_at`` return when not in debug mode: ``asyncio.TimerHandle``'s
    interface and attributes (``when()``, ``cancel()``, ``cancelled()``, ``get_context()``, the order
    and equality by deadline, its repr) as a compiled object over an entry of the core's heap.  A
    uvicorn request sets a keep-alive timer and cancels it: as an ``asyncio.TimerHandle`` instance made
    from compiled code (ten stores through slot descriptors, and cancel() a Python frame) that cost
    9,200 instructions (callgrind), as this 5,800, and uvloop's 7,000.  Like ``SoonHandle`` and
    uvloop's timers, it is not an ``asyncio.TimerHandle`` instance; in debug mode the loop's own
    ``call_at`` makes those (handles.TimerHandle)."""

    def __init__(self, when: Any, callback: Any, args: tuple[Any, ...], loop: Any, context: Any) -> None:
        super().__init__(callback, args, loop, context)
        self._when: Any = when
        self._scheduled = True
        #: the entry in the core's heap that runs this timer; None once it ran or was cancelled
        self._core: CoreHandle | None = None

    def when(self) -> Any:
        return self._when

    def cancel(self) -> None:
        """asyncio's ``TimerHandle.cancel()``: the core's entry goes too (what the loop's
        ``_timer_handle_cancelled`` does), then ``Handle.cancel()``."""
        if not self._cancelled:
            self._forget_core()
        super().cancel()

    def _forget_core(self) -> None:
        core, self._core = self._core, None
        self._scheduled = False
        if core is not None:
            core.cancel()

    def _run_from_core(self) -> None:
        self._core = None  # the core let go of its entry; no cycle left between the two
        if self._cancelled:
            return
        loop = self._loop
        if "time" in loop.__dict__ and loop.time() < self._when:
            # loop.time patched since the timer was set (a test's clock) says it is not time yet:
            # never early (handles.TimerHandle does the same).
            self._core = loop._arm(self._when, self._run_from_core)
            return
        self._scheduled = False
        self._run()

    def _repr_info(self) -> list[str]:
        info = super()._repr_info()
        info[0] = "TimerHandle"
        info.insert(2 if self._cancelled else 1, f"when={self._when}")
        return info

    # Ordered and equal by deadline as asyncio.TimerHandle is, among either kind.

    def __hash__(self) -> int:
        return hash(self._when)

    def __eq__(self, other: object) -> Any:
        theirs = _as_timer(other)
        if theirs is None:
            return NotImplemented
        return (
            self._when == theirs._when
            and self._callback == theirs._callback
            and self._args == theirs._args
            and self._cancelled == theirs._cancelled
        )

    def __lt__(self, other: object) -> Any:
        theirs = _as_timer(other)
        return NotImplemented if theirs is None else self._when < theirs._when

    def __le__(self, other: object) -> Any:
        theirs = _as_timer(other)
        return NotImplemented if theirs is None else self._when < theirs._when or self.__eq__(theirs) is True

    def __gt__(self, other: object) -> Any:
        theirs = _as_timer(other)
        return NotImplemented if theirs is None else self._when > theirs._when

    def __ge__(self, other: object) -> Any:
        theirs = _as_timer(other)
        return NotImplemented if theirs is None else self._when > theirs._when or self.__eq__(theirs) is True


def _as_timer(other: object) -> Any:
    """``other`` if it is a timer handle of either kind, else None: asyncio.TimerHandle orders and
    compares itself with timers only."""
    return other if isinstance(other, (LaterHandle, asyncio.TimerHandle)) else None


class SoonCalls:
    """One loop's compiled ``call_soon``, ``create_future`` and ``get_debug``."""

    def __init__(
        self,
        loop: EventLoop,
        ready: deque[Any],
        future_type: type,
        task_type: type,
    ) -> None:
        self.loop = loop
        #: the ready queue's append, bound once: compiled, ``ready.append(...)`` looks the method up
        #: at each call
        self.ready_append = ready.append
        self.future_type = future_type
        self.task_type = task_type
        #: the loop's instance dict: a ``time`` there (a test's patch) sends timers the loop's own way
        self.loop_dict: dict[str, Any] = loop.__dict__
        #: the loop's debug mode (AsyncioLoop.set_debug keeps it): every Future and Task asks for it
        self.debug = False

    def call_soon(self, callback: Any, *args: Any, context: Any = None) -> Any:
        """``loop.call_soon`` when not in debug mode: an ``asyncio.Handle`` with the attributes its
        ``__init__`` sets (the same on Python 3.10 to 3.13), queued as the core runs it."""
        if self.loop._closed:
            raise RuntimeError("Event loop is closed")
        handle = SoonHandle(callback, args, self.loop, copy_context() if context is None else context)
        self.ready_append(handle)
        return handle

    def call_later(self, delay: Any, callback: Any, *args: Any, context: Any = None) -> Any:
        """``loop.call_later`` when not in debug mode and ``loop.time()`` is the core's clock."""
        if "time" in self.loop_dict:
            loop: Any = self.loop
            return type(loop).call_later(loop, delay, callback, *args, context=context)
        if delay is None:
            raise TypeError("delay must not be None")
        return self._timer(_monotonic() + delay, callback, args, context)

    def call_at(self, when: Any, callback: Any, *args: Any, context: Any = None) -> Any:
        """``loop.call_at`` when not in debug mode and ``loop.time()`` is the core's clock."""
        if "time" in self.loop_dict:
            loop: Any = self.loop
            return type(loop).call_at(loop, when, callback, *args, context=context)
        if when is None:
            raise TypeError("when cannot be None")
        return self._timer(when, callback, args, context)

    def _timer(self, when: Any, callback: Any, args: tuple[Any, ...], context: Any) -> Any:
        """A LaterHandle, scheduled: its entry in the core's heap runs it."""
        loop = self.loop
        if loop._closed:
            raise RuntimeError("Event loop is closed")
        timer = LaterHandle(when, callback, args, loop, copy_context() if context is None else context)
        timer._core = EventLoop.call_at(loop, when, timer._run_from_core)
        return timer

    def create_task(self, coro: Any, *, name: Any = None, context: Any = None) -> Any:
        """``loop.create_task`` when not in debug mode (no traceback to trim) and with no task factory:
        the Task made directly, without the loop's method's frame and its ``_check_closed()``'s."""
        loop: Any = self.loop
        if loop._task_factory is not None or loop._closed or context is not None:
            return type(loop).create_task(loop, coro, name=name, context=context)
        return self.task_type(coro, loop=loop, name=name)

    def create_future(self) -> Any:
        return self.future_type(loop=self.loop)

    def get_debug(self) -> bool:
        return self.debug
