"""Servers of examples/asyncio_apps (uvicorn, aiohttp, hypercorn, gunicorn, granian) started as the docs
start them, on a free port, and stopped by their PID; and the examples' client."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import psutil
from serverproc import pollserve_env

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "asyncio_apps"
#: how long a server may take to answer its first request, and to exit after SIGTERM
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def example(name: str) -> ModuleType:
    """The module examples/asyncio_apps/NAME.py, imported from its file (not as ``__main__``)."""
    spec = importlib.util.spec_from_file_location(f"asyncio_apps_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ask(url: str) -> str:
    """examples/asyncio_apps/ask.py: a GET of an http:// URL, or "hi" over a WebSocket to a ws:// one."""
    return example("ask").ask(url)


class Served:
    """A server process and what it printed, once it has stopped."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.output = ""


@contextlib.contextmanager
def served(argv: list[str], port: int, backend: str, extra_env: dict[str, str] | None = None) -> Iterator[Served]:
    """Run ``argv`` (in its own process group, in EXAMPLES) with POLLSERVE_BACKEND=backend until ``port``
    on 127.0.0.1 takes a connection; stop the group by its PID afterwards, even when the test failed."""
    env = pollserve_env({"POLLSERVE_BACKEND": backend, **(extra_env or {})})
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    process = subprocess.Popen(
        argv,
        cwd=EXAMPLES,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=sys.platform != "win32",  # its own process group, stopped as one
    )
    server = Served(process)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{argv} did not listen on {port}") from None
                time.sleep(0.1)
        yield server
    except BaseException:
        print(stop(process))  # pytest shows it with the failure
        raise
    server.output = stop(process)


def send(process: subprocess.Popen[str], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        if sys.platform == "win32":
            process.terminate()
        else:
            os.killpg(process.pid, signum)


def stop(process: subprocess.Popen[str]) -> str:
    """SIGTERM to the process group, then SIGKILL if it outlives STOP_TIMEOUT; its output.  (Windows has
    no process groups to signal: the process is terminated.)"""
    send(process, signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        send(process, getattr(signal, "SIGKILL", signal.SIGTERM))
        output, _ = process.communicate(timeout=10)
        raise AssertionError(f"{process.args} did not stop within {STOP_TIMEOUT:g} s of SIGTERM:\n{output}") from None
    return output


def children(pid: int, count: int) -> set[int]:
    """The PIDs of the process's children, once it has ``count`` of them (it forks them after it listens)."""
    deadline = time.monotonic() + 30
    while len(found := {child.pid for child in psutil.Process(pid).children()}) < count:
        assert time.monotonic() < deadline, f"{pid} has {len(found)} children, not {count}"
        time.sleep(0.05)
    return found
