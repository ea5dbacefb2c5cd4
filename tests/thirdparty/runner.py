"""One run of a suite's pytest on one loop, read back from the plugin's records (inject/)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .venvs import CACHE, HarnessError, Prepared

INJECT = Path(__file__).resolve().parent / "inject"
EMULATION_DIR = Path(__file__).resolve().parent.parent / "emulation"
#: the name the reports give asyncio's own loop, the reference
REFERENCE = "asyncio"
#: pytest's exit statuses that still mean "the tests ran": all passed, some failed
RAN = (0, 1)


@dataclass
class Record:
    test: str
    outcome: str  # passed, failed, skipped, or absent (the run does not have the test)
    detail: str = ""
    loops: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class PytestRun:
    loop: str
    records: dict[str, Record]
    seconds: float
    log: Path

    def outcome(self, test: str) -> str:
        record = self.records.get(test)
        return record.outcome if record else "absent"


def on_loop(record: Record, loop: str) -> bool:
    """Whether the test ran on the loop of the run: pollserve's, or asyncio's own for the reference."""
    prefix = "asyncio." if loop == REFERENCE else "pollserve."
    return any(name.startswith(prefix) for name in record.loops)


def run(
    prepared: Prepared,
    loop: str,
    *,
    pollserve: Path,
    jobs: int = 1,
    timeout: float | None = None,
    only: list[str] | None = None,
    tests: list[str] | None = None,
    emulate: str | None = None,
    bound: float = 3600.0,
    label: str = "",
) -> PytestRun:
    """Run the suite (or the node ids in ``only``) on ``loop``: ``REFERENCE`` or ``MODULE:NAME`` of a
    pollserve factory.  ``bound`` is the whole run's: past it the run's process group is killed."""
    suite = prepared.suite
    runs = CACHE / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    tag = f"{suite.name}-{prepared.version}-{loop.replace(':', '.')}{label}"
    log = runs / f"{tag}.log"
    with tempfile.TemporaryDirectory(prefix=f"{tag}-", dir=runs) as out:
        env = dict(os.environ)
        paths = [str(INJECT), str(pollserve)]
        if emulate:
            env["POLLSERVE_TEST_EMULATE"] = emulate
            paths.insert(0, str(EMULATION_DIR))
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["POLLSERVE_THIRDPARTY_LOOP"] = "" if loop == REFERENCE else loop
        env["POLLSERVE_THIRDPARTY_SUITE"] = suite.name
        env["POLLSERVE_THIRDPARTY_OUT"] = out
        env["POLLSERVE_THIRDPARTY_DROP"] = ",".join(suite.drop)
        env["POLLSERVE_THIRDPARTY_SKIP"] = "\n".join(f"{marker}={reason}" for marker, reason in suite.skip)
        args = expand(prepared.source, tests or suite.args)
        if only is not None:
            listing = Path(out) / "only.txt"
            listing.write_text("".join(f"{test}\n" for test in only))
            env["POLLSERVE_THIRDPARTY_ONLY"] = str(listing)
            # Collect only the files the tests are in.
            args = sorted({test.split("::")[0] for test in only})
        else:
            env.pop("POLLSERVE_THIRDPARTY_ONLY", None)
        command = [
            str(prepared.python),
            "-m",
            "pytest",
            "-p",
            "pollserve_thirdparty",
            "-p",
            "no:cacheprovider",
            "-n",
            str(jobs) if jobs > 1 else "0",
            *([f"--timeout={timeout or suite.timeout:g}"] if timeout or suite.timeout else []),
            "-q",
            *suite.options,
            *args,
        ]
        started = time.monotonic()
        with log.open("w") as output:
            output.write(f"$ {' '.join(command)}\n  (in {prepared.source}, loop {loop})\n")
            output.flush()
            process = subprocess.Popen(
                command,
                cwd=prepared.source,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                status = process.wait(bound)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise HarnessError(f"{suite.name} on {loop} ran past {bound:g} s and was stopped (see {log})") from None
            finally:
                # What the tests started and left behind, in the run's own process group.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        seconds = time.monotonic() - started
        if status not in RAN:
            raise HarnessError(f"{suite.name}'s pytest on {loop} ended with status {status} (see {log})")
        records = read_records(Path(out))
    return PytestRun(loop, records, seconds, log)


def expand(source: Path, paths: Iterable[str]) -> list[str]:
    """The suite's test paths, a pattern (``tests/test_web_*.py``) as the files it matches there."""
    args = []
    for path in paths:
        matches = sorted(str(match.relative_to(source)) for match in source.glob(path)) if "*" in path else [path]
        if not matches:
            raise HarnessError(f"no test file of {source.name} matches {path!r}")
        args.extend(matches)
    return args


def read_records(out: Path) -> dict[str, Record]:
    records: dict[str, Record] = {}
    for path in sorted(out.glob("records-*.jsonl")):
        for line in path.read_text().splitlines():
            message = json.loads(line)
            message.pop("collect", None)
            records[message["test"]] = Record(**message)
    collected: set[str] = set()
    for path in out.glob("collected-*.txt"):
        collected.update(path.read_text().split("\n"))
    collected.discard("")
    for test in collected - set(records):
        records[test] = Record(test, "failed", "no record: the process running the test died under it")
    return records
