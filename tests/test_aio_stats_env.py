"""POLLSERVE_STATS_PORT: the stats endpoint of a program that does not ask for one, in real processes
started with the variable set, as ``uvicorn --loop pollserve:new_event_loop`` would be."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from serverproc import pollserve_env

STATS_LINE = re.compile(r"pollserve: stats for pid (\d+) on http://127\.0\.0\.1:(\d+)/")
NO_ENDPOINT = re.compile(r"pollserve: no stats endpoint for pid (\d+): (.*)")

#: a program with no stats code: its first loop, then a second one made while the first runs; each
#: step printed, then it waits for its stdin to close; then two loops one after the other
PROGRAM = """
import asyncio, sys, pollserve

async def main():
    second = pollserve.new_event_loop()
    print("second loop made", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    second.close()
    return "ran"

print(pollserve.run(main()), flush=True)
print(pollserve.run(asyncio.sleep(0, "ran again")), flush=True)
"""


class Output:
    """A child's output lines, read by a thread as they come, waited for with a bound."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.reader.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def wait_for(self, enough: Callable[[list[str]], bool], timeout: float = 30) -> list[str]:
        with self.changed:
            if not self.changed.wait_for(lambda: enough(self.lines), timeout):
                raise AssertionError("not seen within the bound:\n" + "\n".join(self.lines))
            return list(self.lines)

    def matching(self, pattern: re.Pattern[str]) -> list[re.Match[str]]:
        with self.changed:
            return [found for line in self.lines if (found := pattern.search(line))]


@contextlib.contextmanager
def started(argv: list[str], cwd: Path, env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], Output]]:
    """The process and its output (stdout and stderr in one); it and its children stopped by PID at the end."""
    process = subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    children: list[psutil.Process] = []
    try:
        yield process, Output(process)
    finally:
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(process.pid).children(recursive=True)
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        if process.stdin is not None:
            process.stdin.close()


def program_env(**variables: str) -> dict[str, str]:
    return pollserve_env(variables)


def stats_of(port: int, path: str = "/stats") -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200
        return json.loads(response.read())
    finally:
        connection.close()


def listening_ports(pid: int) -> list[int]:
    process = psutil.Process(pid)
    sockets = process.net_connections("inet") if hasattr(process, "net_connections") else process.connections("inet")
    return sorted(conn.laddr.port for conn in sockets if conn.status == psutil.CONN_LISTEN)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_program(tmp_path: Path, value: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """PROGRAM run to its end with the variable set to ``value``: its result and its output."""
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM],
        cwd=tmp_path,
        env=program_env(POLLSERVE_STATS_PORT=value),
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done, done.stdout + done.stderr


@pytest.mark.parametrize("asked", ["fixed", "0"])
def test_a_plain_program_serves_its_stats_on_its_first_loop_only(tmp_path: Path, asked: str) -> None:
    value = str(free_port()) if asked == "fixed" else "0"
    argv = [sys.executable, "-c", PROGRAM]
    with started(argv, tmp_path, program_env(POLLSERVE_STATS_PORT=value)) as (process, output):
        output.wait_for(lambda lines: "second loop made" in lines)
        [line] = output.matching(STATS_LINE)
        pid, port = int(line[1]), int(line[2])
        assert pid == process.pid
        if asked == "fixed":
            assert port == int(value)
        stats = stats_of(port)
        assert stats["pid"] == process.pid and stats["registered_fds"] >= 2
        # the second loop, made while the first runs, started no endpoint of its own
        assert listening_ports(process.pid) == [port]
        assert process.stdin is not None
        process.stdin.close()
        assert process.wait(timeout=30) == 0
        output.reader.join(timeout=10)
    printed = [line for line in output.lines if not line.startswith("pollserve:")]
    assert printed == ["second loop made", "ran", "ran again"], output.lines
    # the first loop closed: the next loop made took the variable, once
    assert len(output.matching(STATS_LINE)) == 2, output.lines
    assert not output.matching(NO_ENDPOINT), output.lines


def test_a_port_another_process_holds_is_one_warning_and_the_program_runs(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done, printed = run_program(tmp_path, str(port))
    assert done.returncode == 0 and done.stdout.splitlines()[-2:] == ["ran", "ran again"], printed
    warnings = NO_ENDPOINT.findall(done.stderr)
    assert len(warnings) == 2, printed  # one per loop that held the variable: each tried, and said so
    assert f"port {port} on 127.0.0.1 is in use" in warnings[0][1] and "N-M" in warnings[0][1]
    assert not STATS_LINE.search(printed)


def test_a_range_takes_its_first_free_port(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        first = holder.getsockname()[1]
        if first + 3 > 65535:
            pytest.skip("the kernel's port is at the top of the range")
        value = f"{first}-{first + 3}"
        argv = [sys.executable, "-c", PROGRAM]
        with started(argv, tmp_path, program_env(POLLSERVE_STATS_PORT=value)) as (process, output):
            output.wait_for(lambda lines: "second loop made" in lines)
            [line] = output.matching(STATS_LINE)
            port = int(line[2])
            assert first < port <= first + 3, (value, port)
            assert stats_of(port)["pid"] == process.pid
            assert process.stdin is not None
            process.stdin.close()
            assert process.wait(timeout=30) == 0


def run_with_logging(tmp_path: Path, setup: str) -> str:
    """PROGRAM after ``setup``, with POLLSERVE_STATS_PORT=0: its stderr."""
    done = subprocess.run(
        [sys.executable, "-c", setup + PROGRAM],
        cwd=tmp_path,
        env=program_env(POLLSERVE_STATS_PORT="0"),
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_with_logging_set_up_the_line_goes_to_the_pollserve_logger(tmp_path: Path) -> None:
    stderr = run_with_logging(
        tmp_path,
        "import logging; logging.basicConfig(level=logging.INFO, format='%(name)s %(levelname)s %(message)s')\n",
    )
    logged = [line for line in stderr.splitlines() if line.startswith("pollserve ")]
    assert len(logged) == 2 and all(re.match(r"pollserve INFO stats for pid \d+ on http://", line) for line in logged)
    assert "pollserve:" not in stderr


def test_a_logger_that_logging_config_disabled_leaves_the_line_on_stderr(tmp_path: Path) -> None:
    # dictConfig disables the loggers that exist and that it does not name (its default)
    setup = (
        "import logging.config, pollserve.aio.statsenv\n"
        "logging.config.dictConfig({'version': 1, 'root': {'handlers': ['h'], 'level': 'INFO'},"
        " 'handlers': {'h': {'class': 'logging.StreamHandler'}}})\n"
    )
    stderr = run_with_logging(tmp_path, setup)
    assert len(STATS_LINE.findall(stderr)) == 2, stderr


@pytest.mark.parametrize("gone", ["sys.stderr = None", "sys.stderr.close()"])
def test_with_no_stderr_to_say_it_on_the_loop_still_runs(tmp_path: Path, gone: str) -> None:
    program = f"import asyncio, sys, pollserve; {gone}; print(pollserve.run(asyncio.sleep(0, 'ran')))"
    for value in ("0", "garbage"):
        done = subprocess.run(
            [sys.executable, "-c", program],
            cwd=tmp_path,
            env=program_env(POLLSERVE_STATS_PORT=value),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (done.returncode, done.stdout) == (0, "ran\n"), done.stderr


def test_the_host_variable_puts_it_on_ipv6_loopback(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
    program = "import asyncio, pollserve, sys; pollserve.run(asyncio.to_thread(sys.stdin.read))"
    env = program_env(POLLSERVE_STATS_PORT="0", POLLSERVE_STATS_HOST="::1")
    with started([sys.executable, "-c", program], tmp_path, env) as (process, output):
        [line] = output.wait_for(lambda lines: bool(lines))
        found = re.fullmatch(r"pollserve: stats for pid (\d+) on http://\[::1\]:(\d+)/", line)
        assert found and int(found[1]) == process.pid, line
        connection = http.client.HTTPConnection("::1", int(found[2]), timeout=10)
        try:
            connection.request("GET", "/stats")
            assert json.loads(connection.getresponse().read())["pid"] == process.pid
        finally:
            connection.close()
        assert process.stdin is not None
        process.stdin.close()
        assert process.wait(timeout=30) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_childs_first_loop_is_its_own_first(tmp_path: Path) -> None:
    program = """
import os, pollserve
parent_loop = pollserve.new_event_loop()
child = os.fork()
if child == 0:
    pollserve.new_event_loop().close()
    os._exit(0)
print("child", child, flush=True)
os.waitpid(child, 0)
parent_loop.close()
"""
    done = subprocess.run(
        [sys.executable, "-c", program],
        cwd=tmp_path,
        env=program_env(POLLSERVE_STATS_PORT="0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    child = int(done.stdout.split()[1])
    pids = [int(found[0]) for found in STATS_LINE.findall(done.stderr)]
    assert child in pids and len(set(pids)) == 2, done.stderr


@pytest.mark.parametrize("value", ["80a", "0-10", "9000-8000", "70000", "-1"])
def test_a_value_that_is_no_port_is_one_warning_and_the_program_runs(tmp_path: Path, value: str) -> None:
    done, printed = run_program(tmp_path, value)
    assert done.returncode == 0 and done.stdout.splitlines()[-2:] == ["ran", "ran again"], printed
    said = [line for line in done.stderr.splitlines() if line.startswith("pollserve:")]
    assert said and all(f"POLLSERVE_STATS_PORT={value!r} is not a port" in line for line in said), printed
    assert not STATS_LINE.search(printed)


ASGI_APP = """
import os, time

async def app(scope, receive, send):  # run with --lifespan off: HTTP only
    if scope["path"] == "/block":
        time.sleep(0.6)  # holds this worker's loop: a connection made meanwhile goes to the other
    body = str(os.getpid()).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
"""


@contextlib.contextmanager
def uvicorn_workers(tmp_path: Path, value: str) -> Iterator[tuple[subprocess.Popen[str], Output, int]]:
    pytest.importorskip("uvicorn")
    (tmp_path / "asgi_app.py").write_text(textwrap.dedent(ASGI_APP))
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "--workers",
        "2",
        "--loop",
        "pollserve:new_event_loop",
        "--lifespan",
        "off",
    ]
    argv += ["--port", str(port), "asgi_app:app"]
    env = program_env(POLLSERVE_STATS_PORT=value, PYTHONPATH=str(tmp_path))
    with started(argv, tmp_path, env) as (process, output):
        output.wait_for(lambda lines: sum("Started server process" in line for line in lines) == 2, 60)
        yield process, output, port


def get_pid(port: int, path: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        return int(connection.getresponse().read())
    finally:
        connection.close()


@pytest.mark.slow
def test_uvicorn_workers_with_a_range_get_an_endpoint_each(tmp_path: Path) -> None:
    first = free_port()
    value = f"{first}-{min(first + 9, 65535)}"
    with uvicorn_workers(tmp_path, value) as (process, output, _):
        output.wait_for(lambda lines: len([line for line in lines if STATS_LINE.search(line)]) == 2)
        workers = {child.pid for child in psutil.Process(process.pid).children(recursive=True)}
        served = {int(line[1]): int(line[2]) for line in output.matching(STATS_LINE)}
        assert len(served) == 2 and set(served) <= workers, (served, workers)
        assert len(set(served.values())) == 2
        for pid, port in served.items():
            assert first <= port <= first + 9
            assert stats_of(port)["pid"] == pid
        assert not output.matching(NO_ENDPOINT), output.lines


@pytest.mark.slow
def test_uvicorn_workers_with_one_port_one_serves_it_the_other_says_why(tmp_path: Path) -> None:
    stats_port = free_port()
    with uvicorn_workers(tmp_path, str(stats_port)) as (process, output, port):
        output.wait_for(lambda lines: any(STATS_LINE.search(line) for line in lines))
        output.wait_for(lambda lines: any(NO_ENDPOINT.search(line) for line in lines))
        [serving] = output.matching(STATS_LINE)
        [refused] = output.matching(NO_ENDPOINT)
        workers = {int(serving[1]), int(refused[1])}
        assert len(workers) == 2 and workers <= {
            child.pid for child in psutil.Process(process.pid).children(recursive=True)
        }
        assert int(serving[2]) == stats_port and stats_of(stats_port)["pid"] == int(serving[1])
        assert f"port {stats_port} on 127.0.0.1 is in use" in refused[2]
        # both serve the app: a request made while one worker is held by another is the other's
        seen: set[int] = set()
        for _ in range(3):
            held = threading.Thread(target=lambda: seen.add(get_pid(port, "/block")))
            held.start()
            time.sleep(0.3)
            seen.add(get_pid(port, "/"))
            held.join(timeout=30)
            if seen == workers:
                break
        assert seen == workers


GUNICORN_WORKER = """
from uvicorn.workers import UvicornWorker


class PollserveWorker(UvicornWorker):
    CONFIG_KWARGS = {"loop": "pollserve:new_event_loop", "lifespan": "off"}
"""


@pytest.mark.slow
def test_gunicorn_forked_workers_with_a_range_and_a_restarted_worker_takes_the_freed_port(tmp_path: Path) -> None:
    pytest.importorskip("gunicorn")
    pytest.importorskip("uvicorn.workers")
    (tmp_path / "asgi_app.py").write_text(textwrap.dedent(ASGI_APP))
    (tmp_path / "pollserve_worker.py").write_text(GUNICORN_WORKER)
    first, port = free_port(), free_port()
    value = f"{first}-{min(first + 9, 65535)}"
    argv = [sys.executable, "-m", "gunicorn", "-w", "2", "-k", "pollserve_worker.PollserveWorker"]
    argv += ["-b", f"127.0.0.1:{port}", "--no-control-socket", "asgi_app:app"]
    env = program_env(POLLSERVE_STATS_PORT=value, PYTHONPATH=str(tmp_path))
    with started(argv, tmp_path, env) as (process, output):
        output.wait_for(lambda lines: len([line for line in lines if STATS_LINE.search(line)]) == 2, 60)
        served = {int(line[1]): int(line[2]) for line in output.matching(STATS_LINE)}
        assert len(served) == 2 and len(set(served.values())) == 2, served
        assert set(served) <= {child.pid for child in psutil.Process(process.pid).children()}, "forked workers"
        for pid, stats_port in served.items():
            assert stats_of(stats_port)["pid"] == pid
        # a worker ended: the one gunicorn forks in its place takes the port it left
        gone, its_port = next(iter(served.items()))
        psutil.Process(gone).kill()
        output.wait_for(lambda lines: len([line for line in lines if STATS_LINE.search(line)]) == 3, 60)
        newest = output.matching(STATS_LINE)[-1]
        assert int(newest[1]) not in served and int(newest[2]) == its_port
        assert stats_of(its_port)["pid"] == int(newest[1])
        assert not output.matching(NO_ENDPOINT), output.lines


def test_only_the_factories_loops_take_the_variable(tmp_path: Path) -> None:
    """An AsyncioLoop made directly starts no endpoint (its code has start_stats_server()), nor does the
    pollserve command's own loop for an async def handler (it has --stats-port): one endpoint, its own."""
    tests = Path(__file__).resolve().parent
    env = program_env(POLLSERVE_STATS_PORT="0", PYTHONPATH=str(tests))
    direct = subprocess.run(
        [
            sys.executable,
            "-c",
            "import pollserve; loop = pollserve.AsyncioLoop(); print(loop.stats()['pid']); loop.close()",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert direct.returncode == 0, direct.stderr
    assert "stats for pid" not in direct.stdout + direct.stderr
    argv = [sys.executable, "-m", "pollserve", "--app", "handler_apps:echo", "--port", "0", "--stats-port", "0"]
    with started(argv, tmp_path, env) as (process, output):
        lines = output.wait_for(lambda lines: any("stats on http://" in line for line in lines))
        assert not output.matching(STATS_LINE) and not output.matching(NO_ENDPOINT), lines
        assert len(psutil.Process(process.pid).net_connections(kind="tcp")) == 2  # the app's and --stats-port's
