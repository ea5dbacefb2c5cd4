"""Run the upstream asyncio tests of one Python on one loop factory, and compare with the expectations.

The driver runs on any Python; the tests run in worker.py, a fork server on the Python under test.
A test whose outcome differs from its expectation is run once more, and the difference counts only
when it reproduces.
"""

from __future__ import annotations

import fnmatch
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import expectations

WORKER = Path(__file__).resolve().parent / "worker.py"
#: the columns of the table, in order
COLUMNS = ("passed", "failed", "skipped", "timeout", "other-loop")
#: how long a worker may take to import the test modules and list them
START_TIMEOUT = 120.0


class HarnessError(Exception):
    """The harness could not run the tests (not a test's outcome)."""


@dataclass
class Result:
    test: str
    group: str
    outcome: str
    detail: str = ""
    loops: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: the outcome of each run, first first: two when the first differed from the expectation
    runs: list[str] = field(default_factory=list)


@dataclass
class Difference:
    test: str
    expected: tuple[str, ...]
    got: str
    detail: str


@dataclass
class Run:
    python: str  # the executable given
    loop: str
    version: str = ""
    #: why the run could not happen (no test.test_asyncio on this Python), else ""
    missing: str = ""
    results: list[Result] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)
    seconds: float = 0.0

    def counts(self) -> dict[str, Counter]:
        table: dict[str, Counter] = {}
        for result in self.results:
            table.setdefault(result.group, Counter())[result.outcome] += 1
        return table


class Worker:
    """One worker.py process; stopped by its PID."""

    def __init__(self, python: str, loop: str, timeout: float, env: dict[str, str]) -> None:
        self.timeout = timeout
        self.process = subprocess.Popen(
            [python, str(WORKER), "--loop", loop, "--timeout", str(timeout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=str(WORKER.parent),
        )
        self.hello = self._receive(START_TIMEOUT)

    def _receive(self, timeout: float) -> dict:
        stdout = self.process.stdout
        assert stdout is not None
        if not select.select([stdout], [], [], timeout)[0]:
            self.stop()
            raise HarnessError(f"the worker said nothing for {timeout:g} s")
        line = stdout.readline()
        if not line:
            self.stop()
            raise HarnessError(f"the worker ended (status {self.process.wait()})")
        return json.loads(line)

    def run(self, test: str) -> dict:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write((json.dumps({"run": test}) + "\n").encode())
        stdin.flush()
        # The worker kills a test at its timeout; this bound is for the worker itself.
        return self._receive(self.timeout + 30)

    def stop(self) -> None:
        if self.process.poll() is None:
            if self.process.stdin:
                self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()


def worker_env(paths: list[str] | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with ``paths`` first on PYTHONPATH (where the factory's module is)."""
    env = dict(os.environ)
    env.update(extra or {})
    entries = [*(paths or []), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(entry for entry in entries if entry)
    return env


def run(
    python: str,
    loop: str,
    entries: list[expectations.Entry] | None = None,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    jobs: int = 1,
    only: str = "*",
    progress=None,
) -> Run:
    """Run every test (or those matching ``only``) and compare each outcome with ``entries``."""
    entries = entries or []
    started = time.monotonic()
    result = Run(python, loop)
    workers = [Worker(python, loop, timeout, env if env is not None else worker_env())]
    try:
        hello = workers[0].hello
        if "missing" in hello:
            result.missing = hello["missing"]
            return result
        if "error" in hello:
            raise HarnessError(f"{python} could not bind the tests to {loop}:\n{hello['error']}")
        result.version = hello["python"]
        tests = [(test, group) for test, group in hello["tests"] if fnmatch.fnmatchcase(test, only)]
        while len(workers) < min(jobs, len(tests)):
            workers.append(Worker(python, loop, timeout, env if env is not None else worker_env()))
        todo: queue.Queue = queue.Queue()
        for item in tests:
            todo.put(item)
        done: list[Result] = []
        failures: list[BaseException] = []

        def serve(worker: Worker) -> None:
            try:
                while True:
                    try:
                        test, group = todo.get_nowait()
                    except queue.Empty:
                        return
                    done.append(run_test(worker, test, group, entries, result))
                    if progress:
                        progress(done[-1])
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=serve, args=(worker,)) for worker in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        order = {test: index for index, (test, _) in enumerate(tests)}
        result.results = sorted(done, key=lambda r: order[r.test])
        result.differences = compare(result, entries, whole=only == "*")
    finally:
        for worker in workers:
            worker.stop()
        result.seconds = time.monotonic() - started
    return result


def run_test(worker: Worker, test: str, group: str, entries: list[expectations.Entry], run: Run) -> Result:
    """Run one test; once more when its outcome is not the expected one, keeping an agreeing rerun."""
    expected = expectations.expected_outcomes(entries, test, run.version, run.loop)
    first = worker.run(test)
    final = first
    runs = [first["outcome"]]
    if first["outcome"] not in expected:
        second = worker.run(test)
        runs.append(second["outcome"])
        if second["outcome"] in expected:
            final = second
    return Result(test, group, final["outcome"], final["detail"], final["loops"], final["seconds"], runs)


def compare(run: Run, entries: list[expectations.Entry], whole: bool = True) -> list[Difference]:
    differences = []
    for result in run.results:
        expected = expectations.expected_outcomes(entries, result.test, run.version, run.loop)
        if result.outcome not in expected:
            differences.append(Difference(result.test, expected, result.outcome, result.detail))
    if whole:
        for entry in expectations.stale(entries, {r.test for r in run.results}, run.version, run.loop):
            differences.append(Difference(entry.test, entry.outcomes, "absent", f"expectations line {entry.line}"))
    return differences


def table(run: Run) -> str:
    """passed/failed/skipped/timeout/other-loop per group, for one Python and loop."""
    counts = run.counts()
    width = max([len("total"), *map(len, counts)])
    lines = [
        f"Python {run.version} ({run.python}), loop {run.loop}: {len(run.results)} tests in {run.seconds:.0f} s",
        f"{'group':<{width}}  " + "  ".join(f"{column:>10}" for column in COLUMNS),
    ]
    total: Counter = Counter()
    for group, counter in counts.items():
        total.update(counter)
        lines.append(f"{group:<{width}}  " + "  ".join(f"{counter[c]:>10}" for c in COLUMNS))
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{total[c]:>10}" for c in COLUMNS))
    return "\n".join(lines)


def report(run: Run, verbose: bool = False) -> str:
    """The table, then every difference from the expectations (with its detail when ``verbose``)."""
    if run.missing:
        return f"Python {run.python}, loop {run.loop}: not run: {run.missing}"
    lines = [table(run)]
    reruns = [r for r in run.results if len(r.runs) > 1 and r.outcome != r.runs[0]]
    for result in reruns:
        lines.append(f"  flaky: {result.test} was {result.runs[0]}, then {result.outcome}")
    for difference in run.differences:
        lines.append(f"  DIFFERS: {difference.test}: expected {'|'.join(difference.expected)}, got {difference.got}")
        if verbose and difference.detail:
            lines.extend("      " + line for line in difference.detail.rstrip().splitlines()[-15:])
    verdict = "holds" if not run.differences else f"fails: {len(run.differences)} differences"
    lines.append(f"comparison with the expectations {verdict}")
    return "\n".join(lines)


def summary(runs: list[Run]) -> str:
    """One line per Python and loop: the totals and the verdict."""
    lines = [f"{'python':<8}  {'loop':<28}  " + "  ".join(f"{c:>10}" for c in COLUMNS) + "  comparison"]
    for run in runs:
        if run.missing:
            lines.append(f"{run.python:<8}  {run.loop:<28}  not run: {run.missing}")
            continue
        total = Counter(result.outcome for result in run.results)
        verdict = "holds" if not run.differences else f"{len(run.differences)} differences"
        cells = "  ".join(f"{total[c]:>10}" for c in COLUMNS)
        lines.append(f"{run.version:<8}  {run.loop:<28}  {cells}  {verdict}")
    return "\n".join(lines)


def suggested_entries(run: Run) -> str:
    """Expectation lines for this run's differences, for a person to check and give a reason."""
    lines = []
    version = ".".join(run.version.split(".")[:2])
    for difference in run.differences:
        if difference.got in expectations.FINE or difference.got == "absent":
            continue
        first = difference.detail.strip().splitlines()[-1] if difference.detail.strip() else ""
        lines.append(f"{difference.test}  {version}  {run.loop}  {difference.got}  bug: {first[:100]}")
    return "\n".join(lines)


def write_json(runs: list[Run], path: Path) -> None:
    def encode(run: Run) -> dict:
        return {
            "python": run.python,
            "version": run.version,
            "loop": run.loop,
            "missing": run.missing,
            "seconds": round(run.seconds, 1),
            "results": [vars(r) for r in run.results],
            "differences": [vars(d) for d in run.differences],
        }

    path.write_text(json.dumps([encode(run) for run in runs], indent=1))


def resolve_python(name: str) -> str:
    """An interpreter given as a path, a command, or a version such as 3.12 (on PATH or from pyenv)."""
    import glob
    import shutil

    if name.replace(".", "").isdigit():
        # pyenv first: its shim for a version that is not "global" is on PATH but refuses to run.
        root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
        candidates = sorted(glob.glob(os.path.join(root, "versions", f"{name}.*", "bin", "python")))
        if candidates:
            return candidates[-1]
        name = f"python{name}"
    found = shutil.which(name)
    if found:
        return os.path.abspath(found)  # the worker runs in another folder; a venv's link stays as it is
    raise HarnessError(f"no Python {name!r}: give a path, a command on PATH or a version (3.12)")


if __name__ == "__main__":
    sys.exit("run python -m tests.upstream")
