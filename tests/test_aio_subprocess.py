"""The asyncio face's subprocesses: subprocess_exec, subprocess_shell, asyncio.create_subprocess_*,
and the two ways pollserve's loop notices a child's exit (a pidfd, a waiting thread).

Each test on the ``aio_loop`` fixture runs on asyncio's own loop (the reference) and on pollserve's
on every backend, in debug mode and not; an exception-handler call the test did not expect fails
it.  The children are ``/bin/sh`` and ``cat`` where they can be (cheap), Python where it must."""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import os
import signal
import sys
import time
import warnings

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pollserve.aio import AsyncioLoop
from pollserve.aio.subprocess import pidfd_works
from tests.test_aio_streams import LIMIT, is_pollserve, run

pytestmark = [
    pytest.mark.skipif(os.name != "posix", reason="subprocesses on pollserve's loop need POSIX"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

#: asyncio's own pipe transport compares os.write()'s byte count with len() of the memoryview, its
#: item count: an array('i') written whole is "partly written", and its loop reports
#: "Data should not be empty" from then on (pollserve's counts bytes)
ASYNCIO_MEMORYVIEW_BUG = "asyncio's pipe transport takes a memoryview's item count for its size"

CHILD_WAITS = [
    pytest.param("pidfd", marks=pytest.mark.skipif(not pidfd_works(), reason="no pidfd_open() here")),
    "thread",
]


def open_fds() -> int:
    """How many fds this process has open."""
    if os.path.isdir("/proc/self/fd"):
        return len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
    import psutil

    return psutil.Process().num_fds()


def reading(loop: asyncio.AbstractEventLoop, transport: asyncio.ReadTransport) -> bool | None:
    """``transport.is_reading()``; None on asyncio's loop before 3.11, whose pipe transport lacks it."""
    if sys.version_info < (3, 11) and not is_pollserve(loop):
        return None
    return transport.is_reading()


class Child(asyncio.SubprocessProtocol):
    """Keeps what the child says and when; ``exited`` holds the return code, ``lost`` the end."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.out: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        self.pipe_lost: dict[int, BaseException | None] = {}
        self.events: list[object] = []
        self.exited = loop.create_future()
        self.lost = loop.create_future()
        self.more = asyncio.Event()
        self.returncode_at_pipe_lost: dict[int, int | None] = {}
        self.on_data = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.SubprocessTransport = transport  # type: ignore[assignment]
        self.events.append("made")

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.out[fd] += data
        self.more.set()
        if self.on_data is not None:
            self.on_data(fd, data)

    def pipe_connection_lost(self, fd: int, exc: BaseException | None) -> None:
        self.events.append(("pipe lost", fd))
        self.pipe_lost[fd] = exc
        self.returncode_at_pipe_lost[fd] = self.transport.get_returncode()
        self.more.set()

    def process_exited(self) -> None:
        self.events.append("exited")
        self.exited.set_result(self.transport.get_returncode())  # a second call would fail here

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)

    async def read_until(self, fd: int, size: int) -> None:
        while len(self.out[fd]) < size and fd not in self.pipe_lost:
            self.more.clear()
            await self.more.wait()


def wait_until_exited(pid: int) -> None:
    """Block (the loop with it) until the child has ended, without reaping it."""
    for _ in range(int(LIMIT * 1000)):
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return
        except ChildProcessError:
            return  # reaped already (a waiting thread's): ended
        time.sleep(0.001)
    raise AssertionError(f"child {pid} did not end")


def reap(pid: int) -> None:
    """Kill and reap a child a test started (a waiting thread may have reaped it first)."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


@pytest.fixture
def sync_pipe():
    """A pipe a child and the test use to agree on a moment; both ends closed after the test."""
    fds = os.pipe()
    yield fds
    for fd in fds:
        with contextlib.suppress(OSError):  # the test closed it
            os.close(fd)


@pytest.fixture(params=["exec", "shell"])
def spawn(request, aio_loop):
    """Start ``sh -c SCRIPT`` with subprocess_exec or subprocess_shell (the fixture's two ways)."""

    async def start(script: str, **kwargs):
        if request.param == "exec":
            return await aio_loop.subprocess_exec(Child, "/bin/sh", "-c", script, **kwargs)
        return await aio_loop.subprocess_shell(Child, script, **kwargs)

    return start


def test_a_child_echoes_its_input_and_exits_with_its_code(aio_loop, spawn) -> None:
    async def main() -> None:
        transport, child = await spawn("cat; echo done >&2; exit 3")
        assert transport.get_pid() > 0
        assert transport.get_returncode() is None
        stdin = transport.get_pipe_transport(0)
        stdin.write(b"hello\n")
        await child.read_until(1, 6)
        stdin.close()
        assert await child.exited == 3
        assert await child.lost is None
        assert bytes(child.out[1]) == b"hello\n" and bytes(child.out[2]) == b"done\n"
        assert child.events[0] == "made" and child.events[-1] == "lost"
        assert child.events.count("exited") == 1
        transport.close()

    run(aio_loop, main())


def test_the_stdlib_argument_checks(aio_loop) -> None:
    async def main() -> None:
        for kwargs, message in [
            ({"universal_newlines": True}, "universal_newlines must be False"),
            ({"shell": True}, "shell must be False"),
            ({"bufsize": 1}, "bufsize must be 0"),
            ({"text": True}, "text must be False"),
            ({"encoding": "utf-8"}, "encoding must be None"),
            ({"errors": "strict"}, "errors must be None"),
        ]:
            with pytest.raises(ValueError, match=message):
                await aio_loop.subprocess_exec(Child, "/bin/true", **kwargs)
        with pytest.raises(ValueError, match="shell must be True"):
            await aio_loop.subprocess_shell(Child, "true", shell=False)
        with pytest.raises(ValueError, match="cmd must be a string"):
            await aio_loop.subprocess_shell(Child, ["true"])
        with pytest.raises(FileNotFoundError):
            await aio_loop.subprocess_exec(Child, "/nonexistent/program")

    run(aio_loop, main())


def test_a_child_that_exits_before_its_pipes_are_connected(aio_loop, spawn, sync_pipe) -> None:
    """The loop is held after the child started, until it has ended: its exit and its output come
    to a transport whose pipes were not connected yet."""
    sync_r, sync_w = sync_pipe

    def hold_until_the_child_ended() -> None:
        os.close(sync_w)
        pid = int(os.read(sync_r, 64))
        wait_until_exited(pid)

    async def main() -> None:
        aio_loop.call_soon(hold_until_the_child_ended)  # runs before the pipes' connecting task
        transport, child = await spawn("echo $$ >&2; echo early; exit 7", stderr=sync_w)
        assert await child.exited == 7
        assert await child.lost is None
        assert bytes(child.out[1]) == b"early\n"
        transport.close()

    run(aio_loop, main())


def test_a_child_closing_stdout_while_it_runs(aio_loop, spawn) -> None:
    async def main() -> None:
        transport, child = await spawn("echo bye; exec 1>&-; read line; exit 0")
        await child.read_until(1, 4)
        while 1 not in child.pipe_lost:
            child.more.clear()
            await child.more.wait()
        assert child.pipe_lost[1] is None
        assert child.returncode_at_pipe_lost[1] is None  # it still runs
        assert not child.exited.done()
        transport.get_pipe_transport(0).write(b"go on\n")
        assert await child.exited == 0
        await child.lost

    run(aio_loop, main())


def test_writing_to_a_child_that_has_exited_is_a_broken_pipe(aio_loop, spawn, sync_pipe, caplog) -> None:
    sync_r, sync_w = sync_pipe

    async def main() -> None:
        # Its stdin is never read; it waits on the sync pipe, given as its stdout.
        transport, child = await spawn("read go <&1; exit 0", stdout=sync_r)
        os.write(sync_w, b"go\n")
        wait_until_exited(transport.get_pid())  # the loop has not noticed yet
        transport.get_pipe_transport(0).write(b"x" * 100_000)
        assert await child.exited == 0
        assert await child.lost is None
        assert isinstance(child.pipe_lost[0], BrokenPipeError)

    run(aio_loop, main())
    assert not [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")]
    assert not [record for record in caplog.records if record.exc_info]


def test_signals_after_the_end_raise_process_lookup_error(aio_loop, spawn) -> None:
    async def main() -> None:
        transport, child = await spawn("exit 0")
        await child.lost
        for call in (transport.kill, transport.terminate, lambda: transport.send_signal(signal.SIGTERM)):
            with pytest.raises(ProcessLookupError):
                call()

    run(aio_loop, main())


def test_exit_statuses_as_asyncio_reports_them(aio_loop) -> None:
    async def main() -> None:
        process = await asyncio.create_subprocess_exec("/bin/sh", "-c", "read x", stdin=asyncio.subprocess.PIPE)
        process.terminate()
        assert await process.wait() == -signal.SIGTERM
        process = await asyncio.create_subprocess_shell("kill -9 $$")
        assert await process.wait() == -signal.SIGKILL
        process = await asyncio.create_subprocess_shell("exit 42")
        assert await process.wait() == 42

    run(aio_loop, main())


@pytest.mark.parametrize("count", [50])
def test_concurrent_children_each_with_its_own_output(aio_loop, count: int) -> None:
    async def one(number: int) -> tuple[bytes, bytes, int]:
        process = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            'read line; printf "%s:%s" "$1" "$line"; printf "err%s" "$1" >&2; exit $(($1 % 7))',
            "sh",
            str(number),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate(f"line{number}\n".encode())
        return out, err, process.returncode  # type: ignore[return-value]

    async def main() -> None:
        results = await asyncio.gather(*(one(number) for number in range(count)))
        for number, (out, err, code) in enumerate(results):
            assert out == f"{number}:line{number}".encode()
            assert err == f"err{number}".encode()
            assert code == number % 7

    run(aio_loop, main())


class PausesAtFirstRead(Child):
    """Pauses the pipe from inside its first delivery. That may come in a pass before
    ``subprocess_exec``'s caller resumes, so the protocol, not the caller, must do it."""

    def __init__(self) -> None:
        super().__init__()
        self.on_data = self.pause_once

    def pause_once(self, fd: int, data: bytes) -> None:
        self.on_data = None
        self.transport.get_pipe_transport(fd).pause_reading()  # type: ignore[union-attr]


def test_large_output_with_reading_paused_then_resumed(aio_loop) -> None:
    size = 3_000_000

    async def main() -> None:
        transport, child = await aio_loop.subprocess_exec(
            PausesAtFirstRead, "/bin/sh", "-c", f"yes 0123456789abcde | head -c {size}", stdin=None, stderr=None
        )
        stdout = transport.get_pipe_transport(1)
        await child.read_until(1, 1)
        assert reading(aio_loop, stdout) in (False, None)
        await asyncio.sleep(0.01)  # what was read before the pause reaches the protocol (call_soon)
        held = len(child.out[1])
        for _ in range(50):
            await asyncio.sleep(0.001)
        assert len(child.out[1]) == held  # nothing read while paused
        assert not child.exited.done()  # the child is blocked on the full pipe
        stdout.resume_reading()
        assert await child.exited == 0
        await child.lost
        assert bytes(child.out[1]) == (b"0123456789abcde\n" * (size // 16 + 1))[:size]

    run(aio_loop, main())


def test_non_ascii_and_a_memoryview_of_ints_through_a_child(aio_loop) -> None:
    ints = array.array("i", range(-1000, 1000))
    text = "naïve café — 日本語 ✓".encode()
    if not is_pollserve(aio_loop):
        pytest.skip(ASYNCIO_MEMORYVIEW_BUG)

    async def main() -> None:
        process = await asyncio.create_subprocess_exec(
            "cat", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        process.stdin.write(text)  # type: ignore[union-attr]
        process.stdin.write(memoryview(ints))  # type: ignore[union-attr]
        process.stdin.close()  # type: ignore[union-attr]
        out = await process.stdout.read()  # type: ignore[union-attr]
        assert await process.wait() == 0
        assert out == text + ints.tobytes()
        assert process.returncode == 0

    run(aio_loop, main())


# -- pollserve's two ways of noticing a child's exit --------------------------------------------------


@pytest.fixture(params=CHILD_WAITS)
def wait_loop(request, backend_name):
    loop = AsyncioLoop(backend_name)
    loop.child_wait = request.param
    errors: list[dict] = []
    loop.set_exception_handler(lambda loop, context: errors.append(context))
    yield loop
    loop.close()
    assert not errors


def test_each_child_wait_method_notices_exits_and_signals(wait_loop) -> None:
    async def main() -> None:
        codes = []
        for script in ("exit 5", "kill -TERM $$", "kill -KILL $$", "read x"):
            transport, child = await wait_loop.subprocess_exec(Child, "/bin/sh", "-c", script)
            assert transport._child_wait == wait_loop.child_wait
            if script == "read x":
                transport.send_signal(signal.SIGINT)
            codes.append(await child.exited)
            await child.lost
            transport.close()
        assert codes == [5, -signal.SIGTERM, -signal.SIGKILL, -signal.SIGINT]

    run(wait_loop, main())


@pytest.mark.parametrize("method", CHILD_WAITS)
def test_a_loop_closing_with_a_live_child_kills_nothing_and_leaks_no_fd(backend_name: str, method: str) -> None:
    """The loop's close leaves the child running and closes its pidfd; the transport, never
    closed, warns when collected and kills the child then, as asyncio's; no fd is left."""
    gc.collect()  # an earlier test's garbage holding an fd would be closed mid-count
    before = open_fds()
    loop = AsyncioLoop(backend_name)
    loop.child_wait = method
    transport, child = run(loop, loop.subprocess_exec(Child, "/bin/sh", "-c", "read x", stdout=None, stderr=None))
    pid = transport.get_pid()
    try:
        loop.close()
        assert open_fds() == before + 1  # the loop's own fds and the pidfd closed; stdin's pipe is the transport's
        assert os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None  # still running
        del child
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del transport
            gc.collect()
        assert any(issubclass(w.category, ResourceWarning) and "unclosed" in str(w.message) for w in caught)
        wait_until_exited(pid)  # the transport's close killed it
    finally:
        reap(pid)
    assert open_fds() == before


def test_a_child_its_transport_closed_after_it_ended_keeps_its_status(wait_loop) -> None:
    """close() polls the Popen, which reaps a child that has ended: the loop reports the status
    the Popen read, and waits for no other child by that pid."""

    async def main() -> None:
        transport, child = await wait_loop.subprocess_exec(Child, "/bin/sh", "-c", "exit 4")
        wait_until_exited(transport.get_pid())  # the loop has not noticed yet
        transport.close()
        assert await child.exited == 4
        await child.lost

    run(wait_loop, main())


def test_the_environment_chooses_the_method(monkeypatch) -> None:
    monkeypatch.setenv("POLLSERVE_ASYNCIO_CHILD_WAIT", "thread")
    loop = AsyncioLoop("poll")
    try:
        transport, child = run(loop, loop.subprocess_exec(Child, "/bin/sh", "-c", "exit 0"))
        assert transport._child_wait == "thread"
        assert run(loop, child.exited) == 0
        run(loop, child.lost)
        transport.close()
        monkeypatch.setenv("POLLSERVE_ASYNCIO_CHILD_WAIT", "sometimes")
        with pytest.raises(ValueError, match="child_wait must be one of"):
            run(loop, loop.subprocess_exec(Child, "/bin/sh", "-c", "exit 0"))
    finally:
        loop.close()


# -- a state machine over one child ----------------------------------------------------------------------


class CatLifecycle(RuleBasedStateMachine):
    """``cat`` on pollserve's loop (backends and child-wait methods in turn), driven in any order:
    writes to its stdin, stdin closed, stdout paused and resumed, a signal, a wait.  Invariants: the
    output is the input echoed back in order; the return code is set once and matches the exit; the
    loop keeps running; no fd is left behind."""

    runs = 0

    def __init__(self) -> None:
        super().__init__()
        CatLifecycle.runs += 1
        self.fds_before = open_fds()
        self.loop = AsyncioLoop(BACKENDS[self.runs % len(BACKENDS)])
        self.loop.child_wait = METHODS[(self.runs // len(BACKENDS)) % len(METHODS)]
        self.errors: list[dict] = []
        self.loop.set_exception_handler(lambda loop, context: self.errors.append(context))
        self.transport, self.child = self.run(self.loop.subprocess_exec(Child, "cat", stderr=None))
        self.written = bytearray()
        self.stdin_open = True
        self.paused = False
        self.signalled: int | None = None
        self.may_have_ended = False
        self.number = 0

    def run(self, coro):
        return self.loop.run_until_complete(asyncio.wait_for(coro, LIMIT))

    def spin(self) -> None:
        self.run(asyncio.sleep(0.002))

    @precondition(lambda self: self.stdin_open and self.signalled is None)
    @rule(size=st.integers(1, 200_000))
    def write(self, size: int) -> None:
        self.number += 1
        data = (self.number.to_bytes(4, "big") * (size // 4 + 1))[:size]
        self.transport.get_pipe_transport(0).write(data)
        self.written += data
        self.spin()

    @precondition(lambda self: self.stdin_open)
    @rule()
    def close_stdin(self) -> None:
        self.transport.get_pipe_transport(0).close()
        self.stdin_open = False
        self.spin()

    @rule()
    def pause_or_resume_stdout(self) -> None:
        stdout = self.transport.get_pipe_transport(1)
        if stdout is None:
            return
        self.paused = not self.paused
        if not self.paused:
            stdout.resume_reading()
            return
        stdout.pause_reading()
        self.spin()  # what was read before the pause reaches the protocol (asyncio's call_soon)
        held = len(self.child.out[1])
        self.spin()
        assert len(self.child.out[1]) == held

    @precondition(lambda self: self.signalled is None)
    @rule(sig=st.sampled_from([signal.SIGTERM, signal.SIGKILL]))
    def signal(self, sig: int) -> None:
        self.signalled = sig
        self.may_have_ended = not self.stdin_open  # cat may have ended before the signal
        if not self.child.exited.done():  # else ended already: there is nothing to signal
            self.transport.send_signal(sig)
        self.spin()

    @precondition(lambda self: not self.stdin_open or self.signalled is not None)
    @rule()
    def wait(self) -> None:
        if self.paused:
            self.transport.get_pipe_transport(1).resume_reading()
            self.paused = False
        code = self.run(self.child.exited)
        self.run(self.child.lost)
        if self.signalled is None:
            assert code == 0
        else:
            assert code == -self.signalled or (self.may_have_ended and code == 0)
        if self.signalled is None:
            assert bytes(self.child.out[1]) == bytes(self.written)

    @invariant()
    def echoed_in_order_and_exited_once(self) -> None:
        assert not self.errors
        out = bytes(self.child.out[1])
        assert out == bytes(self.written[: len(out)])
        assert self.child.events.count("exited") <= 1
        if self.child.exited.done():
            assert self.child.exited.result() == self.transport.get_returncode()

    @invariant()
    def the_loop_runs(self) -> None:
        assert self.run(asyncio.sleep(0, result="ran")) == "ran"

    def teardown(self) -> None:
        try:
            if self.paused:
                self.transport.get_pipe_transport(1).resume_reading()  # else its EOF is never read
            if not self.child.exited.done():
                self.transport.kill()
                self.run(self.child.exited)
            self.run(self.child.lost)
            self.transport.close()
        finally:
            self.loop.close()
        assert open_fds() == self.fds_before


BACKENDS = ["epoll", "poll", "select"] if hasattr(__import__("select"), "epoll") else ["poll", "select"]
METHODS = ["pidfd", "thread"] if pidfd_works() else ["thread"]

TestCatLifecycle = CatLifecycle.TestCase
TestCatLifecycle.settings = settings(
    max_examples=20, stateful_step_count=10, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
