"""The asyncio face's core: running, scheduling, contexts, errors, executors, signals, fds.

Each test runs on asyncio's own loop (the reference) and on pollserve's on every backend, in debug
mode and not (the ``aio_loop`` fixture); an exception-handler call the test did not expect fails it."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import os
import signal
import socket
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

variable: contextvars.ContextVar[str] = contextvars.ContextVar("variable", default="unset")


def test_run_until_complete_returns_the_result_and_the_running_loop_is_this_one(aio_loop) -> None:
    async def main() -> object:
        await asyncio.sleep(0.001)
        return asyncio.get_running_loop()

    assert aio_loop.run_until_complete(main()) is aio_loop
    assert not aio_loop.is_running()
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()


def test_a_callback_runs_in_the_context_captured_when_it_was_scheduled(aio_loop) -> None:
    seen = []
    variable.set("at call_soon")
    aio_loop.call_soon(lambda: seen.append(variable.get()))
    context = contextvars.copy_context()
    context.run(variable.set, "in a context of its own")
    aio_loop.call_soon(lambda: seen.append(variable.get()), context=context)
    aio_loop.call_later(0.001, lambda: (seen.append(variable.get()), aio_loop.stop()), context=context)
    variable.set("changed afterwards")
    aio_loop.run_forever()
    assert seen == ["at call_soon", "in a context of its own", "in a context of its own"]


def test_a_context_set_in_another_thread_is_seen_by_the_callback_it_scheduled(aio_loop) -> None:
    seen = []

    def from_thread() -> None:
        variable.set("the thread's")
        aio_loop.call_soon_threadsafe(lambda: (seen.append(variable.get()), aio_loop.stop()))

    aio_loop.call_later(10, aio_loop.stop)  # a guard: a lost wakeup ends the test instead of hanging
    threading.Thread(target=from_thread).start()
    aio_loop.run_forever()
    assert seen == ["the thread's"]


def test_timers_run_in_order_and_never_before_their_time(aio_loop) -> None:
    ran = []

    def fired(name: str, handle_when: list) -> None:
        ran.append((name, aio_loop.time() >= handle_when[0]))

    whens: dict[str, list] = {name: [] for name in "abc"}
    for name, delay in (("c", 0.03), ("a", 0.01), ("b", 0.02)):
        handle = aio_loop.call_later(delay, fired, name, whens[name])
        whens[name].append(handle.when())
        assert isinstance(handle, asyncio.TimerHandle)
    aio_loop.call_later(0.05, aio_loop.stop)
    aio_loop.run_forever()
    assert ran == [("a", True), ("b", True), ("c", True)]


def test_ten_thousand_cancelled_timers_neither_run_nor_hold_the_loop(aio_loop) -> None:
    ran = []
    handles = [aio_loop.call_later(0.001 * (i % 50), ran.append, i) for i in range(10_000)]
    for handle in handles:
        handle.cancel()
        assert handle.cancelled()
    aio_loop.call_later(0.06, aio_loop.stop)
    aio_loop.run_forever()
    assert ran == []


def test_handles_are_asyncios_and_a_cancelled_one_does_not_run(aio_loop) -> None:
    ran = []
    handle = aio_loop.call_soon(ran.append, 1)
    assert isinstance(handle, asyncio.Handle) and not handle.cancelled()
    handle.cancel()
    assert handle.cancelled()
    aio_loop.call_soon(aio_loop.stop)
    aio_loop.run_forever()
    assert ran == []


def test_stop_lets_the_batch_finish_and_leaves_what_it_scheduled_for_the_next_run(aio_loop) -> None:
    ran = []
    aio_loop.call_soon(lambda: (aio_loop.stop(), aio_loop.call_soon(ran.append, "next run")))
    aio_loop.call_soon(ran.append, "same batch")
    aio_loop.run_forever()
    assert ran == ["same batch"]
    aio_loop.stop()
    aio_loop.run_forever()
    assert ran == ["same batch", "next run"]


def test_a_callback_that_closes_the_loop_is_refused_and_the_loop_goes_on(aio_loop) -> None:
    errors = []

    def close_inside() -> None:
        try:
            aio_loop.close()
        except RuntimeError as exc:
            errors.append(str(exc))
        aio_loop.stop()

    aio_loop.call_soon(close_inside)
    aio_loop.run_forever()
    assert errors and "running" in errors[0]
    assert not aio_loop.is_closed()
    aio_loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        aio_loop.call_soon(print)
    with pytest.raises(RuntimeError, match="closed"):
        aio_loop.run_forever()


def test_call_soon_threadsafe_from_several_threads_while_the_loop_stops(aio_loop) -> None:
    ran = []
    barrier = threading.Barrier(5)

    def hammer(index: int) -> None:
        barrier.wait()
        for n in range(200):
            try:
                aio_loop.call_soon_threadsafe(ran.append, (index, n))
            except RuntimeError:  # closed under us: the documented refusal
                return

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    aio_loop.call_soon(barrier.wait)
    aio_loop.call_later(0.05, aio_loop.stop)
    aio_loop.run_forever()
    for thread in threads:
        thread.join(10)
    aio_loop.stop()
    aio_loop.run_forever()  # what came in after the stop runs now
    assert sorted(ran) == sorted((i, n) for i in range(4) for n in range(200))
    aio_loop.close()
    with pytest.raises(RuntimeError):
        aio_loop.call_soon_threadsafe(print)


def test_an_error_in_a_callback_goes_to_the_exception_handler_and_the_loop_goes_on(aio_loop) -> None:
    def fail() -> None:
        raise ZeroDivisionError("in a callback")

    aio_loop.call_soon(fail)
    aio_loop.call_soon(aio_loop.stop)
    aio_loop.run_forever()
    (context,) = aio_loop.handler.expect(1)
    assert isinstance(context["exception"], ZeroDivisionError)
    assert isinstance(context["handle"], asyncio.Handle)
    assert "Exception in callback" in context["message"]


def test_a_task_is_named_and_its_factory_is_used(aio_loop) -> None:
    made = []

    def factory(loop, coro, **kwargs):
        task = asyncio.Task(coro, loop=loop, **kwargs)
        made.append(task)
        return task

    async def child() -> int:
        return 7

    async def main() -> tuple[str, int]:
        task = aio_loop.create_task(child(), name="the child")
        return task.get_name(), await task

    assert aio_loop.run_until_complete(main()) == ("the child", 7)
    aio_loop.set_task_factory(factory)
    assert aio_loop.get_task_factory() is factory
    assert aio_loop.run_until_complete(main()) == ("the child", 7)
    assert len(made) == 2  # main's task and the child's
    with pytest.raises(TypeError):
        aio_loop.set_task_factory(42)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory is 3.12+")
def test_the_standard_eager_task_factory_works(aio_loop) -> None:
    aio_loop.set_task_factory(asyncio.eager_task_factory)
    steps = []

    async def child() -> None:
        steps.append("child started")

    async def main() -> None:
        aio_loop.create_task(child())
        steps.append("after create_task")

    aio_loop.run_until_complete(main())
    assert steps == ["child started", "after create_task"]


def test_a_pending_task_garbage_collected_is_reported(aio_loop) -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    async def main() -> None:
        aio_loop.create_task(forever())
        await asyncio.sleep(0)

    aio_loop.run_until_complete(main())
    assert len(asyncio.all_tasks(aio_loop)) == 1
    aio_loop.close()
    gc.collect()
    contexts = aio_loop.handler.expect(1)
    assert "Task was destroyed but it is pending" in contexts[0]["message"]


def test_run_in_executor_getaddrinfo_and_the_executor_shutdown(aio_loop) -> None:
    async def main() -> tuple:
        total = await aio_loop.run_in_executor(None, sum, [1, 2, 3])
        infos = await aio_loop.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)
        name = await aio_loop.getnameinfo(("127.0.0.1", 80), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
        await aio_loop.shutdown_default_executor()
        return total, infos[0][4], name

    assert aio_loop.run_until_complete(main()) == (6, ("127.0.0.1", 80), ("127.0.0.1", "80"))
    with pytest.raises(RuntimeError, match="shutdown"):
        aio_loop.run_in_executor(None, sum, [])


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this OS")
def test_a_signal_during_run_in_executor_reaches_its_handler_and_the_work_completes(aio_loop) -> None:
    got = []
    variable.set("at add_signal_handler")
    aio_loop.add_signal_handler(signal.SIGUSR1, lambda: got.append(variable.get()))
    variable.set("changed afterwards")
    try:

        async def main() -> str:
            work = aio_loop.run_in_executor(None, lambda: (time.sleep(0.2), "done")[1])
            await asyncio.sleep(0.02)
            os.kill(os.getpid(), signal.SIGUSR1)
            return await asyncio.wait_for(work, 10)

        assert aio_loop.run_until_complete(main()) == "done"
        assert got == ["at add_signal_handler"]
    finally:
        assert aio_loop.remove_signal_handler(signal.SIGUSR1) is True
    assert aio_loop.remove_signal_handler(signal.SIGUSR1) is False
    with pytest.raises(TypeError):
        aio_loop.add_signal_handler(signal.SIGUSR1, asyncio.sleep)
    with pytest.raises((RuntimeError, ValueError)):
        aio_loop.add_signal_handler(signal.SIGKILL, print)


def test_add_reader_and_add_writer_on_a_socketpair(aio_loop, pair) -> None:
    a, b = pair
    got = []

    def readable(tag: str) -> None:
        got.append((tag, a.recv(10)))
        aio_loop.remove_reader(a)
        aio_loop.stop()

    aio_loop.add_writer(b.fileno(), lambda: (b.send(b"ping"), aio_loop.remove_writer(b.fileno())))
    aio_loop.add_reader(a, readable, "read")
    aio_loop.call_later(10, aio_loop.stop)
    aio_loop.run_forever()
    assert got == [("read", b"ping")]
    assert aio_loop.remove_reader(a.fileno()) is False
    with pytest.raises(ValueError):
        aio_loop.add_reader(-1, print)


def test_async_generators_are_closed_by_shutdown_asyncgens(aio_loop) -> None:
    closed = []

    async def numbers():
        try:
            for n in range(10):
                yield n
        finally:
            closed.append(True)

    async def main() -> int:
        generator = numbers()
        first = await generator.__anext__()
        main.generator = generator  # type: ignore[attr-defined]  # kept alive: only shutdown closes it
        return first

    assert aio_loop.run_until_complete(main()) == 0
    aio_loop.run_until_complete(aio_loop.shutdown_asyncgens())
    assert closed == [True]


def test_the_wrong_thread_is_refused_in_debug_mode(aio_loop) -> None:
    errors = []

    def from_thread() -> None:
        try:
            aio_loop.call_soon(print)
        except RuntimeError as exc:
            errors.append(str(exc))
        aio_loop.call_soon_threadsafe(aio_loop.stop)

    aio_loop.call_soon(lambda: threading.Thread(target=from_thread).start())
    aio_loop.call_later(10, aio_loop.stop)
    aio_loop.run_forever()
    if aio_loop.get_debug():
        assert errors and "thread" in errors[0]
    else:
        assert errors == []
        aio_loop.stop()
        aio_loop.run_forever()  # the print scheduled from the thread runs (harmlessly)
