"""AsyncioLoop: pollserve's event loop as an ``asyncio.AbstractEventLoop``.

One loop, two faces.  The core, ``pollserve.loop.EventLoop`` (compiled where the install can), keeps
the ready queue, the timer heap, the fds and their backend, the signals and the health figures; this
class, interpreted, subclasses it and asyncio's abstract loop, the shape of uvloop's
``Loop(__BaseLoop, asyncio.AbstractEventLoop)``, and gives asyncio code what the standard loop gives:
asyncio's own handles (``handles.py``), callbacks run in the context captured when they were
scheduled, errors to the exception handler, debug mode, tasks, executors, async generators and
signal handlers.  The socket calls, the transports and the servers are the modules beside it.

What differs from the standard loop is said where it is done and listed in ``docs/asyncio.md``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from ..backends import Backend, CapacityError
from ..loop import DEFAULT_SLOW_CALLBACK, EventLoop
from ..loop import Handle as CoreHandle
from .clock import OwnClockTimers
from .counts import ConnectionCounts
from .datagram import DatagramEndpoints
from .figures import LoopFigures
from .handles import Handle, TimerHandle
from .limits import ServerLimits
from .pipes import PipeCalls
from .sockets import SocketCalls
from .soon import SoonCalls
from .streams import StreamCalls
from .subprocess import SubprocessCalls
from .tls import TLSCalls
from .transport import capacity_oserror
from .unsupported import refuse_on_windows

logger = logging.getLogger("asyncio")  # where asyncio's own loop logs, so handlers already set up see ours

#: how deep a coroutine's origin is tracked in debug mode (asyncio's constant)
DEBUG_STACK_DEPTH = 10


def _debug_from_environment() -> bool:
    """asyncio's rule: ``-X dev``, or ``PYTHONASYNCIODEBUG`` unless ``-E``."""
    return sys.flags.dev_mode or (not sys.flags.ignore_environment and bool(os.environ.get("PYTHONASYNCIODEBUG")))


def fileobj_to_fd(fileobj: Any) -> int:
    """An fd, or an object with ``fileno()``: the fd (ValueError when negative), as selectors takes it."""
    if isinstance(fileobj, int):
        fd = fileobj
    else:
        try:
            fd = int(fileobj.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"Invalid file object: {fileobj!r}") from None
    if fd < 0:
        raise ValueError(f"Invalid file descriptor: {fd}")
    return fd


def _is_coroutine_callable(callback: Any) -> bool:
    return asyncio.iscoroutine(callback) or asyncio.iscoroutinefunction(callback)


def _stop_when_done(future: asyncio.Future[Any]) -> None:
    """run_until_complete's done callback: stop the future's loop (not for a cancel that the
    future's own loop will see raised, asyncio's rule)."""
    if not future.cancelled():
        exc = future.exception()
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            return  # the loop sees it raised and stops on its way out
    asyncio.futures._get_loop(future).stop()


class AsyncioLoop(  # type: ignore[misc]
    EventLoop,
    SocketCalls,
    ServerLimits,
    StreamCalls,
    TLSCalls,
    DatagramEndpoints,
    PipeCalls,
    SubprocessCalls,
    asyncio.AbstractEventLoop,
):
    """An asyncio event loop on one pollserve backend: any asyncio program runs on it, with the
    backend's name, fd figures, utilization, lag and slowest callback to show for it."""

    def __init__(self, backend: Backend | str | None = None) -> None:
        super().__init__(backend)
        # asyncio's stop(): the batch under way finishes; what it scheduled runs at the next run.
        self.run_ready_after_stop = False
        # asyncio's order in a pass: queued callbacks, I/O handlers, due timers.
        self.asyncio_order = True
        self._thread_id: int | None = None
        self._debug = False
        self._exception_handler: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None
        self._task_factory: Callable[..., Any] | None = None
        self._default_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_shutdown_called = False
        self._asyncgens: weakref.WeakSet[Any] = weakref.WeakSet()
        self._asyncgens_shutdown_called = False
        self._old_agen_hooks: Any = None
        self._coroutine_origin_tracking_saved: int | None = None
        #: fd -> the transport that owns it: add_reader() and the sock_*() calls refuse those fds
        self._transports: weakref.WeakValueDictionary[int, asyncio.BaseTransport] = weakref.WeakValueDictionary()
        #: fd -> what add_reader()/add_writer() was given for it: a socket closed before its reader is
        #: removed has no fd any more, and is found by itself, as asyncio's selector finds it
        self._fd_objects: dict[int, Any] = {}
        #: every transport's connections and bytes, for stats()
        self.counts = ConnectionCounts()
        self._slow_callback_duration = DEFAULT_SLOW_CALLBACK
        self.slow_callback = DEFAULT_SLOW_CALLBACK
        #: the lag probe, the stats collector, the stats endpoint (figures.py)
        self._figures = LoopFigures(self)
        self.on_slow_callback = self._slow_callback_seen
        self.on_slow_pass = self._slow_pass_seen
        #: call_soon and create_future compiled (soon.py), set on this instance when not in debug mode
        self._soon_calls = SoonCalls(self, self._ready, asyncio.Future, asyncio.Task)
        self._own_clock = OwnClockTimers(self)
        self.set_debug(_debug_from_environment())

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} backend={self.backend.name} running={self.is_running()} "
            f"closed={self.is_closed()} debug={self.get_debug()}>"
        )

    # -- running and stopping ------------------------------------------------------------------------

    def _check_closed(self) -> None:
        if self._closed:
            raise RuntimeError("Event loop is closed")

    def _check_running(self) -> None:
        if self.is_running():
            raise RuntimeError("This event loop is already running")
        if asyncio.events._get_running_loop() is not None:
            raise RuntimeError("Cannot run the event loop while another loop is running")

    def run_forever(self) -> None:
        self._check_closed()
        self._check_running()
        self._set_coroutine_origin_tracking(self._debug)
        self._old_agen_hooks = sys.get_asyncgen_hooks()
        self._thread_id = threading.get_ident()
        sys.set_asyncgen_hooks(firstiter=self._asyncgen_firstiter_hook, finalizer=self._asyncgen_finalizer_hook)
        asyncio.events._set_running_loop(self)
        try:
            self._figures.running()
            super().run_forever()
        finally:
            self._figures.stopped()
            self._thread_id = None
            asyncio.events._set_running_loop(None)
            self._set_coroutine_origin_tracking(False)
            sys.set_asyncgen_hooks(*self._old_agen_hooks)

    def run_until_complete(self, future: Any) -> Any:
        self._check_closed()
        self._check_running()
        new_task = not asyncio.isfuture(future)
        future = asyncio.ensure_future(future, loop=self)
        if new_task:
            # A task of our own: an exception it raises is the caller's, not a "never retrieved".
            future._log_destroy_pending = False
        future.add_done_callback(_stop_when_done)
        try:
            self.run_forever()
        except BaseException:
            if new_task and future.done() and not future.cancelled():
                future.exception()  # retrieved: the caller gets it raised
            raise
        finally:
            future.remove_done_callback(_stop_when_done)
        if not future.done():
            raise RuntimeError("Event loop stopped before Future completed.")
        return future.result()

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """As the standard loop: refused while running; pending callbacks are dropped; the default
        executor is shut down without waiting."""
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self._closed:
            return
        if self._debug:
            logger.debug("Close %r", self)
        self._figures.close()
        super().close()
        self._fd_objects.clear()
        self._forget_children()  # their pidfds; the children run on
        self._executor_shutdown_called = True
        executor, self._default_executor = self._default_executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if not getattr(self, "_closed", True):
            _warn(f"unclosed event loop {self!r}", ResourceWarning, source=self)
            if not self.is_running():
                self.close()

    # -- scheduling ----------------------------------------------------------------------------------

    def _check_thread(self) -> None:
        """Debug mode: the non-thread-safe calls from another thread than the running loop's."""
        if self._thread_id is None:
            return
        if threading.get_ident() != self._thread_id:
            raise RuntimeError("Non-thread-safe operation invoked on an event loop other than the current one")

    def _check_callback(self, callback: Any, method: str) -> None:
        if _is_coroutine_callable(callback):
            raise TypeError(f"coroutines cannot be used with {method}()")
        if not callable(callback):
            raise TypeError(f"a callable object was expected by {method}(), got {callback!r}")

    def call_soon(self, callback: Callable[..., Any], *args: Any, context: Any = None) -> Handle:
        # The C Task and Future call this for every step and wakeup: checks inlined, the core's
        # queue appended to directly.
        if self._closed:
            raise RuntimeError("Event loop is closed")
        handle = Handle(callback, args, self, context)
        if self._debug:
            self._check_thread()
            self._check_callback(callback, "call_soon")
            if handle._source_traceback:
                del handle._source_traceback[-1]
        self._ready.append(handle)  # the core runs an asyncio.Handle as it is (loop.py's _run_ready)
        return handle

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any, context: Any = None) -> Handle:
        self._check_closed()
        if self._debug:
            self._check_callback(callback, "call_soon_threadsafe")
        handle = Handle(callback, args, self, context)
        if handle._source_traceback:
            del handle._source_traceback[-1]
        self._ready.append(handle)  # a deque's append: safe from any thread
        self._wake()
        return handle

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any, context: Any = None) -> TimerHandle:
        if delay is None:
            raise TypeError("delay must not be None")
        timer = self.call_at(self.time() + delay, callback, *args, context=context)
        if timer._source_traceback:
            del timer._source_traceback[-1]
        return timer

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any, context: Any = None) -> TimerHandle:
        if when is None:
            raise TypeError("when cannot be None")
        self._check_closed()
        if self._debug:
            self._check_thread()
            self._check_callback(callback, "call_at")
        timer = TimerHandle(when, callback, args, self, context)
        if timer._source_traceback:
            del timer._source_traceback[-1]
        timer._core = self._arm(when, timer._run_from_core)
        timer._scheduled = True
        if self._clock_followed():
            self._own_clock.add(timer)
        return timer

    def _clock_followed(self) -> bool:
        """Whether time() is not the core's clock: patched on the loop (as tests do) or overridden."""
        return "time" in self.__dict__ or type(self).time is not AsyncioLoop.time

    def _arm(self, when: float, callback: Callable[[], Any]) -> CoreHandle:
        """An entry in the core's heap, which runs on time.monotonic(), for loop time ``when``: the
        same instant unless time() is another clock, whose distance to ``when`` is then kept."""
        if self._clock_followed():
            when = time.monotonic() + (when - self.time())
        return EventLoop.call_at(self, when, callback)

    def _timer_handle_cancelled(self, handle: TimerHandle) -> None:
        """asyncio.TimerHandle.cancel() calls it: the core's entry is cancelled too."""
        handle._forget_core()

    def time(self) -> float:
        return super().time()

    # -- futures and tasks ---------------------------------------------------------------------------

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(self, coro: Any, *, name: str | None = None, context: Any = None) -> asyncio.Task[Any]:
        self._check_closed()
        if self._task_factory is None:
            if sys.version_info >= (3, 11):
                task = asyncio.Task(coro, loop=self, name=name, context=context)
            elif context is not None:
                raise TypeError("create_task() got an unexpected keyword argument 'context'")
            else:
                task = asyncio.Task(coro, loop=self, name=name)
            if task._source_traceback:
                del task._source_traceback[-1]
            return task
        # Without a context, the factory signature every Python takes.
        factory = self._task_factory
        made: Any = factory(self, coro) if context is None else factory(self, coro, context=context)
        if name is not None:
            made.set_name(name)
        return made

    def set_task_factory(self, factory: Callable[..., Any] | None) -> None:
        if factory is not None and not callable(factory):
            raise TypeError("task factory must be a callable or None")
        self._task_factory = factory

    def get_task_factory(self) -> Callable[..., Any] | None:
        return self._task_factory

    # -- errors ----------------------------------------------------------------------------------------

    def get_exception_handler(self) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None:
        return self._exception_handler

    def set_exception_handler(
        self, handler: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None
    ) -> None:
        if handler is not None and not callable(handler):
            raise TypeError(f"A callable object or None is expected, got {handler!r}")
        self._exception_handler = handler

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        """Log the message and the context, as the standard loop words it, on the ``asyncio`` logger."""
        message = context.get("message") or "Unhandled exception in event loop"
        exception = context.get("exception")
        exc_info: Any = (type(exception), exception, exception.__traceback__) if exception is not None else False
        lines = [message]
        for key in sorted(context):
            if key in {"message", "exception"}:
                continue
            value = context[key]
            if key == "source_traceback":
                value = "Object created at (most recent call last):\n" + "".join(traceback.format_list(value)).rstrip()
            elif key == "handle_traceback":
                value = "Handle created at (most recent call last):\n" + "".join(traceback.format_list(value)).rstrip()
            else:
                value = repr(value)
            lines.append(f"{key}: {value}")
        logger.error("\n".join(lines), exc_info=exc_info)

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        handler = self._exception_handler
        if handler is None:
            try:
                self.default_exception_handler(context)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException:
                logger.error("Exception in default exception handler", exc_info=True)
            return
        try:
            handler(self, context)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            try:
                self.default_exception_handler(
                    {"message": "Unhandled error in exception handler", "exception": exc, "context": context}
                )
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException:
                logger.error(
                    "Exception in default exception handler while handling an unexpected error "
                    "in custom exception handler",
                    exc_info=True,
                )

    # -- debug mode and slow callbacks ---------------------------------------------------------------

    def get_debug(self) -> bool:
        return self._debug

    def set_debug(self, enabled: bool) -> None:
        self._debug = bool(enabled)
        self._use_compiled_calls()
        if self.is_running():
            self.call_soon_threadsafe(self._set_coroutine_origin_tracking, self._debug)

    def _use_compiled_calls(self) -> None:
        """``call_soon``, ``call_later``, ``call_at``, ``create_task``, ``create_future`` and
        ``get_debug`` on this instance are SoonCalls' (soon.py) where a subclass does not override
        them, and the first four only when not in debug mode, which needs this class's checks (the
        timers also not when a subclass has a clock of its own).  One set on the instance by someone
        else (a test's mock) is left alone."""
        self._soon_calls.debug = self._debug
        own_clock = type(self).time is not AsyncioLoop.time
        for name in ("call_soon", "call_later", "call_at", "create_task", "create_future", "get_debug"):
            compiled = getattr(self._soon_calls, name)
            current = self.__dict__.get(name)
            if current is not None and current != compiled:
                continue
            overridden = getattr(type(self), name) is not getattr(AsyncioLoop, name)
            checked = name in ("call_soon", "call_later", "call_at", "create_task")
            timer = name in ("call_later", "call_at")
            if overridden or (self._debug and checked) or (own_clock and timer):
                self.__dict__.pop(name, None)
            else:
                self.__dict__[name] = compiled

    def _set_coroutine_origin_tracking(self, enabled: bool) -> None:
        if enabled:
            if self._coroutine_origin_tracking_saved is None:
                self._coroutine_origin_tracking_saved = sys.get_coroutine_origin_tracking_depth()
                sys.set_coroutine_origin_tracking_depth(DEBUG_STACK_DEPTH)
        elif self._coroutine_origin_tracking_saved is not None:
            sys.set_coroutine_origin_tracking_depth(self._coroutine_origin_tracking_saved)
            self._coroutine_origin_tracking_saved = None

    @property
    def slow_callback_duration(self) -> float:
        """asyncio's name for the core's ``slow_callback``: slower callbacks are logged in debug
        mode, and the slowest is kept for stats() whatever the mode."""
        return self._slow_callback_duration

    @slow_callback_duration.setter
    def slow_callback_duration(self, seconds: float) -> None:
        self._slow_callback_duration = self.slow_callback = float(seconds)
        self._figures.health.slow_callback = float(seconds)

    def _slow_callback_seen(self, name: str, seconds: float) -> None:
        self._figures.health.slow(name, seconds)
        if self._debug:
            logger.warning("Executing %s took %.3f seconds", name, seconds)

    def _slow_pass_seen(self, what: str, seconds: float) -> None:
        self._figures.health.slow_pass(what, seconds)
        if self._debug:
            logger.warning("Executing %s took %.3f seconds", what, seconds)

    # -- pollserve's figures ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The snapshot the stats endpoint serves at ``/stats``: the backend, fds against the limit,
        the connections and bytes of every transport on this loop, utilization, lag, the slowest
        callback of the last ten seconds (a task by its name and coroutine)."""
        return self._figures.snapshot()

    def start_stats_server(self, host: str = "127.0.0.1", port: int = 0) -> Any:
        """Serve ``/stats``, ``/metrics``, ``/healthz`` and the live dashboard on this loop, as
        ``pollserve --stats-port`` does; the address it listens on.  It closes with the loop."""
        self._check_closed()
        return self._figures.start_endpoint(host, port)

    # -- executors and names ---------------------------------------------------------------------------

    def run_in_executor(self, executor: Any, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        self._check_closed()
        if self._debug:
            self._check_callback(func, "run_in_executor")
        if executor is None:
            executor = self._default_executor
            if self._executor_shutdown_called:
                raise RuntimeError("Executor shutdown has been called")
            if executor is None:
                executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="pollserve")
                self._default_executor = executor
        return asyncio.wrap_future(executor.submit(func, *args), loop=self)

    def set_default_executor(self, executor: Any) -> None:
        if not isinstance(executor, concurrent.futures.ThreadPoolExecutor):
            if sys.version_info >= (3, 11):
                raise TypeError("executor must be ThreadPoolExecutor")
            warnings.warn(
                "Using the default executor that is not an instance of ThreadPoolExecutor is deprecated "
                "and will be prohibited in Python 3.9",
                DeprecationWarning,
                stacklevel=2,
            )
        self._default_executor = executor

    async def shutdown_default_executor(self, timeout: float | None = None) -> None:
        """Wait, in a thread of its own, for the default executor's threads to end."""
        self._executor_shutdown_called = True
        executor = self._default_executor
        if executor is None:
            return
        done = self.create_future()

        def shut_down() -> None:
            try:
                executor.shutdown(wait=True)
                if not self.is_closed():
                    self.call_soon_threadsafe(asyncio.futures._set_result_unless_cancelled, done, None)
            except BaseException as exc:
                if not self.is_closed():
                    self.call_soon_threadsafe(done.set_exception, exc)

        thread = threading.Thread(target=shut_down, name="pollserve default executor shutdown")
        thread.start()
        try:
            if timeout is None:
                await done
            else:
                await asyncio.wait_for(asyncio.shield(done), timeout)
        except asyncio.TimeoutError:
            warnings.warn(
                f"The executor did not finishing joining its threads within {timeout} seconds.",
                RuntimeWarning,
                stacklevel=2,
            )
            executor.shutdown(wait=False)
        else:
            thread.join()

    async def getaddrinfo(
        self, host: Any, port: Any, *, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> list[Any]:
        return await self.run_in_executor(None, socket.getaddrinfo, host, port, family, type, proto, flags)

    async def getnameinfo(self, sockaddr: Any, flags: int = 0) -> tuple[str, str]:
        return await self.run_in_executor(None, socket.getnameinfo, sockaddr, flags)

    # -- async generators ------------------------------------------------------------------------------

    def _asyncgen_firstiter_hook(self, agen: Any) -> None:
        if self._asyncgens_shutdown_called:
            warnings.warn(
                f"asynchronous generator {agen!r} was scheduled after loop.shutdown_asyncgens() call",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )
        self._asyncgens.add(agen)

    def _asyncgen_finalizer_hook(self, agen: Any) -> None:
        self._asyncgens.discard(agen)
        if not self.is_closed():
            self.call_soon_threadsafe(self.create_task, agen.aclose())

    async def shutdown_asyncgens(self) -> None:
        """Close every async generator still open, reporting their errors to the handler."""
        self._asyncgens_shutdown_called = True
        if not self._asyncgens:
            return
        closing = list(self._asyncgens)
        self._asyncgens.clear()
        results = await asyncio.gather(*[agen.aclose() for agen in closing], return_exceptions=True)
        for result, agen in zip(results, closing, strict=True):
            if isinstance(result, Exception):
                self.call_exception_handler(
                    {
                        "message": f"an error occurred during closing of asynchronous generator {agen!r}",
                        "exception": result,
                        "asyncgen": agen,
                    }
                )

    # -- signals ------------------------------------------------------------------------------------------

    @staticmethod
    def _check_signal(sig: Any) -> None:
        if not isinstance(sig, int):
            raise TypeError(f"sig must be an int, not {sig!r}")
        if sig not in signal.valid_signals():
            raise ValueError(f"invalid signal number {sig}")

    def add_signal_handler(self, sig: int, callback: Callable[..., Any], *args: Any) -> None:
        """As the standard loop: main thread only (RuntimeError), a coroutine is refused (TypeError),
        an uncatchable signal is a RuntimeError.  The core records the signal and runs the handle in
        the loop, in the context of this call."""
        refuse_on_windows("signal handlers")
        if _is_coroutine_callable(callback):
            raise TypeError("coroutines cannot be used with add_signal_handler()")
        self._check_signal(sig)
        self._check_closed()
        handle = Handle(callback, args, self, None)
        try:
            EventLoop.add_signal_handler(self, sig, handle._run_from_core)
        except ValueError as exc:  # set_wakeup_fd() or signal() outside the main thread
            raise RuntimeError(str(exc)) from None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught") from None
            raise
        # A signal handler's callback is the core's own handle: cancel the one it replaces.
        previous = self._signal_handlers.get(sig)
        if previous is not None:
            owner = getattr(previous.callback, "__self__", None)
            if isinstance(owner, Handle) and owner is not handle:
                owner.cancel()

    def remove_signal_handler(self, sig: int) -> bool:
        refuse_on_windows("signal handlers")
        self._check_signal(sig)
        handle = self._signal_handlers.get(sig)
        if handle is not None:
            owner = getattr(handle.callback, "__self__", None)
            if isinstance(owner, Handle):
                owner.cancel()
        try:
            return EventLoop.remove_signal_handler(self, sig)
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None

    # -- readers and writers --------------------------------------------------------------------------

    def _ensure_fd_no_transport(self, fd: Any) -> None:
        fileno = fileobj_to_fd(fd)
        transport = self._transports.get(fileno)
        if transport is not None and not transport.is_closing():
            raise RuntimeError(f"File descriptor {fd!r} is used by transport {transport!r}")

    @staticmethod
    def _owner(callback: Any) -> Handle | None:
        owner = getattr(callback, "__self__", None)
        return owner if isinstance(owner, Handle) else None

    def add_reader(self, fd: Any, callback: Callable[..., Any], *args: Any) -> None:
        self._add(fd, Handle(callback, args, self, None), self._readers, EventLoop.add_reader)

    def remove_reader(self, fd: Any) -> bool:
        return self._remove(fd, self._readers, EventLoop.remove_reader)

    def add_writer(self, fd: Any, callback: Callable[..., Any], *args: Any) -> None:
        self._add(fd, Handle(callback, args, self, None), self._writers, EventLoop.add_writer)

    def remove_writer(self, fd: Any) -> bool:
        return self._remove(fd, self._writers, EventLoop.remove_writer)

    def _add(
        self,
        fd: Any,
        handle: Handle,
        table: dict[int, Callable[[], Any]],
        core_add: Callable[[EventLoop, int, Callable[[], Any]], None],
    ) -> None:
        """The standard loop's add_reader/add_writer: the handle replaces (and cancels) the fd's last."""
        self._check_closed()
        self._ensure_fd_no_transport(fd)
        fileno = fileobj_to_fd(fd)
        replaced = self._owner(table.get(fileno))
        try:
            core_add(self, fileno, handle._run_from_core)
        except CapacityError as exc:
            raise capacity_oserror(exc) from None
        self._fd_objects[fileno] = fd
        if replaced is not None:
            replaced.cancel()

    def _remove(
        self, fd: Any, table: dict[int, Callable[[], Any]], core_remove: Callable[[EventLoop, int], bool]
    ) -> bool:
        if self._closed:
            return False
        fileno = self._registered_fd(fd)
        self._ensure_fd_no_transport(fileno)
        owner = self._owner(table.get(fileno))
        removed = core_remove(self, fileno)
        if owner is not None:
            owner.cancel()
        if fileno not in self._readers and fileno not in self._writers:
            self._fd_objects.pop(fileno, None)
        return removed

    def _registered_fd(self, fd: Any) -> int:
        """The fd of ``fd``; for an object closed since it was registered (its ``fileno()`` is -1), the
        fd it was registered under, as selectors searches its keys for the object itself."""
        try:
            return fileobj_to_fd(fd)
        except ValueError:
            for fileno, registered in self._fd_objects.items():
                if registered is fd:
                    return fileno
            raise
