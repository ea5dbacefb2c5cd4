"""The fd budget: how many connections this process can hold, planned at start.

Shells and service managers often start a process with a soft RLIMIT_NOFILE of
1024 while the hard limit is far higher (systemd: 1024 / 524288), so a server
that keeps the limit it was given fails at about a thousand clients.  At start
pollserve raises its soft limit (to ``--max-fds``, by default the hard limit),
then counts what it already uses and keeps a reserve for what it will need
besides connections: the stats endpoint's connections, psutil's reads of
``/proc``, the fd a refused client briefly takes.  What is left is the default
connection limit, so the server refuses clients cleanly *before* accept() can
fail with EMFILE.  With the select backend the budget also stays below
FD_SETSIZE.
"""

from __future__ import annotations

import dataclasses
import sys

try:
    import resource
except ImportError:  # Windows: no RLIMIT_NOFILE
    resource = None  # type: ignore[assignment]

#: the soft limit asked for when the hard limit is unlimited
UNLIMITED_TARGET = 65536
#: macOS refuses a soft limit above OPEN_MAX (10240) when the hard limit is unlimited (getrlimit(2) macOS)
MACOS_OPEN_MAX = 10240
#: fds kept free beyond the ones counted at start and the stats endpoint's: psutil's /proc reads,
#: a refused client's fd until it is closed, a log file being rotated, the kqueue/devpoll probe
SPARE_FDS = 16


class LimitError(Exception):
    """A limit asked for that cannot be had; the message is meant for the user as it is."""


def _finite(value: int) -> int | None:
    return None if resource is None or value == resource.RLIM_INFINITY or value < 0 else value


def nofile_limits() -> tuple[int | None, int | None]:
    """(soft, hard) RLIMIT_NOFILE; None for unlimited, or where the OS has no such limit."""
    if resource is None:
        return None, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _finite(soft), _finite(hard)


@dataclasses.dataclass(frozen=True)
class FdLimit:
    """What the soft limit was, what it is now, and why."""

    before: int | None
    soft: int | None
    hard: int | None
    #: set when the limit could not be raised as far as asked
    note: str = ""


def set_fd_limit(max_fds: int | None = None) -> FdLimit:
    """Raise (or, when asked, lower) the soft RLIMIT_NOFILE; raise LimitError for an impossible ask.

    Call it before creating the backend: /dev/poll sizes itself from the limit
    at creation (CPython docs, select.devpoll).
    """
    if resource is None:
        if max_fds is not None:
            raise LimitError("--max-fds needs RLIMIT_NOFILE, which this OS does not have")
        return FdLimit(None, None, None)
    raw_soft, raw_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = _finite(raw_soft), _finite(raw_hard)
    if max_fds is not None and hard is not None and max_fds > hard:
        raise LimitError(
            f"--max-fds {max_fds} is above the hard fd limit {hard}; raise the hard limit first "
            "(ulimit -Hn as root, or LimitNOFILE= under systemd)"
        )
    if max_fds is None:
        target = hard if hard is not None else UNLIMITED_TARGET
        # A finite soft limit is never lowered unasked.  An unlimited one (macOS and the BSDs allow
        # it) is brought down to the target: the connection budget needs a number to plan with.
        if soft is not None and soft >= target:
            return FdLimit(soft, soft, hard)
    else:
        target = max_fds
        if target == soft:
            return FdLimit(soft, soft, hard)
    candidates = [target]
    if sys.platform == "darwin" and target > MACOS_OPEN_MAX and hard is None:
        candidates.append(MACOS_OPEN_MAX)
    failure = ""
    for candidate in candidates:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (candidate, raw_hard))
        except (ValueError, OSError) as exc:
            failure = str(exc)
            continue
        note = "" if candidate == target else f"asked for {target}, the OS allowed {candidate}"
        return FdLimit(soft, candidate, hard, note)
    if max_fds is not None:
        raise LimitError(f"cannot set the fd limit to {max_fds}: {failure}")
    return FdLimit(soft, soft, hard, f"could not raise it to {target}: {failure}")


@dataclasses.dataclass(frozen=True)
class Budget:
    """How many app connections fit, and what bounds them."""

    #: the connection limit: what the fds allow after the reserve (None: no limit known)
    connections: int | None
    #: fds kept out of the connections' reach
    reserve: int
    #: "the fd limit", or "FD_SETSIZE" when the select backend's bound is the tighter one
    bound: str


def connection_budget(fd_limit: int | None, fds_in_use: int, extra_reserve: int, capacity: int | None) -> Budget:
    """Connections that fit once the fds in use and the reserve are set aside.

    capacity is the backend's bound on fd numbers (select's FD_SETSIZE), or None.
    fds are numbered lowest-free-first, so while fewer than ``capacity`` are
    open every new one is below it.
    """
    reserve = fds_in_use + extra_reserve + SPARE_FDS
    bounds = []
    if fd_limit is not None:
        bounds.append((fd_limit - reserve, "the fd limit"))
    if capacity is not None:
        bounds.append((capacity - reserve, f"FD_SETSIZE ({capacity}) of the select backend"))
    if not bounds:
        return Budget(None, reserve, "")
    connections, bound = min(bounds)
    return Budget(max(0, connections), reserve, bound)
