"""The expectations file: which upstream tests are known not to pass, where, and why.

One entry a line, fields separated by spaces, ``#`` starts a comment line::

    TEST_ID  PYTHONS  LOOPS  OUTCOME  KIND: REASON

- TEST_ID: ``test_events.EventLoopTestsMixin.test_create_ssl_connection`` (as the report names it);
- PYTHONS: ``*`` or a comma list of versions (``3.10,3.11``);
- LOOPS: a comma list of patterns over the factory (``pollserve.loops:*``, ``*:select``);
- OUTCOME: ``failed``, ``timeout``, ``skipped`` or ``other-loop``, or alternatives joined by ``|``
  for a test that ends either way;
- KIND: ``internals`` (the test reaches into the standard loop's internals), ``later`` (TLS, pipes or
  subprocesses, which a later part brings), ``todo`` (a method the loop does not have yet), ``bug``
  (ours, to fix) or ``platform`` (the OS or a test emulation).

A test no entry matches must pass or be skipped by CPython itself.  The comparison is strict: an
entry whose test passes, or names a test the run does not have, is a difference too.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

OUTCOMES = ("passed", "failed", "skipped", "timeout", "other-loop")
KINDS = ("internals", "later", "todo", "bug", "platform")
#: what a test no entry names may do
FINE = ("passed", "skipped")


@dataclass(frozen=True)
class Entry:
    test: str
    pythons: tuple[str, ...]  # () for every Python
    loops: tuple[str, ...]
    outcomes: tuple[str, ...]
    reason: str
    line: int

    def applies(self, test: str, python: str, loop: str) -> bool:
        if test != self.test:
            return False
        if self.pythons and not any(python == v or python.startswith(v + ".") for v in self.pythons):
            return False
        return any(fnmatch.fnmatchcase(loop, pattern) for pattern in self.loops)


def parse(text: str, source: str = "expectations") -> list[Entry]:
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 4)
        where = f"{source}:{number}"
        if len(fields) < 5:
            raise ValueError(f"{where}: expected TEST_ID PYTHONS LOOPS OUTCOME KIND: REASON")
        test, pythons, loops, outcomes, reason = fields
        bad = [o for o in outcomes.split("|") if o not in OUTCOMES or o == "passed"]
        if bad:
            raise ValueError(f"{where}: outcome {bad[0]!r} is not one of {', '.join(OUTCOMES[1:])}")
        kind, colon, why = reason.partition(":")
        if not colon or kind not in KINDS or not why.strip():
            raise ValueError(f"{where}: the reason starts with one of {', '.join(KINDS)}, a colon and a sentence")
        entries.append(
            Entry(
                test,
                () if pythons == "*" else tuple(pythons.split(",")),
                tuple(loops.split(",")),
                tuple(outcomes.split("|")),
                reason,
                number,
            )
        )
    return entries


def load(path: Path) -> list[Entry]:
    return parse(path.read_text(), str(path))


def find(entries: list[Entry], test: str, python: str, loop: str) -> Entry | None:
    """The entry for this test on this Python and loop; two would be ambiguous."""
    found = [entry for entry in entries if entry.applies(test, python, loop)]
    if len(found) > 1:
        lines = ", ".join(str(entry.line) for entry in found)
        raise ValueError(f"{test} on {python} {loop}: entries on lines {lines} all apply")
    return found[0] if found else None


def expected_outcomes(entries: list[Entry], test: str, python: str, loop: str) -> tuple[str, ...]:
    entry = find(entries, test, python, loop)
    return entry.outcomes if entry else FINE


def stale(entries: list[Entry], tests: set[str], python: str, loop: str) -> list[Entry]:
    """Entries for this Python and loop that name a test the run does not have."""
    return [entry for entry in entries if entry.test not in tests and entry.applies(entry.test, python, loop)]
