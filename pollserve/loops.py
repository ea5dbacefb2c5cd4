"""Entry points for asyncio programs: zero-argument loop factories, and ``run()``.

Event loop policies are deprecated (Python 3.14) and go in 3.16; what takes a loop now takes a
factory called with no arguments: ``asyncio.Runner(loop_factory=...)`` (3.11), ``asyncio.run(...,
loop_factory=...)`` (3.12), ``IsolatedAsyncioTestCase.loop_factory`` (3.13), uvicorn's
``--loop pollserve:new_event_loop``, anyio's ``backend_options={"loop_factory": ...}``.  So there is
one factory that chooses the backend as the server does (``POLLSERVE_BACKEND``, else the best this
OS has, plugins included), and one per built-in backend, since a factory cannot take arguments::

    asyncio.run(main(), loop_factory=pollserve.loops.epoll)      # Python 3.12+
    pollserve.run(main(), backend="poll")                         # any Python from 3.10

No policy is installed and the current event loop is not set: code that runs on the loop finds it
with ``asyncio.get_running_loop()``, as ``asyncio.run(..., loop_factory=...)`` has it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from .aio import AsyncioLoop
from .aio.statsenv import start_from_environment

#: the variable the server's --backend defaults to, read by new_event_loop() too
ENV_BACKEND = "POLLSERVE_BACKEND"

T = TypeVar("T")


class LoopFactory:
    """A loop factory: called with no argument, a new ``AsyncioLoop`` on its backend.

    An object rather than a function, so that it stays a factory as a class attribute:
    ``IsolatedAsyncioTestCase.loop_factory = pollserve.loops.epoll`` would otherwise become a method
    and be called with the test case."""

    def __init__(self, name: str, backend: str | None, doc: str) -> None:
        self.__name__ = self.__qualname__ = name
        self.__module__ = __name__
        self.__doc__ = doc
        self.backend = backend

    def __call__(self, backend: str | None = None) -> AsyncioLoop:
        if backend is not None and self.backend is not None:
            raise TypeError(f"{self!r} takes no argument: its backend is {self.backend}")
        loop = AsyncioLoop(backend or self.backend or os.environ.get(ENV_BACKEND) or "auto")
        # POLLSERVE_STATS_PORT: the stats endpoint of a program whose loop another's command makes,
        # always through a factory (statsenv.py); code that makes AsyncioLoop itself asks with
        # start_stats_server(), and the pollserve command has --stats-port.
        start_from_environment(loop)
        return loop

    def __repr__(self) -> str:
        return f"<loop factory {__name__}.{self.__name__}>"


new_event_loop = LoopFactory(
    "new_event_loop",
    None,
    """A new asyncio loop on ``backend``: a name (``epoll``, a plugin's, ``MODULE:CLASS``) or, by
    default, ``$POLLSERVE_BACKEND``, else the best backend this OS has.  An unknown or unavailable
    one raises ``pollserve.BackendUnavailableError``, saying what is available.""",
)
select = LoopFactory("select", "select", "A loop on select(2): every OS; fds below FD_SETSIZE only.")
poll = LoopFactory("poll", "poll", "A loop on poll(2).")
epoll = LoopFactory("epoll", "epoll", "A loop on Linux's epoll(7).")
kqueue = LoopFactory("kqueue", "kqueue", "A loop on the BSDs' and macOS's kqueue(2).")
devpoll = LoopFactory("devpoll", "devpoll", "A loop on Solaris's /dev/poll.")


def run(main: Coroutine[Any, Any, T], *, backend: str | None = None, debug: bool | None = None) -> T:
    """``asyncio.run(main)`` on a new pollserve loop: run the coroutine, then cancel the tasks left,
    close the async generators and the default executor, and close the loop.  It does not set the
    current event loop (as ``asyncio.run`` with a ``loop_factory``); on 3.11 and later it is
    ``asyncio.Runner``, Ctrl-C cancelling ``main`` included; 3.10 has no Runner, and the same steps
    are taken here."""
    if asyncio.events._get_running_loop() is not None:
        # Before the Runner: its close() would meet the running loop too, and hide this error.
        raise RuntimeError("pollserve.run() cannot be called from a running event loop")
    if sys.version_info >= (3, 11):
        with asyncio.Runner(debug=debug, loop_factory=lambda: new_event_loop(backend)) as runner:
            return runner.run(main)
    return _run_without_runner(main, backend, debug)


def _run_without_runner(main: Coroutine[Any, Any, T], backend: str | None, debug: bool | None) -> T:
    if not asyncio.iscoroutine(main):
        raise ValueError(f"a coroutine was expected, got {main!r}")
    loop = new_event_loop(backend)
    try:
        if debug is not None:
            loop.set_debug(debug)
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_all_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def _cancel_all_tasks(loop: AsyncioLoop) -> None:
    """What asyncio.run does with the tasks main left: cancel them, wait, report their errors."""
    pending = asyncio.all_tasks(loop)
    if not pending:
        return
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    for task in pending:
        if task.cancelled():
            continue
        if task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception during asyncio.run() shutdown",
                    "exception": task.exception(),
                    "task": task,
                }
            )
