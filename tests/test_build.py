"""The build under test is the one that runs: in this process, in the servers the tests start, and in
their workers; and ``pollserve --version`` says which it is.  POLLSERVE_TEST_BUILD (CI sets it) makes
the run fail at once when the build found is the other one (tests/buildchoice.py)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import buildchoice
from clients import connect, recv_until
from conftest import TESTED_BUILD, TESTED_ROOT
from serverproc import run_pollserve

import pollserve
from pollserve import compiled

TESTS_DIR = str(Path(__file__).parent)


def ask_build(address: tuple[str, int], held: list | None = None) -> tuple[int, str]:
    """(pid, build) of the process that serves a new connection (sample_apps.WhichBuild); the
    connection is kept open in ``held`` if given, so that the next one goes to another worker."""
    sock = connect(address)
    try:
        sock.sendall(b"?")
        reply = recv_until(sock, b"\n")
    finally:
        if held is None:
            sock.close()
        else:
            held.append(sock)
    pid, build = reply.decode().rstrip("\n").split(" ", 1)
    return int(pid), build


def test_this_process_runs_the_build_under_test() -> None:
    assert Path(pollserve.__file__).resolve().parent.parent == TESTED_ROOT
    assert compiled.build() == TESTED_BUILD
    # The per-request modules are all compiled or all pure: never a mix.
    assert {compiled.is_compiled(name) for name in compiled.MODULES} == {TESTED_BUILD == "compiled"}
    if os.environ.get("POLLSERVE_TEST_BUILD"):
        assert buildchoice.BUILDS[os.environ["POLLSERVE_TEST_BUILD"]] == TESTED_BUILD


def test_version_names_the_build() -> None:
    result = run_pollserve("--version")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"pollserve \d+\.\d+\.\d+ \((compiled|pure Python)\)\n", result.stdout), result.stdout
    assert result.stdout == f"pollserve {pollserve.__version__} ({TESTED_BUILD})\n"


def test_a_server_the_tests_start_runs_the_build_under_test(start_server) -> None:
    server = start_server("--app", "sample_apps:WhichBuild", env={"PYTHONPATH": TESTS_DIR})
    assert ask_build(server.address) == (server.proc.pid, TESTED_BUILD)


def test_workers_run_the_build_of_their_supervisor(start_server) -> None:
    """Workers are fresh interpreters: started as ``python -m pollserve`` from a folder holding a
    pollserve source tree (the working directory of a checkout), they would run that tree instead."""
    server = start_server("--workers", "2", "--app", "sample_apps:WhichBuild", env={"PYTHONPATH": TESTS_DIR})
    seen: dict[int, str] = {}
    held: list = []  # open, as in test_workers: the kernel decides which worker accepts
    deadline = time.monotonic() + 30  # the second worker may still be starting on a busy machine
    try:
        while len(seen) < 2 and len(held) < 500 and time.monotonic() < deadline:
            pid, build = ask_build(server.address, held)
            seen[pid] = build
            time.sleep(0.05)
    finally:
        for sock in held:
            sock.close()
    assert server.proc.pid not in seen and len(seen) == 2, seen
    assert set(seen.values()) == {TESTED_BUILD}


def test_workers_started_from_a_folder_with_another_pollserve_run_their_own(start_server, tmp_path) -> None:
    """The hostile case: the working directory holds a pollserve package that is not the one the
    supervisor runs (a checkout, or a stray copy); its workers must not import it."""
    decoy = tmp_path / "pollserve"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise ImportError('the decoy pollserve was imported')\n")
    (decoy / "__main__.py").write_text("raise SystemExit('the decoy pollserve ran')\n")
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        # The supervisor is started with its own path first (as the pollserve script would be).
        server = start_server(
            "--workers",
            "2",
            "--app",
            "sample_apps:WhichBuild",
            env={"PYTHONPATH": TESTS_DIR},
            launcher=compiled.command(str(TESTED_ROOT)),
        )
    finally:
        os.chdir(previous)
    pid, build = ask_build(server.address)
    assert pid != server.proc.pid and build == TESTED_BUILD
    assert "decoy" not in server.log


def test_the_launcher_runs_pollserve_from_the_given_root(tmp_path) -> None:
    """compiled.command(root): what workers and benchmarks use to start one build on purpose."""
    import subprocess

    result = subprocess.run(
        [*compiled.command(str(TESTED_ROOT)), "--version"], capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    assert result.stdout == f"pollserve {pollserve.__version__} ({TESTED_BUILD})\n", result.stderr
