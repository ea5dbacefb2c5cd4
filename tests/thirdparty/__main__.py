"""python -m tests.thirdparty: see the package's docstring."""

from __future__ import annotations

import argparse
import select
import sys
import time
from pathlib import Path

from ..upstream.driver import resolve_python
from . import __doc__ as usage
from . import compare, expectations, venvs
from .suites import SUITES
from .venvs import HarnessError, IndexUnreachable

#: the pollserve loop a run uses when none is asked for
DEFAULT_LOOP = "pollserve.loops:epoll" if hasattr(select, "epoll") else "pollserve.loops:new_event_loop"


def default_pollserve(python: str) -> Path:
    """The build this Python imports, when the suites run on this Python's version; else the tree."""
    import pollserve

    here = ".".join(map(str, sys.version_info[:3]))
    if venvs.python_version(python) == here:
        return Path(pollserve.__file__).resolve().parent.parent
    return venvs.REPO


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.thirdparty", description=usage, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", action="append", choices=sorted(SUITES), help="a suite (default: all)")
    parser.add_argument("--loop", action="append", help=f"MODULE:NAME of a pollserve loop factory ({DEFAULT_LOOP})")
    parser.add_argument("--python", action="append", help="the Python to run the suites on (default this one)")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="pytest-xdist workers per run (default 1)")
    parser.add_argument("--tests", action="append", help="run these paths of the suite instead of all its tests")
    parser.add_argument("--timeout", type=float, help="seconds one test may take (default: the suite's, else 60)")
    parser.add_argument("--pollserve", type=Path, help="the folder whose pollserve the suites import")
    parser.add_argument("--emulate", help="kqueue or devpoll: install that test emulation (tests/emulation)")
    parser.add_argument("--expected", type=Path, default=expectations.EXPECTED, help="the expectations file")
    parser.add_argument("--json", type=Path, help="write every result to this file")
    parser.add_argument("--suggest", action="store_true", help="print expectation lines for the differences")
    parser.add_argument("-v", "--verbose", action="store_true", help="show each difference's traceback")
    args = parser.parse_args(argv)

    try:
        entries = expectations.load(args.expected) if args.expected.exists() else []
        pythons = [resolve_python(name) for name in args.python or [sys.executable]]
    except Exception as exc:
        print(f"tests.thirdparty: {exc}", file=sys.stderr)
        return 2
    results = []
    started = time.monotonic()
    for python in pythons:
        pollserve = args.pollserve or default_pollserve(python)
        for name in args.suite or list(SUITES):
            suite = SUITES[name]
            try:
                prepared = venvs.prepare(suite, python)
                print(
                    f"{name} {suite.version} on {python} ({prepared.version}), pollserve from {pollserve}", flush=True
                )
                result = compare.compare_suite(
                    prepared,
                    args.loop or [DEFAULT_LOOP],
                    entries,
                    whole=not args.tests,
                    progress=lambda line: print(line, flush=True),
                    pollserve=venvs.pollserve_path(pollserve),
                    jobs=args.jobs,
                    timeout=args.timeout,
                    tests=args.tests,
                    emulate=args.emulate,
                )
            except IndexUnreachable as exc:
                print(f"tests.thirdparty: {name}: {exc}", file=sys.stderr)
                return 2
            except HarnessError as exc:
                print(f"tests.thirdparty: {name}: {exc}", file=sys.stderr)
                return 2
            results.append(result)
            print(compare.report(result, args.verbose), flush=True)
            if args.suggest:
                lines = compare.suggested_entries(result)
                if lines:
                    print(lines)
            print()
    if len(results) > 1:
        print(summary(results))
    print(f"tests.thirdparty: {time.monotonic() - started:.0f} s in all")
    if args.json:
        compare.write_json(results, args.json)
    return 1 if any(row.differences for result in results for row in result.loops) else 0


def summary(results: list[compare.SuiteResult]) -> str:
    """One line per suite, Python and loop: the counts, the wall time and the verdict."""
    columns = "  ".join(f"{column:>10}" for column in compare.COLUMNS)
    lines = [f"{'suite':<8}  {'python':<7}  {'loop':<28}  {columns}  {'seconds':>8}  comparison"]
    for result in results:
        for row in (result.reference, *result.loops):
            counts = row.counts()
            cells = "  ".join(f"{counts[column]:>10}" for column in compare.COLUMNS)
            verdict = f"{len(row.differences)} differences" if row.differences else "holds"
            if row is result.reference:
                verdict = "(the reference)"
            lines.append(
                f"{result.prepared.suite.name:<8}  {result.prepared.version:<7}  {row.run.loop:<28}  {cells}  "
                f"{row.run.seconds:>8.0f}  {verdict}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
