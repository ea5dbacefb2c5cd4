"""The asyncio face's ``call_soon``, ``create_future`` and ``get_debug`` on the per-request path, compiled where the
install can (``compiled.MODULES``).

Every wakeup of a task is a ``call_soon``: the C ``Future`` calls ``loop.call_soon(callback, future,
context=...)`` for each of its done callbacks, and a streams request wakes its task once.  As the
loop's interpreted method, with ``asyncio.Handle.__init__`` and its ``loop.get_debug()`` behind it,
that is three Python frames (about 5,300 instructions a request on the streams hello, callgrind,
where uvloop's C call_soon costs about 1,500).  A compiled object's bound method set on the loop
instance (``AsyncioLoop._use_compiled_calls``) is what the C Future and asyncio code then find: the
handle is made as ``asyncio.Handle.__init__`` makes it, with no frame.

Only the plain case is here.  In debug mode the loop's own methods run (the thread check, the
callback check, the traceback of where a handle was made): the loop takes these off when debug is
set.
"""

from __future__ import annotations

from collections import deque
from contextvars import copy_context
from typing import Any, Final

from ..loop import EventLoop

_new: Final = object.__new__


class SoonCalls:
    """One loop's compiled ``call_soon``, ``create_future`` and ``get_debug``."""

    def __init__(self, loop: EventLoop, ready: deque[Any], handle_type: type, future_type: type) -> None:
        self.loop = loop
        self.ready = ready
        self.handle_type = handle_type
        self.future_type = future_type
        #: the loop's debug mode (AsyncioLoop.set_debug keeps it): every Future and Task asks for it
        self.debug = False

    def call_soon(self, callback: Any, *args: Any, context: Any = None) -> Any:
        """``loop.call_soon`` when not in debug mode: an ``asyncio.Handle`` with the attributes its
        ``__init__`` sets (the same on Python 3.10 to 3.13), queued as the core runs it."""
        if self.loop._closed:
            raise RuntimeError("Event loop is closed")
        handle: Any = _new(self.handle_type)
        handle._context = copy_context() if context is None else context
        handle._loop = self.loop
        handle._callback = callback
        handle._args = args
        handle._cancelled = False
        handle._repr = None
        handle._source_traceback = None
        self.ready.append(handle)
        return handle

    def create_future(self) -> Any:
        return self.future_type(loop=self.loop)

    def get_debug(self) -> bool:
        return self.debug
