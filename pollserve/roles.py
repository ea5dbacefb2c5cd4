"""The process roles, and what each signal means in each: one declared table.

A pollserve process has one of three roles: the single server (``--workers 1``), the supervising
parent of ``--workers N``, or one of its workers.  ``SIGNALS`` says, for every signal pollserve
handles, what it does in each role; every role installs its handlers from it (``install``) and
nothing else, and the README's signal table is this table (``markdown_table``; tests/test_roles.py
checks both, and drives every pair on a live process).  A role a signal has no entry for leaves it
at its default action.  gunicorn's Arbiter.SIGNALS and Worker.init_signals are the same idea; here
the handlers run in the loop (``EventLoop.add_signal_handler``), between two passes.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .loop import EventLoop


class Role(enum.Enum):
    """What a pollserve process is; the value is the README table's column heading."""

    SINGLE = "single server"
    PARENT = "`--workers` parent"
    WORKER = "worker"


class Action(enum.Enum):
    """What a role does with a signal; each role maps every action of its column to a method."""

    #: drain and exit 0 (a second one: close now), each role in its own way
    STOP = "stop"
    #: the single server reloads its certificate; the parent rolls its workers over
    RELOAD = "reload"
    #: log one stats line
    LOG_STATS = "log stats"
    #: collect the workers that have exited
    REAP = "reap"
    #: SIG_IGN, from the start of the process
    IGNORE = "ignore"


class Meaning(NamedTuple):
    action: Action
    #: what the signal does in the role, in the README's words
    effect: str


STOP = "after `--drain-delay`, stop accepting, flush within `--shutdown-timeout`, exit 0; a second one: at once"
PARENT_STOP = "stop every worker as a single server stops, exit 0; a second one: at once"

#: every signal pollserve handles, and what it means in each role
SIGNALS: dict[str, dict[Role, Meaning]] = {
    "SIGINT": {
        Role.SINGLE: Meaning(Action.STOP, STOP),
        Role.PARENT: Meaning(Action.STOP, PARENT_STOP),
        Role.WORKER: Meaning(
            Action.IGNORE, "ignored: a Ctrl-C reaches the whole group, and counts once, in the parent"
        ),
    },
    "SIGTERM": {
        Role.SINGLE: Meaning(Action.STOP, STOP),
        Role.PARENT: Meaning(Action.STOP, PARENT_STOP),
        Role.WORKER: Meaning(
            Action.STOP, "stop as a single server does; a further one changes nothing, even on its way out"
        ),
    },
    "SIGHUP": {
        Role.SINGLE: Meaning(
            Action.RELOAD, "reload the `--tls-cert` files (without them, log that there is nothing to)"
        ),
        Role.PARENT: Meaning(Action.RELOAD, "rolling restart: each worker is replaced by one of a new generation"),
        Role.WORKER: Meaning(Action.IGNORE, "ignored: the parent's rolling restart replaces the worker"),
    },
    "SIGUSR1": {
        Role.SINGLE: Meaning(Action.LOG_STATS, "log the stats line once"),
        Role.PARENT: Meaning(Action.LOG_STATS, "log the whole server's stats line once: the workers' figures summed"),
        Role.WORKER: Meaning(Action.LOG_STATS, "log this worker's own stats line once"),
    },
    "SIGCHLD": {
        Role.PARENT: Meaning(Action.REAP, "collect the workers that have exited; their replacements start"),
    },
}


def signals_of(role: Role) -> dict[signal.Signals, Meaning]:
    """The role's column of SIGNALS, for the signals this OS has (Windows lacks SIGHUP, SIGUSR1
    and SIGCHLD: signal(2) there knows six)."""
    column: dict[signal.Signals, Meaning] = {}
    for name, row in SIGNALS.items():
        signum = getattr(signal.Signals, name, None)
        if signum is not None and role in row:
            column[signum] = row[role]
    return column


def ignore_from_the_start(role: Role) -> None:
    """SIG_IGN for the signals the role ignores: called before anything else the process does, so
    that such a signal during the app's import neither kills nor interrupts it."""
    for signum, meaning in signals_of(role).items():
        if meaning.action is Action.IGNORE:
            signal.signal(signum, signal.SIG_IGN)


def install(loop: EventLoop, role: Role, handlers: Mapping[Action, Callable[[str], Any]]) -> None:
    """The role's signal table on the loop: each handler runs in the loop with the signal's name.
    ``handlers`` must have every action of the role's column but IGNORE (a KeyError otherwise).
    Installed through the core loop's own call, also when the loop is its asyncio face (an
    ``async def`` app's), whose ``add_signal_handler`` Windows lacks as asyncio's loops do there."""
    ignore_from_the_start(role)
    for signum, meaning in signals_of(role).items():
        if meaning.action is not Action.IGNORE:
            EventLoop.add_signal_handler(loop, signum, handlers[meaning.action], signum.name)


def markdown_table() -> str:
    """SIGNALS as the README shows it: a row per signal, a column per role, ``default`` where the
    role leaves the signal at its default action."""
    roles = list(Role)
    lines = [
        "| signal | " + " | ".join(role.value for role in roles) + " |",
        "|---" * (len(roles) + 1) + "|",
    ]
    for name, row in SIGNALS.items():
        cells = [row[role].effect if role in row else "default action" for role in roles]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
