"""Shared fixtures: the backends to run over, and real pollserve subprocesses.

POLLSERVE_BACKEND (set by the tox envs) narrows every backend-parametrized test
to that one backend, and a backend asked for that is not available fails the
run instead of skipping it, so an env cannot pass vacuously.
POLLSERVE_TEST_EMULATE installs test EMULATIONS (tests/emulation) first.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "emulation"))
import buildchoice
import emulate

TESTED_ROOT = buildchoice.choose()

EMULATED = emulate.install_from_env()
# The backend tests are the pollserve.testing kit: its assertions get pytest's messages too.
pytest.register_assert_rewrite("pollserve.testing")

from serverproc import ServerProcess  # noqa: E402

from pollserve import compiled  # noqa: E402
from pollserve.backends import BACKENDS, auto_backend, available_backends  # noqa: E402

#: "compiled" or "pure Python": what this process runs, and (asserted by test_build) its servers too
TESTED_BUILD = compiled.build()
_STOP = buildchoice.check(TESTED_ROOT, TESTED_BUILD)
if _STOP:
    raise pytest.UsageError(_STOP)

AVAILABLE = available_backends()
#: the backend the environment asks the suite to test, or None for "every available one"
REQUESTED = os.environ.get("POLLSERVE_BACKEND") or None


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [
        f"pollserve build under test: {TESTED_BUILD}, from {TESTED_ROOT}",
        f"pollserve backends available here: {', '.join(AVAILABLE)}",
    ]
    if REQUESTED:
        lines.append(f"POLLSERVE_BACKEND={REQUESTED}: backend tests run on that backend only")
    if EMULATED:
        lines.append(f"EMULATED (tests/emulation): {', '.join(EMULATED)}")
    return lines


def pytest_configure(config: pytest.Config) -> None:
    """Run the session in an empty working directory: a ``python -m`` subprocess puts its working
    directory first on sys.path, where a checkout's ``pollserve`` folder would shadow the build
    under test (PYTHONPATH, set by serverproc, leads it to that build instead).

    Under pytest-xdist (``-n 2``) each worker does so, and the controller, which runs no test, stays
    where it was started: its workers start in its working directory and find the paths given
    relative to it (from an empty one they collected nothing)."""
    distributing = getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput")
    if distributing:
        return
    config.stash[_SAVED_CWD] = os.getcwd()
    os.chdir(config.stash.setdefault(_SESSION_DIR, tempfile.mkdtemp(prefix="pollserve-tests-")))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SAVED_CWD in config.stash:
        os.chdir(config.stash[_SAVED_CWD])
        shutil.rmtree(config.stash[_SESSION_DIR], ignore_errors=True)


_SAVED_CWD = pytest.StashKey[str]()
_SESSION_DIR = pytest.StashKey[str]()


def backend_params() -> list:
    """Every backend pollserve knows; the ones this OS lacks are skipped with the reason."""
    if REQUESTED:
        name = auto_backend().name if REQUESTED == "auto" else REQUESTED
        return [pytest.param(name, id=name)]
    return [
        pytest.param(
            name,
            id=name,
            marks=pytest.mark.skipif(name not in AVAILABLE, reason=f"{name} is not available on {sys.platform}"),
        )
        for name in BACKENDS
    ]


@pytest.fixture(params=backend_params())
def backend_name(request: pytest.FixtureRequest) -> str:
    name = request.param
    if name not in AVAILABLE:
        pytest.fail(
            f"POLLSERVE_BACKEND={REQUESTED} asks for {name!r}, which is not available on {sys.platform} "
            f"(available: {', '.join(AVAILABLE)})"
        )
    return name


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected, non-blocking AF_UNIX socketpair."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def start_server() -> Iterator:
    """Start ``pollserve`` subprocesses; every one still running at teardown is killed by its PID."""
    started: list[ServerProcess] = []

    def start(*args: str, **kwargs) -> ServerProcess:
        server = ServerProcess(*args, **kwargs)
        started.append(server)
        server.wait_listening()
        return server

    yield start
    for server in started:
        server.kill()


# -- asyncio loops: every test of the asyncio face runs on asyncio's own loop and on pollserve's ---------


#: the loops the asyncio tests also run in debug mode: debug mode's checks are the face's and not a
#: backend's, so one backend of pollserve's is enough and keeps the suite's time down
AIO_DEBUG_KINDS = ("asyncio", "epoll")


def aio_loop_params() -> list:
    """asyncio's own loop (the reference), then pollserve's on every backend; asyncio's and epoll's
    (or the first backend requested) in debug mode too."""
    kinds = [pytest.param("asyncio", id="asyncio")]
    for param in backend_params():
        kinds.append(pytest.param(param.values[0], id=f"pollserve-{param.id}", marks=param.marks))
    debug_kinds = {*AIO_DEBUG_KINDS, REQUESTED}
    return [
        pytest.param((kind.values[0], debug), id=f"{kind.id}{'-debug' if debug else ''}", marks=kind.marks)
        for kind in kinds
        for debug in (False, True)
        if not debug or kind.values[0] in debug_kinds
    ]


class RecordingHandler:
    """The loop's exception handler in tests: every call is kept, and one the test did not take
    (``expect()``) fails it at teardown."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, loop, context: dict) -> None:
        self.calls.append(context)

    def expect(self, count: int = 1) -> list[dict]:
        taken, self.calls = self.calls[:count], self.calls[count:]
        assert len(taken) == count, f"expected {count} exception-handler calls, got {taken}"
        return taken


@pytest.fixture(params=aio_loop_params())
def aio_loop(request: pytest.FixtureRequest):
    """A new asyncio loop: asyncio's own (epoll/selectors' best) or pollserve's on one backend."""
    import asyncio

    kind, debug = request.param
    if kind == "asyncio":
        loop = asyncio.new_event_loop()
    else:
        if kind not in AVAILABLE:
            pytest.fail(f"{kind} is not available here")
        from pollserve.aio import AsyncioLoop

        loop = AsyncioLoop(kind)
    loop.set_debug(debug)
    handler = RecordingHandler()
    loop.set_exception_handler(handler)
    loop.handler = handler  # type: ignore[attr-defined]
    try:
        yield loop
    finally:
        if not loop.is_closed():
            if loop.is_running():
                loop.stop()
            loop.close()
    assert not handler.calls, f"unexpected exception-handler calls: {handler.calls}"
