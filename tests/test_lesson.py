"""The lesson in examples/lesson/ still shows what docs/lesson.md says it shows.

run.py is run as a learner runs it, and what it found is read from its --json output: each step's
limits are asserted as behaviour (who was answered, who was cut off, which server died of what),
never as a duration.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from serverproc import pollserve_env

from pollserve import available_backends
from pollserve.backends import get_backend

#: the checkout's examples, whichever build (source tree or installed) the suite tests
RUN = Path(__file__).resolve().parent.parent / "examples" / "lesson" / "run.py"
DOCS = Path(__file__).resolve().parent.parent / "docs"
LESSON_STEPS = ("1", "2", "3")
ONE_AT_A_TIME = ("1", "2")


def start_lesson(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    # A session of its own: a run that hangs is killed together with the servers it started.
    return subprocess.Popen(
        [sys.executable, str(RUN), "--json", *args],
        env=pollserve_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish_lesson(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return stdout, stderr


def run_lesson(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = start_lesson(*args, env=env)
    stdout, stderr = finish_lesson(proc)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    report = json.loads(stdout)
    for name, load in report["loads"].items():
        for step, result in load["results"].items():
            assert "error" not in result, f"{name}, step {step}: {result['error']}"
    return report


@pytest.fixture(scope="module")
def short() -> dict[str, Any]:
    return run_lesson("--short")


def pollserve_steps(report: dict[str, Any]) -> list[str]:
    keys = [step["key"] for step in report["steps"]]
    assert keys[:3] == list(LESSON_STEPS)
    return keys[3:]


def results(report: dict[str, Any], load: str) -> dict[str, dict[str, Any]]:
    return report["loads"][load]["results"]


def test_step_4_runs_on_every_backend_here(short: dict[str, Any]) -> None:
    requested = os.environ.get("POLLSERVE_BACKEND")
    names = [get_backend(requested).name] if requested else available_backends()
    assert sorted(pollserve_steps(short)) == sorted(f"4-{name}" for name in names)
    assert "fd2000" not in short["loads"]  # --short leaves the slow load out


def test_pollserve_backend_chooses_step_4s_backend() -> None:
    # select: on every POSIX system, and never what auto picks where a better backend exists
    report = run_lesson("--short", "--only", "clients", env={"POLLSERVE_BACKEND": "select"})
    assert pollserve_steps(report) == ["4-select"]
    assert results(report, "clients")["4-select"]["answered_at_once"] == 5


def test_a_backend_this_os_lacks_is_one_line_and_exit_2() -> None:
    proc = start_lesson("--short", env={"POLLSERVE_BACKEND": "no-such-backend"})
    stdout, stderr = finish_lesson(proc)
    assert proc.returncode == 2 and stdout == "", (stdout, stderr)
    assert stderr.startswith("run.py: POLLSERVE_BACKEND=no-such-backend: ") and stderr.count("\n") == 1, stderr


@pytest.mark.parametrize("page", ["lesson.md", "lesson.ru.md"])
def test_the_output_shown_is_that_of_the_command_shown(page: str) -> None:
    """The page's first command and the run it shows agree: the settings of the command (--short or
    not) are the ones the shown output was printed with."""
    sys.path.insert(0, str(RUN.parent))
    try:
        import run as lesson_runner
    finally:
        sys.path.remove(str(RUN.parent))
    text = (DOCS / page).read_text()
    command = re.search(r"```sh\n(python examples/lesson/run\.py[^\n]*)\n```", text)
    assert command, f"{page} shows no run.py command"
    settings = lesson_runner.SHORT if "--short" in command[1].split() else lesson_runner.FULL
    shown = text[command.end() :]
    clients = re.findall(r"N clients at once: .*\((\d+) clients\)", shown)
    waited = re.findall(r"the other client got nothing in ([\d.]+) s", shown)
    assert clients and waited, f"{page} shows no output of run.py after {command[1]!r}"
    assert {int(n) for n in clients} == {settings.clients}, (command[1], clients)
    assert {float(s) for s in waited} == {settings.wait * 2}, (command[1], waited)
    if settings.short:
        assert "2,000 clients at once" not in shown, f"{page}: --short does not run the 2,000 connections"


def test_the_blocking_steps_serve_one_client_at_a_time(short: dict[str, Any]) -> None:
    found = results(short, "clients")
    for step in ONE_AT_A_TIME:
        assert found[step]["answered_at_once"] == 1, found[step]
        assert found[step]["second_waits"] and found[step]["second_answered_after_first_left"], found[step]
    for step in ["3", *pollserve_steps(short)]:
        assert found[step]["answered_at_once"] == found[step]["clients"], found[step]
        assert not found[step]["second_waits"]


def test_a_client_that_stops_reading_stalls_the_lesson_but_not_pollserve(short: dict[str, Any]) -> None:
    found = results(short, "stalled")
    for step in LESSON_STEPS:
        assert not found[step]["other_answered"], found[step]
    # the select() loop did not die: it is stuck in send()
    assert found["3"]["server_running"], found["3"]
    for step in pollserve_steps(short):
        assert found[step]["other_answered"] and found[step]["server_running"], found[step]
        # backpressure: it stopped reading that client, so its 20 more requests cost nothing; buffering
        # an 8 MB reply to each would have grown it by 160 MB
        assert found[step]["server_memory_growth"] < 2 * found[step]["reply_bytes"], found[step]


def test_a_megabyte_reply_arrives_whole_and_pollserve_answers_others_meanwhile(short: dict[str, Any]) -> None:
    found = results(short, "megabyte")
    for step, result in found.items():
        assert result["reader_received"] == result["reply_bytes"], (step, result)
        assert result["other_received"] == result["reply_bytes"], (step, result)
    for step in ONE_AT_A_TIME:
        assert not found[step]["other_answered_meanwhile"], found[step]
    # step 3 is left out: whether its send() of 1 MB blocks depends on the kernel's buffer sizes
    for step in pollserve_steps(short):
        assert found[step]["other_answered_meanwhile"], found[step]


def test_sigterm_cuts_the_lessons_reply_and_pollserve_flushes_it(short: dict[str, Any]) -> None:
    found = results(short, "sigterm")
    for step in LESSON_STEPS:
        assert found[step]["exit_code"] == -signal.SIGTERM, found[step]
        assert found[step]["signalled_after"] <= found[step]["received"] < found[step]["reply_bytes"], found[step]
    for step in pollserve_steps(short):
        assert found[step]["complete"] and found[step]["exit_code"] == 0, found[step]
        assert found[step]["server_said"].startswith("stopped:"), found[step]


def test_emfile_kills_the_select_loop_and_pollserve_refuses_the_excess(short: dict[str, Any]) -> None:
    found = results(short, "emfile")
    for step in ONE_AT_A_TIME:
        assert (found[step]["answered"], found[step]["waiting"]) == (1, found[step]["connections"] - 1), found[step]
    assert not found["3"]["server_running"], found["3"]
    assert "Too many open files" in found["3"]["server_said"], found["3"]
    for step in pollserve_steps(short):
        result = found[step]
        assert result["server_running"] and result["waiting"] == 0, result
        assert result["answered"] > 0 and result["closed"] > 0, result
        assert "refused" in result["server_said"], result


@pytest.mark.slow
def test_two_thousand_connections_past_fd_setsize() -> None:
    report = run_lesson("--only", "fd2000")
    load = report["loads"]["fd2000"]
    if "skipped" in load:
        pytest.skip(f"run.py skipped the load: {load['skipped']}")
    found = load["results"]
    assert not found["3"]["server_running"], found["3"]
    assert found["3"]["server_said"] == "ValueError: filedescriptor out of range in select()", found["3"]
    for step in pollserve_steps(report):
        result = found[step]
        assert result["server_running"] and result["waiting"] == 0, result
        if step == "4-select":
            assert 0 < result["answered"] < 1024 and "refused" in result["server_said"], result
        else:
            assert result["answered"] == result["connections"] == 2000, result
