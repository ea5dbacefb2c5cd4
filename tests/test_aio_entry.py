"""The ways in: pollserve.run, new_event_loop and the per-backend factories, plugged into what takes a
loop factory today (asyncio.Runner, asyncio.run, IsolatedAsyncioTestCase, anyio, uvicorn)."""

from __future__ import annotations

import asyncio
import sys
import unittest

import pytest
from appservers import ask, children, example, free_port, served

import pollserve
import pollserve.loops
from pollserve.aio import AsyncioLoop
from pollserve.backends import BackendUnavailableError


async def where() -> tuple[str, str]:
    """The running loop's class and backend, as the code on it sees them."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0)
    return type(loop).__name__, loop.backend.name


def test_run_on_each_backend_and_the_default(backend_name: str, monkeypatch) -> None:
    assert pollserve.run(where(), backend=backend_name) == ("AsyncioLoop", backend_name)
    monkeypatch.setenv("POLLSERVE_BACKEND", backend_name)
    assert pollserve.run(where()) == ("AsyncioLoop", backend_name)
    factory = getattr(pollserve.loops, backend_name)
    loop = factory()
    try:
        assert loop.run_until_complete(where()) == ("AsyncioLoop", backend_name)
    finally:
        loop.close()


def test_run_as_asyncio_run_does_it(backend_name: str) -> None:
    """The result or the exception of main; the tasks it left cancelled; debug as asked; refused
    inside a running loop; not the current event loop afterwards."""
    left: list[asyncio.Task] = []

    async def main() -> bool:
        left.append(asyncio.get_running_loop().create_task(asyncio.sleep(3600)))
        return asyncio.get_running_loop().get_debug()

    assert pollserve.run(main(), backend=backend_name, debug=True) is True
    assert left[0].cancelled()

    async def fails() -> None:
        raise LookupError("from main")

    with pytest.raises(LookupError, match="from main"):
        pollserve.run(fails(), backend=backend_name)

    async def nested() -> None:
        coro = where()
        try:
            pollserve.run(coro, backend=backend_name)
        finally:
            coro.close()

    with pytest.raises(RuntimeError, match=r"pollserve.run\(\) cannot be called from a running event loop"):
        pollserve.run(nested(), backend=backend_name)


def test_a_backend_factory_takes_no_backend_of_its_own() -> None:
    with pytest.raises(TypeError, match="takes no argument"):
        pollserve.loops.select("poll")
    assert repr(pollserve.loops.select) == "<loop factory pollserve.loops.select>"


class FactoryAsAttribute:
    """What IsolatedAsyncioTestCase does with loop_factory: a class attribute, read on the instance."""

    loop_factory = pollserve.loops.poll
    default_factory = pollserve.new_event_loop


def test_the_factories_stay_factories_as_class_attributes() -> None:
    holder = FactoryAsAttribute()
    for factory in (holder.loop_factory, holder.default_factory):
        loop = factory()
        try:
            assert isinstance(loop, AsyncioLoop)
        finally:
            loop.close()


def test_an_unknown_backend_is_refused_with_the_names_there_are() -> None:
    with pytest.raises(BackendUnavailableError, match=r"unknown backend 'nope'.*epoll"):
        pollserve.new_event_loop("nope")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.Runner is 3.11+")
def test_asyncio_runner_takes_the_factory() -> None:
    with asyncio.Runner(loop_factory=pollserve.new_event_loop) as runner:
        assert runner.run(where())[0] == "AsyncioLoop"
        assert isinstance(runner.get_loop(), AsyncioLoop)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.run(loop_factory=) is 3.12+")
def test_asyncio_run_takes_a_backend_factory() -> None:
    assert asyncio.run(where(), loop_factory=pollserve.loops.poll) == ("AsyncioLoop", "poll")


@pytest.mark.skipif(sys.version_info < (3, 13), reason="IsolatedAsyncioTestCase.loop_factory is 3.13+")
def test_isolated_asyncio_test_case_takes_the_factory() -> None:
    seen = []

    class OnPollserve(unittest.IsolatedAsyncioTestCase):
        loop_factory = pollserve.loops.select

        async def test_it(self) -> None:
            seen.append(await where())

    result = unittest.TextTestRunner(verbosity=0).run(unittest.defaultTestLoader.loadTestsFromTestCase(OnPollserve))
    assert result.wasSuccessful()
    assert seen == [("AsyncioLoop", "select")]


def test_anyio_runs_on_the_factory_and_its_sockets_work(backend_name: str) -> None:
    """examples/asyncio_apps/anyio_echo.py's main, an echo over anyio's TCP streams, on each backend."""
    anyio = pytest.importorskip("anyio")
    factory = getattr(pollserve.loops, backend_name)
    got = anyio.run(example("anyio_echo").main, backend="asyncio", backend_options={"loop_factory": factory})
    assert got == f"hi AsyncioLoop {backend_name}"


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_uvicorn_serves_an_asgi_app_on_the_loop(backend_name: str, http: str) -> None:
    """docs/asyncio.md's uvicorn command on the backend POLLSERVE_BACKEND names: an HTTP request and a
    WebSocket round trip, each answered by the app with the loop it runs on."""
    pytest.importorskip("uvicorn")
    pytest.importorskip(http)
    pytest.importorskip("websockets")
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "where:app", "--loop", "pollserve:new_event_loop"]
    argv += ["--http", http, "--ws", "websockets-sansio", "--port", str(port)]
    with served(argv, port, backend_name) as server:
        pid = server.process.pid
        assert ask(f"http://127.0.0.1:{port}/") == f"AsyncioLoop {backend_name} pid {pid}"
        assert ask(f"ws://127.0.0.1:{port}/") == f"hi AsyncioLoop {backend_name} pid {pid}"
    assert "Uvicorn running on" in server.output and "Application shutdown complete" in server.output, server.output


def test_uvicorn_workers_each_run_on_the_loop() -> None:
    """uvicorn --workers 2: each worker process makes its loop with the factory, on the parent's backend."""
    pytest.importorskip("uvicorn")
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "where:app", "--loop", "pollserve:new_event_loop", "--workers", "2"]
    with served([*argv, "--port", str(port)], port, "select") as server:
        answers = [ask(f"http://127.0.0.1:{port}/") for _ in range(10)]
        workers = children(server.process.pid, 2)
    for answer in answers:
        loop, backend, _, pid = answer.split()
        assert (loop, backend) == ("AsyncioLoop", "select") and int(pid) in workers, (answer, workers, server.output)
