"""A suite on asyncio's loop and on pollserve's loops, compared test for test.

A test whose outcome on a pollserve loop is not what the expectations say (asyncio's outcome, when
no entry names it) is run twice more on that loop and on asyncio's; the difference counts when on
each of the three runs on pollserve's loop the test ends in a way it never ends on asyncio's, and an
entry holds when the test then ends as it says.  A test that differs on some runs only is "flaky":
listed, not counted.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import expectations, runner
from .expectations import Entry
from .runner import REFERENCE, PytestRun
from .venvs import Prepared

#: the table's columns: outcomes on the run's own loop, and the tests that never reached it
COLUMNS = ("passed", "failed", "skipped", "other-loop")
#: runs of a test before its difference counts
RUNS = 3


@dataclass
class Difference:
    test: str
    #: what was expected on pollserve's loop: asyncio's outcomes, or the entry's
    expected: tuple[str, ...]
    #: the outcome of each run on pollserve's loop, and on asyncio's
    got: list[str]
    reference: list[str]
    verdict: str  # "differs", "flaky", "unexpected pass", "stale"
    detail: str = ""
    entry: Entry | None = None


@dataclass
class LoopResult:
    run: PytestRun
    differences: list[Difference] = field(default_factory=list)
    flaky: list[Difference] = field(default_factory=list)
    held: list[Difference] = field(default_factory=list)

    def counts(self) -> Counter:
        counts: Counter = Counter()
        for record in self.run.records.values():
            if record.outcome in ("passed", "failed") and not runner.on_loop(record, self.run.loop):
                counts["other-loop"] += 1
            else:
                counts[record.outcome] += 1
        return counts


@dataclass
class SuiteResult:
    prepared: Prepared
    reference: LoopResult
    loops: list[LoopResult]


def expected_for(entry: Entry | None, reference: list[str]) -> tuple[str, ...]:
    return entry.outcomes if entry else tuple(dict.fromkeys(reference))


def first_agrees(outcome: str, reference: str, entry: Entry | None) -> bool:
    if entry:
        return outcome in entry.outcomes
    return outcome == reference


def verdict(got: list[str], reference: list[str], entry: Entry | None) -> str:
    """Over the runs: "same", "differs" or "flaky"; with an entry, "held" when every run ends as it
    says (an entry may name asyncio's outcome too, for a test known to end either way), else
    "unexpected pass" when every run ends as on asyncio's loop."""
    if entry and all(outcome in entry.outcomes for outcome in got):
        return "held"
    differs = [outcome not in reference for outcome in got]
    if all(differs):
        return "differs"
    if not any(differs):
        return "unexpected pass" if entry else "same"
    return "flaky"


def compare_suite(
    prepared: Prepared,
    loops: list[str],
    entries: list[Entry],
    *,
    whole: bool,
    progress=print,
    **options,
) -> SuiteResult:
    """Run the suite on asyncio's loop and on each of ``loops``, then rerun what differs."""
    suite = prepared.suite.name
    version = prepared.version
    reference = runner.run(prepared, REFERENCE, **options)
    progress(f"  {suite} on {REFERENCE}: {reference.seconds:.0f} s")
    runs = []
    for loop in loops:
        runs.append(runner.run(prepared, loop, **options))
        progress(f"  {suite} on {loop}: {runs[-1].seconds:.0f} s")

    candidates: dict[str, set[str]] = {}
    for run in runs:
        for test in sorted(set(run.records) | set(reference.records)):
            entry = expectations.find(entries, suite, test, version, run.loop)
            if not first_agrees(run.outcome(test), reference.outcome(test), entry):
                candidates.setdefault(run.loop, set()).add(test)
    reruns: dict[str, list[PytestRun]] = {}
    every = sorted(set().union(*candidates.values())) if candidates else []
    rerun_options = {**options, "jobs": options.get("jobs", 1) if len(every) > 20 else 1}
    for n in range(1, RUNS):
        for loop, tests in [(REFERENCE, every), *((loop, sorted(tests)) for loop, tests in candidates.items())]:
            if tests:
                reruns.setdefault(loop, []).append(
                    runner.run(prepared, loop, only=tests, label=f"-rerun{n}", **rerun_options)
                )
    if every:
        progress(f"  {suite}: {len(every)} tests differed once, run {RUNS - 1} more times on both loops")

    results = []
    for run in runs:
        result = LoopResult(run)
        for test in sorted(candidates.get(run.loop, ())):
            entry = expectations.find(entries, suite, test, version, run.loop)
            got = [run.outcome(test), *(again.outcome(test) for again in reruns.get(run.loop, ()))]
            ref = [reference.outcome(test), *(again.outcome(test) for again in reruns.get(REFERENCE, ()))]
            record = run.records.get(test)
            difference = Difference(
                test, expected_for(entry, ref), got, ref, "", record.detail if record else "", entry
            )
            difference.verdict = verdict(got, ref, entry)
            if difference.verdict in ("differs", "unexpected pass"):
                result.differences.append(difference)
            elif difference.verdict == "flaky":
                result.flaky.append(difference)
            elif difference.verdict == "held":
                result.held.append(difference)
        for test, record in run.records.items():
            entry = expectations.find(entries, suite, test, version, run.loop)
            if entry and test not in candidates.get(run.loop, ()):
                result.held.append(
                    Difference(test, entry.outcomes, [record.outcome], [reference.outcome(test)], "held", "", entry)
                )
        if whole:
            tests = set(run.records) | set(reference.records)
            for entry in expectations.stale(entries, suite, tests, version, run.loop):
                result.differences.append(
                    Difference(entry.test, entry.outcomes, ["absent"], ["absent"], "stale", "", entry)
                )
        results.append(result)
    return SuiteResult(prepared, LoopResult(reference), results)


def table(result: SuiteResult) -> str:
    prepared = result.prepared
    rows = [result.reference, *result.loops]
    width = max(len(row.run.loop) for row in rows)
    lines = [
        f"{prepared.suite.name} {prepared.suite.version} on Python {prepared.version}: "
        f"{len(result.reference.run.records)} tests",
        f"{'loop':<{width}}  " + "  ".join(f"{column:>10}" for column in COLUMNS) + f"  {'seconds':>8}",
    ]
    for row in rows:
        counts = row.counts()
        cells = "  ".join(f"{counts[column]:>10}" for column in COLUMNS)
        lines.append(f"{row.run.loop:<{width}}  {cells}  {row.run.seconds:>8.0f}")
    return "\n".join(lines)


def report(result: SuiteResult, verbose: bool = False) -> str:
    lines = [table(result)]
    for row in result.loops:
        for difference in row.held:
            lines.append(f"  expected ({row.run.loop}): {difference.test}: {difference.entry.reason}")
        for difference in row.flaky:
            lines.append(
                f"  flaky ({row.run.loop}): {difference.test}: {'/'.join(difference.got)} "
                f"(asyncio's: {'/'.join(difference.reference)})"
            )
        for difference in row.differences:
            if difference.verdict == "stale":
                lines.append(f"  DIFFERS ({row.run.loop}): {difference.test}: expectations line "
                             f"{difference.entry.line} names a test the run does not have")  # fmt: skip
                continue
            lines.append(
                f"  DIFFERS ({row.run.loop}): {difference.test}: {difference.verdict}: "
                f"expected {'|'.join(difference.expected)}, got {'/'.join(difference.got)} "
                f"(asyncio's: {'/'.join(difference.reference)})"
            )
            if verbose and difference.detail:
                lines.extend("      " + line for line in difference.detail.rstrip().splitlines()[-15:])
    bad = sum(len(row.differences) for row in result.loops)
    lines.append(f"comparison with the expectations {'holds' if not bad else f'fails: {bad} differences'}")
    return "\n".join(lines)


def suggested_entries(result: SuiteResult) -> str:
    """Expectation lines for the differences, for a person to check and give a reason."""
    lines = []
    version = ".".join(result.prepared.version.split(".")[:2])
    for row in result.loops:
        for difference in row.differences:
            if difference.verdict != "differs":
                continue
            last = difference.detail.strip().splitlines()[-1] if difference.detail.strip() else ""
            outcomes = "|".join(dict.fromkeys(difference.got))
            lines.append(
                f"{result.prepared.suite.name}  {difference.test}  {version}  {row.run.loop}  {outcomes}  "
                f"pollserve: {last[:100]}"
            )
    return "\n".join(lines)


def write_json(results: list[SuiteResult], path: Path) -> None:
    def encode_row(row: LoopResult) -> dict:
        return {
            "loop": row.run.loop,
            "seconds": round(row.run.seconds, 1),
            "counts": dict(row.counts()),
            "records": [vars(record) for record in row.run.records.values()],
            "differences": [
                {**vars(d), "entry": d.entry.line if d.entry else None} for d in [*row.differences, *row.flaky]
            ],
        }

    path.write_text(
        json.dumps(
            [
                {
                    "suite": result.prepared.suite.name,
                    "version": result.prepared.suite.version,
                    "python": result.prepared.version,
                    "runs": [encode_row(row) for row in (result.reference, *result.loops)],
                }
                for result in results
            ],
            indent=1,
        )
    )
