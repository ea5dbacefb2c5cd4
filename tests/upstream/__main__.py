"""python -m tests.upstream: see the package's docstring."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __doc__ as usage
from . import driver, expectations

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EXPECTED = HERE / "expected.txt"
EMULATION_DIR = HERE.parent / "emulation"
REFERENCE = "stdloop:epoll"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.upstream", description=usage, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loop", action="append", help=f"MODULE:NAME of a loop factory (default {REFERENCE})")
    parser.add_argument("--python", action="append", help="the Python to run the tests on (default this one)")
    parser.add_argument("--expected", type=Path, default=EXPECTED, help="the expectations file")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one test may take (default 30)")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="tests run at once (default 1)")
    parser.add_argument("--only", default="*", help="run the test ids matching this pattern")
    parser.add_argument("--emulate", help="kqueue or devpoll: install that test emulation (tests/emulation)")
    parser.add_argument("--path", action="append", default=[], help="put this first on the tests' PYTHONPATH")
    parser.add_argument("--json", type=Path, help="write every result to this file")
    parser.add_argument("--suggest", action="store_true", help="print expectation lines for the differences")
    parser.add_argument("-v", "--verbose", action="store_true", help="show each difference's traceback")
    args = parser.parse_args(argv)

    try:
        entries = expectations.load(args.expected) if args.expected.exists() else []
        pythons = [driver.resolve_python(name) for name in args.python or [sys.executable]]
    except (ValueError, driver.HarnessError) as exc:
        print(f"tests.upstream: {exc}", file=sys.stderr)
        return 2
    extra = {}
    paths = [*args.path, str(REPO)]
    if args.emulate:
        extra["POLLSERVE_TEST_EMULATE"] = args.emulate
        paths.insert(0, str(EMULATION_DIR))
    env = driver.worker_env(paths, extra)

    runs = []
    for python in pythons:
        for loop in args.loop or [REFERENCE]:
            try:
                run = driver.run(python, loop, entries, env=env, timeout=args.timeout, jobs=args.jobs, only=args.only)
            except driver.HarnessError as exc:
                print(f"tests.upstream: {exc}", file=sys.stderr)
                return 2
            runs.append(run)
            print(driver.report(run, args.verbose), flush=True)
            if args.suggest and run.differences:
                print(driver.suggested_entries(run))
            print()
    if len(runs) > 1:
        print(driver.summary(runs))
    if args.json:
        driver.write_json(runs, args.json)
    if any(run.missing for run in runs):
        return 2
    return 1 if any(run.differences for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
