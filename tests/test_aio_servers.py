"""The servers of docs/asyncio.md that take no loop factory of uvicorn's kind (aiohttp, hypercorn,
gunicorn's uvicorn worker, granian), each run as examples/asyncio_apps runs it and asked over loopback by
HTTP (and WebSocket where the server has it) which loop served it; and the two ways of testing on the
loop (pytest-asyncio, IsolatedAsyncioTestCase).  uvicorn's own command is in test_aio_entry.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
from appservers import EXAMPLES, ask, children, free_port, served
from serverproc import pollserve_env


def run_example(argv: list[str], backend: str) -> subprocess.CompletedProcess[str]:
    """A Python command in examples/asyncio_apps, to its end."""
    return subprocess.run(
        [sys.executable, *argv],
        cwd=EXAMPLES,
        env=pollserve_env({"POLLSERVE_BACKEND": backend}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_aiohttp_server_and_client_run_on_the_loop(backend_name: str) -> None:
    pytest.importorskip("aiohttp")
    port = free_port()
    with served([sys.executable, "aiohttp_server.py", str(port)], port, backend_name):
        client = run_example(["aiohttp_client.py", f"http://127.0.0.1:{port}/"], backend_name)
    assert client.returncode == 0, client.stdout + client.stderr
    expected = f"server: AsyncioLoop {backend_name}; client: AsyncioLoop {backend_name}\n"
    assert client.stdout == expected


def test_hypercorn_serve_runs_under_pollserve_run(backend_name: str) -> None:
    pytest.importorskip("hypercorn")
    pytest.importorskip("websockets")
    port = free_port()
    with served([sys.executable, "hypercorn_server.py", str(port)], port, backend_name) as server:
        pid = server.process.pid
        assert ask(f"http://127.0.0.1:{port}/") == f"AsyncioLoop {backend_name} pid {pid}"
        assert ask(f"ws://127.0.0.1:{port}/") == f"hi AsyncioLoop {backend_name} pid {pid}"
    assert server.process.returncode == 0, server.output  # stopped by its shutdown_trigger, not killed


def test_gunicorn_runs_uvicorn_workers_on_the_loop(tmp_path) -> None:
    """Two worker processes, each serving on pollserve's loop with the backend POLLSERVE_BACKEND names."""
    pytest.importorskip("gunicorn")
    pytest.importorskip("uvicorn_worker")
    pytest.importorskip("websockets")
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-k", "pollserve_worker.PollserveWorker", "-w", "2"]
    argv += ["-b", f"127.0.0.1:{port}", "--control-socket", str(tmp_path / "gunicorn.ctl"), "where:app"]
    with served(argv, port, "poll") as server:
        answers = [ask(f"http://127.0.0.1:{port}/") for _ in range(10)]
        answers.append(ask(f"ws://127.0.0.1:{port}/").removeprefix("hi "))
        workers = children(server.process.pid, 2)
    assert len(workers) == 2, server.output
    for answer in answers:
        loop, backend, _, pid = answer.split()
        assert (loop, backend) == ("AsyncioLoop", "poll") and int(pid) in workers, (answer, workers)
    assert "Using worker: pollserve_worker.PollserveWorker" in server.output, server.output


def test_granian_runs_on_the_loop_through_its_loop_registry() -> None:
    pytest.importorskip("granian")
    pytest.importorskip("websockets")
    port = free_port()
    with served([sys.executable, "granian_server.py", str(port)], port, "select") as server:
        answers = [ask(f"http://127.0.0.1:{port}/"), ask(f"ws://127.0.0.1:{port}/").removeprefix("hi ")]
        workers = children(server.process.pid, 1)
    assert answers[0] == answers[1], answers
    loop, backend, _, pid = answers[0].split()
    assert (loop, backend) == ("AsyncioLoop", "select") and int(pid) in workers, (answers, workers, server.output)


def test_pytest_asyncio_tests_run_on_the_loop() -> None:
    pytest.importorskip("pytest_asyncio")
    argv = ["-m", "pytest", "-s", "-p", "no:cacheprovider", "--rootdir", str(EXAMPLES), "test_on_pytest_asyncio.py"]
    result = run_example(argv, "poll")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "on AsyncioLoop poll" in result.stdout and "1 passed" in result.stdout, result.stdout


def test_isolated_asyncio_test_case_runs_on_the_loop() -> None:
    """loop_factory on 3.13+, the event loop policy before."""
    result = run_example(["-m", "unittest", "-v", "test_on_unittest.py"], "select")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "on AsyncioLoop select" in result.stderr and "OK" in result.stderr, result.stderr
