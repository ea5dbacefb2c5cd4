"""The expectations file: each test whose outcome on pollserve's loop differs from asyncio's, and why.

One entry a line, fields separated by two spaces or more (a test id may hold single spaces), ``#``
starts a comment line::

    SUITE  TEST_ID  PYTHONS  LOOPS  OUTCOME  KIND: REASON

- SUITE: ``uvicorn``, ``anyio`` or ``aiohttp``;
- TEST_ID: the pytest node id, as the report names it;
- PYTHONS: ``*`` or a comma list of versions (``3.10,3.11``);
- LOOPS: a comma list of patterns over the factory (``pollserve.loops:*``, ``*:select``);
- OUTCOME: what the test does on those loops, where asyncio's loop gives another: ``passed``,
  ``failed``, ``skipped`` or ``absent``, or alternatives joined by ``|`` (naming asyncio's outcome
  among them marks a test known to end either way there);
- KIND: ``pollserve`` (pollserve's loop, to fix), ``internals`` (the test reaches into asyncio's own
  loop), ``suite`` (the test itself: it asserts which loop runs it, or races) or ``platform`` (the OS
  or a test emulation).

A test no entry names must end as it ends on asyncio's loop.  The comparison is strict: an entry
whose test ends as on asyncio's loop, or names a test the run does not have, is a difference too.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

#: the expectations file the harness and tests/test_thirdparty.py read
EXPECTED = Path(__file__).resolve().parent / "expected.txt"
OUTCOMES = ("passed", "failed", "skipped", "absent")
KINDS = ("pollserve", "internals", "suite", "platform")


@dataclass(frozen=True)
class Entry:
    suite: str
    test: str
    pythons: tuple[str, ...]  # () for every Python
    loops: tuple[str, ...]
    outcomes: tuple[str, ...]
    reason: str
    line: int

    def applies(self, suite: str, python: str, loop: str) -> bool:
        if suite != self.suite:
            return False
        if self.pythons and not any(python == v or python.startswith(v + ".") for v in self.pythons):
            return False
        return any(fnmatch.fnmatchcase(loop, pattern) for pattern in self.loops)


def parse(text: str, source: str = "expectations") -> list[Entry]:
    entries = []
    seen: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = re.split(r"\s{2,}", line, maxsplit=5)
        where = f"{source}:{number}"
        if len(fields) < 6:
            raise ValueError(f"{where}: expected SUITE TEST_ID PYTHONS LOOPS OUTCOME KIND: REASON")
        suite, test, pythons, loops, outcomes, reason = fields
        bad = [o for o in outcomes.split("|") if o not in OUTCOMES]
        if bad:
            raise ValueError(f"{where}: outcome {bad[0]!r} is not one of {', '.join(OUTCOMES)}")
        kind, colon, why = reason.partition(":")
        if not colon or kind not in KINDS or not why.strip():
            raise ValueError(f"{where}: the reason starts with one of {', '.join(KINDS)}, a colon and a sentence")
        entry = Entry(
            suite,
            test,
            () if pythons == "*" else tuple(pythons.split(",")),
            tuple(loops.split(",")),
            tuple(outcomes.split("|")),
            reason,
            number,
        )
        key = (entry.suite, entry.test, entry.pythons, entry.loops)
        if key in seen:
            raise ValueError(f"{where}: the same test, Pythons and loops as line {seen[key]}")
        seen[key] = number
        entries.append(entry)
    return entries


def load(path: Path) -> list[Entry]:
    return parse(path.read_text(), str(path))


def find(entries: list[Entry], suite: str, test: str, python: str, loop: str) -> Entry | None:
    """The entry for this test on this Python and loop; two would be ambiguous."""
    found = [entry for entry in entries if entry.test == test and entry.applies(suite, python, loop)]
    if len(found) > 1:
        lines = ", ".join(str(entry.line) for entry in found)
        raise ValueError(f"{suite} {test} on {python} {loop}: entries on lines {lines} all apply")
    return found[0] if found else None


def stale(entries: list[Entry], suite: str, tests: set[str], python: str, loop: str) -> list[Entry]:
    """Entries for this suite, Python and loop that name a test the run does not have."""
    return [entry for entry in entries if entry.test not in tests and entry.applies(suite, python, loop)]
