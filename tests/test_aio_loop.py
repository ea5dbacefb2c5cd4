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
from unittest import mock

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


def test_handles_have_asyncios_interface_and_a_cancelled_one_does_not_run(aio_loop) -> None:
    """call_soon's handle is an asyncio.Handle in debug mode, and outside it on pollserve's loop a
    compiled object with its interface, as uvloop's handles are (docs/asyncio.md)."""
    ran = []
    context = contextvars.copy_context()
    handle = aio_loop.call_soon(ran.append, 1, context=context)
    pollserves = not isinstance(aio_loop, asyncio.BaseEventLoop)
    if aio_loop.get_debug() or not pollserves:
        assert isinstance(handle, asyncio.Handle)
    assert not handle.cancelled() and handle._context is context  # get_context() is 3.12's
    assert repr(handle).startswith("<Handle ") and "append" in repr(handle)
    handle.cancel()
    assert handle.cancelled() and repr(handle).startswith("<Handle cancelled")
    aio_loop.call_soon(aio_loop.stop)
    aio_loop.run_forever()
    assert ran == []


@pytest.mark.parametrize("args", [(), (None,), ((1, 2),), ([],), ("a", b"\xff"), (1, 2, 3, 4)])
def test_callbacks_and_timers_get_exactly_the_arguments_they_were_given(aio_loop, args) -> None:
    """None, a tuple or an empty list as the one argument is passed as it is, never unpacked or
    dropped; so are none and several (the compiled handles call each count their own way)."""
    seen = []

    def record(*got):
        seen.append(got)

    aio_loop.call_soon(record, *args)
    aio_loop.call_later(0, record, *args)
    aio_loop.call_at(aio_loop.time(), record, *args)
    aio_loop.call_later(0.01, aio_loop.stop)
    aio_loop.run_forever()
    assert seen == [args] * 3


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

    handle = aio_loop.call_soon(fail)
    aio_loop.call_soon(aio_loop.stop)
    aio_loop.run_forever()
    (context,) = aio_loop.handler.expect(1)
    assert isinstance(context["exception"], ZeroDivisionError)
    assert context["handle"] is handle and "fail()" in repr(handle)
    assert "Exception in callback" in context["message"]


def test_an_error_in_a_timer_goes_to_the_exception_handler_and_the_loop_goes_on(aio_loop) -> None:
    def fail() -> None:
        raise ZeroDivisionError("in a timer")

    handle = aio_loop.call_later(0.001, fail)
    aio_loop.call_later(0.05, aio_loop.stop)
    aio_loop.run_forever()
    (context,) = aio_loop.handler.expect(1)
    assert isinstance(context["exception"], ZeroDivisionError)
    assert context["handle"] is handle and "fail()" in repr(handle) and repr(handle).startswith("<TimerHandle when=")
    assert "Exception in callback" in context["message"]


def test_timer_handles_have_asyncios_interface_beside_asyncios_own(aio_loop) -> None:
    """call_later's handle is an asyncio.TimerHandle in debug mode (and on asyncio's loop), and outside
    it on pollserve's loop a compiled object with its interface, as uvloop's timers are
    (docs/asyncio.md): when(), its context, order, equality and hash by deadline among asyncio's own
    handles, its repr, and cancel() (twice, harmlessly)."""
    context = contextvars.copy_context()
    when = aio_loop.time() + 60.0
    handle = aio_loop.call_at(when, print, "x", context=context)
    if aio_loop.get_debug() or isinstance(aio_loop, asyncio.BaseEventLoop):
        assert isinstance(handle, asyncio.TimerHandle)
    assert handle.when() == when and handle._context is context and not handle.cancelled()
    twin = asyncio.TimerHandle(when, print, ("x",), aio_loop)
    after = asyncio.TimerHandle(when + 1.0, print, (), aio_loop)
    assert handle == twin and twin == handle and hash(handle) == hash(twin) and handle != after
    assert handle < after and after > handle and handle <= twin and twin >= handle and not handle > after
    assert handle <= after and after >= handle and not handle >= after
    assert sorted([after, handle, twin])[-1] is after
    assert handle != "x" and handle != when
    with pytest.raises(TypeError):
        assert handle < when  # as asyncio's: no order against what is not a timer
    assert repr(handle).startswith(f"<TimerHandle when={when} print(") and "<TimerHandle" in repr(twin)
    handle.cancel()
    handle.cancel()
    assert handle.cancelled() and repr(handle).startswith(f"<TimerHandle cancelled when={when}")
    assert handle != twin  # cancelled, as asyncio's compares them
    aio_loop.call_later(0.01, aio_loop.stop)
    aio_loop.run_forever()


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


@pytest.mark.parametrize("direction", ["reader", "writer"])
def test_a_socket_closed_before_its_reader_is_removed_is_still_found(aio_loop, direction: str) -> None:
    """anyio closes a socket, then removes its reader: asyncio's selector finds the registration by
    the object when its fileno() is -1 already, and so must pollserve's loop."""
    add = getattr(aio_loop, f"add_{direction}")
    remove = getattr(aio_loop, f"remove_{direction}")
    a, b = socket.socketpair()
    never, other = socket.socketpair()
    try:
        add(a, print)
        a.close()
        never.close()
        assert remove(a) is True
        # Once removed, or never registered, a closed object has no fd to find: refused, as asyncio's.
        for closed in (a, never):
            with pytest.raises(ValueError):
                remove(closed)
    finally:
        for sock in (a, b, never, other):
            sock.close()


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


@pytest.mark.parametrize("clock", ["ahead", "half speed"])
@pytest.mark.parametrize("timer", ["set after the patch", "set before it"])
def test_timers_follow_a_loop_time_patched_on_the_loop(aio_loop, clock: str, timer: str) -> None:
    """As on the standard loop, timers go through loop.time(): a test that patches it moves them,
    and a timer never runs before loop.time() reaches its when(), even one set before the patch."""
    fired = []

    def set_timer() -> asyncio.TimerHandle:
        return aio_loop.call_later(0.05, lambda: (fired.append(aio_loop.time() >= handle.when()), aio_loop.stop()))

    if timer == "set before it":
        handle = set_timer()
    real, start = aio_loop.time, aio_loop.time()
    if clock == "ahead":
        aio_loop.time = lambda: real() + 1000.0
    else:
        aio_loop.time = lambda: start + (real() - start) / 2
    if timer == "set after the patch":
        handle = set_timer()
    guard = threading.Timer(5, aio_loop.call_soon_threadsafe, args=(aio_loop.stop,))
    guard.start()
    try:
        aio_loop.run_forever()
    finally:
        guard.cancel()
    assert fired == [True]
    del aio_loop.time


def test_a_timer_set_under_a_frozen_clock_runs_when_that_clock_jumps_to_it(aio_loop) -> None:
    """A test that freezes loop.time() and then moves it to a timer's deadline sees the timer run in
    the next pass, as on the standard loop, which compares every timer with time() at each pass
    (aiohttp's test_keepalive_expires_on_time): not after the real clock's distance at arming."""
    seen = []

    async def main() -> None:
        now = aio_loop.time()
        with mock.patch.object(aio_loop, "time") as clock:
            clock.return_value = now
            later = aio_loop.call_later(30.0, seen.append, "at +30")
            aio_loop.call_at(now + 60.0, seen.append, "at +60")
            cancelled = aio_loop.call_later(30.0, seen.append, "cancelled")
            cancelled.cancel()
            await asyncio.sleep(0)
            assert seen == []
            clock.return_value = later.when()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert seen == ["at +30"]  # the +60 one is not due by that clock: never early
            clock.return_value = now + 60.0
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert seen == ["at +30", "at +60"]

    # The guard is a thread: a timer of the loop's would be due when the patched clock jumps.
    guard = threading.Timer(10, aio_loop.call_soon_threadsafe, args=(aio_loop.stop,))
    guard.start()
    try:
        aio_loop.run_until_complete(main())
    finally:
        guard.cancel()


def test_call_at_runs_at_loop_time_and_in_its_context(aio_loop) -> None:
    seen = []
    variable.set("at call_at")
    when = aio_loop.time() + 0.02
    handle = aio_loop.call_at(when, lambda: (seen.append((aio_loop.time() >= when, variable.get())), aio_loop.stop()))
    assert handle.when() == when
    variable.set("after")
    aio_loop.call_later(10, aio_loop.stop)
    aio_loop.run_forever()
    assert seen == [(True, "at call_at")]
    with pytest.raises((TypeError, AssertionError)):  # asyncio's own loop asserts, on 3.10
        aio_loop.call_at(None, print)


def test_the_exception_handler_methods(aio_loop, caplog) -> None:
    """get/set, the default handler's log on the asyncio logger, and a failing handler reported by
    the default one."""
    recording = aio_loop.get_exception_handler()
    assert recording is aio_loop.handler
    with pytest.raises(TypeError):
        aio_loop.set_exception_handler("not callable")
    aio_loop.set_exception_handler(None)
    assert aio_loop.get_exception_handler() is None
    with caplog.at_level("ERROR", logger="asyncio"):
        aio_loop.call_exception_handler({"message": "something broke", "exception": ValueError("bad"), "extra": 42})
        aio_loop.default_exception_handler({"message": "said directly"})
    logged = [record for record in caplog.records if record.name == "asyncio"]
    assert "something broke" in logged[0].getMessage() and "extra: 42" in logged[0].getMessage()
    assert logged[0].exc_info[0] is ValueError
    assert "said directly" in logged[1].getMessage()
    caplog.clear()

    def failing(loop, context) -> None:
        raise RuntimeError("the handler itself failed")

    aio_loop.set_exception_handler(failing)
    with caplog.at_level("ERROR", logger="asyncio"):
        aio_loop.call_exception_handler({"message": "original"})
    logged = [record.getMessage() for record in caplog.records if record.name == "asyncio"]
    assert any("Unhandled error in exception handler" in line for line in logged), logged
    aio_loop.set_exception_handler(recording)


def test_set_default_executor_is_used_by_run_in_executor(aio_loop) -> None:
    import concurrent.futures

    names = []
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="chosen")
    aio_loop.set_default_executor(executor)

    async def main() -> None:
        await aio_loop.run_in_executor(None, lambda: names.append(threading.current_thread().name))
        await aio_loop.shutdown_default_executor()

    aio_loop.run_until_complete(main())
    assert names and names[0].startswith("chosen")
    if sys.version_info >= (3, 11):
        with pytest.raises(TypeError):
            aio_loop.set_default_executor(concurrent.futures.ProcessPoolExecutor())


@pytest.mark.parametrize(
    "how", [{"PYTHONASYNCIODEBUG": "1"}, {"-X": "dev"}, {}], ids=["PYTHONASYNCIODEBUG", "-X dev", "neither"]
)
def test_debug_mode_from_the_environment_as_asyncio_reads_it(how: dict) -> None:
    import subprocess

    from serverproc import pollserve_env

    env = pollserve_env({key: value for key, value in how.items() if key != "-X"})
    env.pop("PYTHONASYNCIODEBUG", None) if not how.get("PYTHONASYNCIODEBUG") else None
    flags = ["-X", "dev"] if "-X" in how else []
    code = (
        "import pollserve, asyncio; print(pollserve.new_event_loop().get_debug(), asyncio.new_event_loop().get_debug())"
    )
    done = subprocess.run([sys.executable, *flags, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    expected = "True True" if how else "False False"
    assert done.stdout.strip() == expected, done.stderr


def test_a_pass_runs_the_queued_callbacks_then_the_io_handlers_then_the_timers_due(aio_loop, pair) -> None:
    """asyncio's order in an iteration, which code counts on: a task's first step runs before the
    I/O already waiting for it (CPython's test_datagram_send_to_non_listening_address meets it)."""
    a, b = pair
    b.send(b"x")  # readable before the loop runs
    order = []

    def readable() -> None:
        order.append("io")
        a.recv(1)
        aio_loop.remove_reader(a)
        aio_loop.call_soon(order.append, "scheduled by io")

    aio_loop.add_reader(a, readable)
    aio_loop.call_soon(lambda: (order.append("queued"), aio_loop.call_soon(order.append, "scheduled by queued")))
    aio_loop.call_later(0, order.append, "timer")
    aio_loop.call_soon(aio_loop.stop)
    aio_loop.run_forever()
    assert order == ["queued", "io", "timer"]
    aio_loop.stop()
    aio_loop.run_forever()
    assert order[3:] == ["scheduled by queued", "scheduled by io"]


def test_a_task_queued_with_timers_already_due_runs_its_first_step_before_them(aio_loop) -> None:
    """asyncio collects the due timers before it runs the queued callbacks, so a timer a callback
    sets runs at the next pass at the earliest, after a task that callback created: asyncio.timeout()
    and wait_for() with a tiny delay count on it (the task gets to start, and its finally clauses run)."""
    order = []

    async def first_step() -> None:
        order.append("task")

    def schedule() -> None:
        aio_loop.create_task(first_step())
        aio_loop.call_at(aio_loop.time() - 1, order.append, "timer in the past")
        aio_loop.call_later(0, order.append, "timer at once")

    aio_loop.call_soon(schedule)
    aio_loop.call_later(0.05, aio_loop.stop)
    aio_loop.run_forever()
    assert order == ["task", "timer in the past", "timer at once"]


def test_a_streams_request_is_one_poll_not_two(aio_loop) -> None:
    """The reader's data wakes its task with a call_soon: the queued callbacks run before the next
    poll, so a request and its reply take one pass where asyncio's order takes two (the second
    polls without waiting before it runs the wakeup).  Counted by the loop's passes, on pollserve's
    loop; asyncio's loop has no such count."""
    if not hasattr(aio_loop, "iterations"):
        pytest.skip("asyncio's own loop does not count its passes")
    requests = 200

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(100):
            writer.write(data)
            await writer.drain()
        writer.close()

    def client(port: int, passes: list[int]) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"\xff")
            sock.recv(100)
            passes.append(aio_loop.iterations)
            for n in range(requests):
                sock.sendall(bytes([n % 256]))
                assert sock.recv(100) == bytes([n % 256])
            passes.append(aio_loop.iterations)

    async def main() -> list[int]:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        passes: list[int] = []
        port = server.sockets[0].getsockname()[1]
        await asyncio.wait_for(aio_loop.run_in_executor(None, client, port, passes), 60)
        server.close()
        await server.wait_closed()
        return passes

    first, last = aio_loop.run_until_complete(main())
    # One pass per request (and the executor's wakeup); two per request before.
    assert last - first < 1.5 * requests


def test_debug_mode_switched_on_and_off_while_running_is_what_futures_and_call_soon_see(aio_loop) -> None:
    """The loop's call_soon, create_future and get_debug follow set_debug at every switch: a Future
    keeps where it was made only in debug mode (it asks the loop's get_debug), and call_soon from
    another thread is refused only then."""

    def call_soon_from_a_thread() -> str:
        refused = []

        def attempt() -> None:
            try:
                aio_loop.call_soon(int)  # harmless when it runs
            except RuntimeError as exc:
                refused.append(str(exc))

        thread = threading.Thread(target=attempt)
        thread.start()
        thread.join(10)
        return refused[0] if refused else "accepted"

    async def main() -> list[tuple[bool, bool, str]]:
        seen = []
        for debug in (True, False, True, False):
            aio_loop.set_debug(debug)
            future = aio_loop.create_future()
            timer = aio_loop.call_later(10.0, int)
            at = aio_loop.call_at(aio_loop.time() + 10.0, int)
            task = aio_loop.create_task(asyncio.sleep(0))
            traced = [bool(made._source_traceback) for made in (future, timer, at, task)]
            seen.append((aio_loop.get_debug(), traced, call_soon_from_a_thread()))
            future.cancel()
            timer.cancel()
            at.cancel()
            await task
        return seen

    seen = aio_loop.run_until_complete(main())
    switched = [(True, [True] * 4), (False, [False] * 4), (True, [True] * 4), (False, [False] * 4)]
    assert [(debug, traced) for debug, traced, _ in seen] == switched
    assert ["thread" in outcome for _, _, outcome in seen] == [True, False, True, False]


def test_call_soon_get_debug_and_create_future_of_a_subclass_or_set_on_the_loop_are_the_ones_called(aio_loop) -> None:
    """What the C Future and Task call (loop.call_soon, get_debug, create_future through asyncio's
    streams) is a subclass's override, and a replacement set on the loop object stays through
    set_debug."""
    calls: list[str] = []

    class Counting(type(aio_loop)):  # type: ignore[misc]
        def call_soon(self, *args, **kwargs):
            calls.append("call_soon")
            return super().call_soon(*args, **kwargs)

        def get_debug(self):
            calls.append("get_debug")
            return super().get_debug()

        def create_future(self):
            calls.append("create_future")
            return super().create_future()

        def call_later(self, *args, **kwargs):
            calls.append("call_later")
            return super().call_later(*args, **kwargs)

        def call_at(self, *args, **kwargs):
            calls.append("call_at")
            return super().call_at(*args, **kwargs)

        def create_task(self, *args, **kwargs):
            calls.append("create_task")
            return super().create_task(*args, **kwargs)

    loop = Counting() if isinstance(aio_loop, asyncio.BaseEventLoop) else Counting(aio_loop.backend.name)
    try:

        async def main() -> None:
            future = loop.create_future()
            loop.call_later(0.01, future.set_result, None)
            await future
            await asyncio.wait_for(loop.create_task(asyncio.sleep(0)), 10)

        loop.run_until_complete(main())
        assert {"call_soon", "get_debug", "create_future", "call_later", "call_at", "create_task"} <= set(calls)
    finally:
        loop.close()

    replaced: list[object] = []
    original = aio_loop.call_soon

    def replacement(callback, *args, context=None):
        replaced.append(callback)
        return original(callback, *args, context=context)

    aio_loop.call_soon = replacement
    aio_loop.set_debug(not aio_loop.get_debug())
    aio_loop.set_debug(not aio_loop.get_debug())
    assert aio_loop.call_soon is replacement

    async def wake() -> None:
        await asyncio.sleep(0)

    aio_loop.run_until_complete(wake())
    assert replaced


def test_is_closing_of_a_stream_goes_true_at_close_and_abort_and_drain_sees_it(aio_loop) -> None:
    async def main() -> list[bool]:
        seen = []
        accepted: asyncio.Queue = asyncio.Queue()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accepted.put(writer)

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            for ending in ("close", "abort"):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                served = await asyncio.wait_for(accepted.get(), 10)
                seen.append(writer.transport.is_closing())
                getattr(writer.transport, ending)()
                seen.append(writer.transport.is_closing())
                assert await asyncio.wait_for(served.drain(), 10) is None  # the server side: still open
                served.write("é".encode())
                await served.drain()
                served.close()
                await served.wait_closed()
                seen.append(served.transport.is_closing())
                await asyncio.sleep(0)
        finally:
            server.close()
            await server.wait_closed()
        return seen

    assert aio_loop.run_until_complete(main()) == [False, True, True, False, True, True]
