"""A fork server that runs CPython's asyncio tests one per process: ``python worker.py --loop MODULE:NAME``.

Started by the driver (driver.py) on the Python under test.  It imports the test modules and the
factory once, then reads one JSON request a line on stdin and answers one JSON line on stdout:
first the list of tests, then, for each ``{"run": test_id}``, the outcome of that test run in a
forked child of its own, killed (with the processes it started) when it passes ``--timeout``.
Standard library only, since it runs on every Python the harness is pointed at.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib
import json
import os
import select
import signal
import sys
import tempfile
import time
import traceback
import unittest
from typing import NoReturn

import binding  # beside this file, first on the path

#: how much of a test's output and traceback a result carries
DETAIL_CHARS = 3000


def send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def load_factory(spec: str):
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"--loop {spec!r}: expected MODULE:NAME, a zero-argument loop factory")
    factory = getattr(importlib.import_module(module_name), name)
    if not callable(factory):
        raise TypeError(f"--loop {spec!r} is not callable")
    return factory


class Outcome(unittest.TestResult):
    """Collects one test's outcome: passed, failed or skipped, with the first reason."""

    def __init__(self) -> None:
        super().__init__()
        self.skip_reason = ""

    def addSkip(self, test, reason) -> None:
        super().addSkip(test, reason)
        self.skip_reason = self.skip_reason or reason

    def outcome(self) -> tuple[str, str]:
        problems = self.errors + self.failures
        if problems:
            return "failed", problems[0][1]
        if self.unexpectedSuccesses:
            return "failed", "unexpected success"
        if self.skipped and not self.testsRun - len(self.skipped):
            return "skipped", self.skip_reason
        return "passed", ""


def run_here(test) -> dict:
    """Run one test in this process; return its outcome and the loops it ran on."""
    binding.seen.clear()
    result = Outcome()
    unittest.TestSuite([test.cls(test.method)]).run(result)
    outcome, detail = result.outcome()
    loops = dict(binding.seen)
    if outcome != "skipped" and (not loops or not all(loops.values())):
        ran_on = ", ".join(name for name, made in loops.items() if not made) or "no loop"
        detail = f"the test {outcome} on {ran_on}, not on the factory's loop"
        return {"outcome": "other-loop", "detail": detail, "loops": sorted(loops)}
    return {"outcome": outcome, "detail": detail[-DETAIL_CHARS:], "loops": sorted(loops)}


def run_forked(test, timeout: float) -> dict:
    """Run one test in a forked child that leads its own process group; a hang is a "timeout"."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as output:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            child(test, timeout, output.fileno(), write_end)
        os.close(write_end)
        data = read_until(read_end, started + timeout)
        os.close(read_end)
        timed_out = not data.endswith(b"\n") and time.monotonic() >= started + timeout
        if timed_out:
            os.killpg(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        with contextlib.suppress(ProcessLookupError):  # what the test started and left, in the child's group
            os.killpg(pid, signal.SIGKILL)
        output.seek(0)
        text = output.read().decode(errors="replace")[-DETAIL_CHARS:]
    if timed_out:
        message = {"outcome": "timeout", "detail": f"killed after {timeout:g} s\n{text}", "loops": []}
    elif data.endswith(b"\n"):
        message = json.loads(data)
    else:
        message = {"outcome": "failed", "detail": f"the test process died (status {status:#x})\n{text}", "loops": []}
    message["seconds"] = round(time.monotonic() - started, 3)
    return message


def child(test, timeout: float, output: int, result: int) -> NoReturn:
    """The forked child: run the test with its output in ``output``, write the outcome to ``result``."""
    status = 0
    try:
        os.setpgid(0, 0)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        # Where a hang is, in the output, shortly before the kill.
        faulthandler.dump_traceback_later(max(timeout - 1, timeout * 0.9), file=output)
        os.write(result, (json.dumps(run_here(test)) + "\n").encode())
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def read_until(fd: int, deadline: float) -> bytes:
    """What the child writes to ``fd``, up to its newline, its end, or the deadline."""
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", required=True, help="MODULE:NAME of a zero-argument loop factory")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one test may take")
    args = parser.parse_args()

    # SIGINT as a Python started at a terminal has it: one started in the background by a shell
    # without job control inherits it ignored, and test_add_signal_handler expects the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        import test.test_asyncio  # noqa: F401
    except ImportError as exc:
        send({"missing": f"this Python has no test.test_asyncio ({exc})"})
        return 0
    try:
        binding.watch_running_loops()
        make_loop = binding.wrap_factory(load_factory(args.loop))
        binding.patch_new_event_loop(make_loop)
        tests = {test.id: test for test in binding.collect(make_loop)}
    except Exception:
        send({"error": traceback.format_exc()})
        return 1
    send({"python": sys.version.split()[0], "tests": [[test.id, test.group] for test in tests.values()]})
    for line in sys.stdin:
        request = json.loads(line)
        send(run_forked(tests[request["run"]], args.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
