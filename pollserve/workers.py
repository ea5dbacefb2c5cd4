"""``--workers N``: a parent that supervises N worker processes, each a whole pollserve server.

The parent binds the listening sockets once and holds them for its whole life; each worker is
a fresh interpreter (``python -m pollserve`` with the same arguments) that inherits them, so a
worker that dies or is replaced never closes a listener and no queued connection is reset
(gunicorn's and nginx's model).  With ``--reuse-port`` each worker binds its own SO_REUSEPORT
listener instead and the parent only holds the port.  A fresh interpreter rather than fork():
a rolling restart (SIGHUP) imports the app afresh, so new code is picked up.

Parent and worker talk over a socketpair, one JSON object per line.  The worker says
``ready`` once it accepts, then sends its stats snapshot every second (its heartbeat: a worker
silent for --worker-timeout is killed and replaced), or ``failed`` with the reason if it cannot
start; the parent sends ``retire`` to a worker whose successor is ready, and ``close`` when told
twice to stop.  A worker whose channel reaches EOF has lost its parent and shuts down, so no
worker outlives the parent, even one killed with SIGKILL.

Signals (pollserve.roles declares what each means in the parent and in a worker): SIGINT/SIGTERM
to the parent stop every worker as a single server stops (drain, then exit) and the parent exits 0
once all are gone; a second one to the parent means "close now", which the parent orders over the
channels.  A worker drains on any SIGTERM and counts it once, however many arrive, even on its way
out: systemd's KillMode=control-group and ``kill -TERM -PGID`` reach every process, and the parent
relays the same signal.  Workers ignore SIGINT (a Ctrl-C reaches the whole process group and counts
once, through the parent) and SIGHUP, the parent's rolling restart.  Each worker's life is a
WorkerState, changed in one place (Supervisor._enter), with one deadline whatever the state.  The
loop and the server know nothing of processes: this module and the roles in service.py do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil

from . import compiled
from .loop import EventLoop, Handle
from .rates import EpisodeLog
from .stats import Snapshot, count_fds, log_line, prometheus_page, usage

log = logging.getLogger("pollserve")

#: the environment variable that makes ``python -m pollserve`` a worker: INDEX:CHANNEL_FD:LISTEN_FDS
WORKER_ENV = "POLLSERVE_WORKER"
#: how often a worker sends its snapshot
REPORT_INTERVAL = 1.0
#: a worker that dies sooner than this after starting counts as failing: restarts back off
HEALTHY_AFTER = 5.0
#: restart delays: first, doubled per failure in a row, at most
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
#: a channel whose peer does not read is not buffered past this: snapshots are dropped
MAX_CHANNEL_BUFFER = 256 * 1024
#: workers starting at once: imports are CPU-bound, so more than a few only slow each other, and
#: the parent must stay free to handle a stop signal during start-up
STARTING_AT_ONCE = 4
#: --worker-timeout's default (gunicorn's --timeout); 0 turns the check off
DEFAULT_WORKER_TIMEOUT = 30.0
#: --worker-start-timeout's default: an import and a bind take seconds, not minutes; 0: off
DEFAULT_WORKER_START_TIMEOUT = 60.0
#: how often the parent looks for silent workers
LIVENESS_INTERVAL = 0.5
#: a worker silent this long is shown as stale in /stats, /metrics and the dashboard
STALE_AFTER = 3 * REPORT_INTERVAL


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """What makes a process a worker: its index, its channel to the parent, the inherited listeners."""

    index: int
    channel_fd: int
    listen_fds: tuple[int, ...]

    def to_env(self) -> str:
        return f"{self.index}:{self.channel_fd}:{','.join(map(str, self.listen_fds))}"

    @classmethod
    def from_env(cls, value: str) -> WorkerRole:
        """Parse WORKER_ENV; ValueError if it is not INDEX:FD:FD,FD..."""
        index, channel, fds = value.split(":")
        return cls(int(index), int(channel), tuple(int(fd) for fd in fds.split(",") if fd))

    def keep_to_self(self) -> None:
        """Make the inherited listeners and channel close-on-exec again, as sd_listen_fds(3) has it
        for systemd's sockets: the parent passed them inheritable (``pass_fds``), but they are this
        worker's, not for the programs its app runs (os.system, a subprocess with close_fds=False),
        which would hold the port and the channel after the server stops.  A child made by fork()
        without exec (multiprocessing's "fork" start method) still holds them: fork copies every fd."""
        for fd in (self.channel_fd, *self.listen_fds):
            with contextlib.suppress(OSError):  # not open: serving on it fails where it is used, with a message
                os.set_inheritable(fd, False)


def auto_count() -> int:
    """``--workers auto``: the CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


#: what one worker is planned to take in memory: the resident size (RSS) of a worker of the
#: built-in app holding 500 connections, 27.3 MiB on CPython 3.11 (USS 16.7 MiB: the rest is shared
#: with the parent), rounded up; an app's own memory comes on top.  benchmarks/worker_footprint.py
#: measures it.
WORKER_FOOTPRINT = 32 << 20
#: above this, a cgroup memory limit means "none" (cgroup v1 writes a page-rounded 2**63 - 1)
NO_MEMORY_LIMIT = 1 << 60
_MIB = 1 << 20


def cgroup_memory_left() -> tuple[int, str] | None:
    """(bytes left, where) under this process's cgroup memory limit, or None where none is set:
    memory.max - memory.current (cgroup v2), or memory.limit_in_bytes - memory.usage_in_bytes (v1)."""
    try:
        with open("/proc/self/cgroup") as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    candidates: list[tuple[str, str, str]] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = "/sys/fs/cgroup"
            candidates += [(f"{base}{path}", "memory.max", "memory.current"), (base, "memory.max", "memory.current")]
        elif "memory" in controllers.split(","):
            base = "/sys/fs/cgroup/memory"
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
            candidates += [(f"{base}{path}", *names), (base, *names)]
    for folder, limit_name, used_name in candidates:
        try:
            with open(f"{folder}/{limit_name}") as file:
                limit_text = file.read().strip()
            with open(f"{folder}/{used_name}") as file:
                used = int(file.read().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or int(limit_text) >= NO_MEMORY_LIMIT:
            return None
        return max(0, int(limit_text) - used), f"cgroup {limit_name} {int(limit_text) // _MIB} MiB"
    return None


def capacity_problem(count: int) -> str | None:
    """Why this machine cannot hold count workers, in one line with the numbers, or None: memory
    (the cgroup's limit where one is set, else the machine's available memory) at WORKER_FOOTPRINT
    each, and RLIMIT_NPROC where it applies (not to root)."""
    available = psutil.virtual_memory().available
    where = "available memory"
    cgroup = cgroup_memory_left()
    if cgroup is not None and cgroup[0] < available:
        available, where = cgroup[0], f"left under the {cgroup[1]}"
    holds = available // WORKER_FOOTPRINT
    if count > holds:
        return (
            f"--workers {count} needs about {count * WORKER_FOOTPRINT // _MIB} MiB at "
            f"{WORKER_FOOTPRINT // _MIB} MiB per worker, but {available // _MIB} MiB is {where}: "
            f"at most {holds} workers fit"
        )
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        try:
            import resource
        except ImportError:
            return None
        soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
        if soft != resource.RLIM_INFINITY:
            uid = os.getuid()
            in_use = 0  # RLIMIT_NPROC counts the user's threads (setrlimit(2) on Linux)
            for process in psutil.process_iter(["uids", "num_threads"]):
                uids = process.info["uids"]
                if uids is not None and uids.real == uid:
                    in_use += process.info["num_threads"] or 1
            if count > soft - in_use:
                return (
                    f"--workers {count} needs {count} more processes, but RLIMIT_NPROC is {soft} "
                    f"and this user runs {in_use} already: at most {max(0, soft - in_use)} workers fit"
                )
    return None


class Channel:
    """One end of a parent-worker socketpair on a loop: JSON objects, one per line, both ways."""

    def __init__(
        self,
        loop: EventLoop,
        sock: socket.socket,
        on_message: Callable[[dict[str, Any]], Any],
        on_closed: Callable[[], Any],
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.on_message = on_message
        self.on_closed = on_closed
        self._incoming = bytearray()
        self._outgoing = bytearray()
        self._closed = False
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_readable)

    def send(self, message: dict[str, Any], *, droppable: bool = False) -> None:
        """Queue one message; a droppable one (a snapshot) is dropped if the peer is not reading."""
        if self._closed or (droppable and len(self._outgoing) > MAX_CHANNEL_BUFFER):
            return
        was_empty = not self._outgoing
        self._outgoing += json.dumps(message, separators=(",", ":")).encode() + b"\n"
        if was_empty:
            self._flush()

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self._outgoing)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        del self._outgoing[:sent]
        if self._outgoing:
            if not self.loop.has_writer(self.sock.fileno()):
                self.loop.add_writer(self.sock.fileno(), self._flush)
        elif self.loop.has_writer(self.sock.fileno()):
            self.loop.remove_writer(self.sock.fileno())

    def drain(self) -> None:
        """Read whatever the peer has sent so far, up to EOF if it exited: its last snapshot may
        arrive in the same loop iteration as SIGCHLD, and must not be lost with the closed channel;
        and its reports must be read before anyone judges it silent."""
        while not self._closed and self._on_readable():
            pass

    def _on_readable(self) -> bool:
        """Read once; True if there may be more to read."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if not data:
            self.close()
            return False
        self._incoming += data
        while (end := self._incoming.find(b"\n")) >= 0:
            line = bytes(self._incoming[:end])
            del self._incoming[: end + 1]
            try:
                message = json.loads(line)
            except ValueError:
                log.warning("worker channel: a line that is not JSON was dropped")
                continue
            if isinstance(message, dict):
                self.on_message(message)
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        fd = self.sock.fileno()
        self.loop.remove_reader(fd)
        self.loop.remove_writer(fd)
        self.sock.close()
        self.on_closed()


class WorkerLink:
    """A worker's end of the channel: it says ready, reports its snapshot every second -- the
    heartbeat, sent by a timer of the worker's own loop, so a blocked loop falls silent -- and
    takes the parent's orders: ``retire`` (a successor is ready) and ``close`` (the parent was told
    twice to stop).  The channel's EOF means the parent is gone."""

    def __init__(
        self,
        loop: EventLoop,
        role: WorkerRole,
        snapshot: Callable[[], Any],
        *,
        retire: Callable[[], Any],
        close_now: Callable[[], Any],
        parent_gone: Callable[[], Any],
    ) -> None:
        self.loop = loop
        self.role = role
        self.snapshot = snapshot
        self.retire = retire
        self.close_now = close_now
        self.parent_gone = parent_gone
        self._closing = False
        self._timer: Handle | None = None
        sock = socket.socket(fileno=role.channel_fd)
        self.channel = Channel(loop, sock, self._on_message, self._on_closed)

    def ready(self) -> None:
        """Serving now: tell the parent, and start reporting."""
        self.channel.send({"type": "ready", "pid": os.getpid()})
        self._report()

    def _report(self) -> None:
        self.channel.send({"type": "stats", "snapshot": self.snapshot().to_dict()}, droppable=True)
        self._timer = self.loop.call_later(REPORT_INTERVAL, self._report)

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "retire":
            log.info("retiring: no longer accepting; the open connections may finish")
            self.retire()
        elif kind == "close":
            self.close_now()

    def _on_closed(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._closing:
            self.parent_gone()

    def close(self) -> None:
        """The worker is done: a last snapshot, so the parent's totals stay exact, then EOF."""
        if self._closing:
            return
        self._closing = True
        self.channel.send({"type": "stats", "snapshot": self.snapshot().to_dict()})
        self.channel.close()


def tell_parent_failed(role: WorkerRole, reason: str) -> None:
    """A worker that cannot start (its app does not import) says why before it exits, so the
    parent's one ERROR line about the failed reload can name the cause."""
    try:
        with socket.socket(fileno=role.channel_fd) as sock:
            sock.settimeout(1.0)
            sock.sendall(json.dumps({"type": "failed", "reason": reason}).encode() + b"\n")
    except OSError:
        pass  # the parent is gone or not reading: the exit status still says it failed


def signal_name(number: int) -> str:
    """SIGTERM for 15; a real-time signal, which has no name of its own in ``signal.Signals``, as
    ``kill -l`` writes it (SIGRTMIN+1 for 35 on Linux); else ``signal N``."""
    try:
        return signal.Signals(number).name
    except ValueError:
        pass
    low, high = getattr(signal, "SIGRTMIN", None), getattr(signal, "SIGRTMAX", None)
    if low is not None and high is not None and low < number < high:
        return f"SIGRTMIN+{number - low}"
    return f"signal {number}"


def describe_exit(returncode: int) -> str:
    """``exit 0``, or ``killed by SIGKILL``, from a Popen returncode (negative: the signal)."""
    return f"exit {returncode}" if returncode >= 0 else f"killed by {signal_name(-returncode)}"


class WorkerStartError(Exception):
    """The workers cannot start at all (a configuration error each would meet); the message is for the user."""


class WorkerState(enum.Enum):
    """Where one worker process is in its life.  It only ever moves along TRANSITIONS."""

    #: started, not yet accepting: importing the app, binding, until its ``ready`` message
    STARTING = "starting"
    #: said ``ready``: accepting clients
    SERVING = "serving"
    #: told to go (its successor is ready, the server stops, or its generation was superseded
    #: before it was ready): it accepts no more, finishes its clients and exits
    RETIRING = "retiring"
    #: gone after it was told to go
    EXITED = "exited"
    #: gone without being told to: a crash, an app that does not import, a kill, a timeout
    FAILED = "failed"


#: every move a worker's state can make; Supervisor._enter refuses the others
TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset({WorkerState.SERVING, WorkerState.RETIRING, WorkerState.FAILED}),
    WorkerState.SERVING: frozenset({WorkerState.RETIRING, WorkerState.FAILED}),
    WorkerState.RETIRING: frozenset({WorkerState.EXITED}),
    WorkerState.EXITED: frozenset(),
    WorkerState.FAILED: frozenset(),
}
#: the states of a worker whose process may still run
ALIVE = (WorkerState.STARTING, WorkerState.SERVING, WorkerState.RETIRING)


@dataclasses.dataclass(frozen=True)
class Deadline:
    """When the parent kills a worker process that has not moved on, and what it says then."""

    #: monotonic
    at: float
    #: the start of the wait that the warning counts (monotonic)
    since: float
    #: the warning's words, with ``{elapsed}`` for the seconds waited
    overdue: str


def bound(seconds: float, since: float, overdue: str) -> Deadline | None:
    """A deadline ``seconds`` after ``since``; None for 0, a timeout turned off."""
    return Deadline(since + seconds, since, overdue) if seconds > 0 else None


def earliest(*deadlines: Deadline | None) -> Deadline | None:
    present = [deadline for deadline in deadlines if deadline is not None]
    return min(present, key=lambda deadline: deadline.at) if present else None


class Worker:
    """The parent's record of one worker process: which index it fills, for which generation,
    in which state, and its deadline (Supervisor._set_deadline)."""

    def __init__(self, index: int, generation: int, process: subprocess.Popen[bytes], channel: Channel) -> None:
        self.index = index
        #: the reload it was started for: 1 at start, one more per SIGHUP
        self.generation = generation
        self.process = process
        self.channel = channel
        self.state = WorkerState.STARTING
        self.started = time.monotonic()
        #: when it said ready (monotonic), or None
        self.ready_at: float | None = None
        #: when it last sent anything (monotonic): its heartbeat, counted from ready
        self.heard_at = self.started
        #: the last snapshot it sent (a dict of the Snapshot fields), or None
        self.snapshot: dict[str, Any] | None = None
        #: what it said when it could not start (an app that does not import), or None
        self.failure: str | None = None
        #: when the parent kills it unless it moves on first; None: no bound in this state
        self.deadline: Deadline | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


class Supervisor:
    """Runs N workers on shared listeners: starts them, restarts the dead, rolls them over to a
    new generation on SIGHUP, kills the silent, stops them all.

    Invariant: once events settle (no worker starting and no restart due), exactly N workers
    serve, one per index, each from the newest generation that reported ready at that index, and
    no index is empty for longer than its restart back-off.  How it holds:

    - Every state change goes through ``_enter`` (TRANSITIONS says which are possible), and after
      every event (a message, an exit, a signal, a timer) ``_settle`` compares what runs with what
      is wanted -- a worker of the newest generation for every index -- and starts what lacks.
    - A worker is retired only when its own successor (same index, newer generation) says ready,
      so an index is never emptied by a reload; a successor that dies, before or after ready, is
      simply missing from its index again, and ``_settle`` starts another while its predecessor
      keeps serving (or draining, if it was already told to go).
    - Reloads coalesce: SIGHUP makes a new generation; workers of an older one that are still
      starting are stopped at once (they serve nobody yet), the serving ones stay until their
      successor in the newest generation is ready.  Any number of SIGHUPs ends on exactly one
      fresh generation; none is queued.
    - At most STARTING_AT_ONCE workers start at a time, from the loop, so a stop signal during
      start-up is handled at once and starts nothing more.
    - Every worker process has one deadline, whatever its state, set on each transition
      (``_set_deadline``), and one check kills every worker past its own (``_check_deadlines``):
      none, stuck in any state, stays for the parent's whole life.
    """

    def __init__(
        self,
        loop: EventLoop,
        count: int,
        argv: Sequence[str],
        listeners: Sequence[socket.socket],
        *,
        stop_timeout: float,
        stop_rule: str = "",
        worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
        start_timeout: float = DEFAULT_WORKER_START_TIMEOUT,
        on_first_ready: Callable[[], Any] | None = None,
        on_all_stopped: Callable[[], Any] | None = None,
    ) -> None:
        self.loop = loop
        self.count = count
        #: the worker's command line after ``python -m pollserve``
        self.argv = list(argv)
        self.listeners = list(listeners)
        #: a worker told to go (retiring, superseded, the server stopping) that has not exited this
        #: long after is killed; ``stop_rule`` says where the figure comes from, for the log
        self.stop_timeout = stop_timeout
        self.stop_rule = stop_rule or f"{stop_timeout:g} s"
        #: --worker-timeout: a serving worker silent this long is killed; 0: never
        self.worker_timeout = worker_timeout
        #: --worker-start-timeout: a worker not ready this long after it started is killed; 0: never
        self.start_timeout = start_timeout
        self.on_first_ready = on_first_ready
        self.on_all_stopped = on_all_stopped
        #: the generation new workers start in: 1, and one more per SIGHUP
        self.generation = 1
        #: every worker whose process may still run (state in ALIVE); an index may have two
        #: (a serving or retiring one and its successor)
        self.workers: list[Worker] = []
        #: running totals of the workers that have exited, so the server's counters never go back
        self.retired_totals: dict[str, int] = {}
        #: the loop busy seconds of the workers that have exited: a float, so kept beside the counts
        self.retired_busy_s = 0.0
        #: the lag histogram of the workers that have exited (cumulative counts per bucket, and the
        #: sum of the lags), so the server's since-start histogram never goes back either
        self.retired_lag_buckets: list[int] = []
        self.retired_lag_sum_s = 0.0
        #: workers killed past their deadline (_set_deadline), since the start
        self.timeouts_total = 0
        self.stopping = False
        #: per index: quick failures in a row, and the monotonic time before which no restart
        self._failures = [0] * count
        self._not_before = [0.0] * count
        #: the newest generation whose failure to start was logged as an ERROR (one line per reload)
        self._failure_reported = 0
        self._wake_timer: Handle | None = None
        self._wake_at = 0.0
        self._liveness_timer: Handle | None = None
        self._first_ready_seen = False
        #: why the server stopped at its first start: a worker that cannot start (_cannot_start)
        self.start_failure: str | None = None
        #: workers that could not be started (no fds, no process): a warning per episode, not per try;
        #: an episode lasts while retries, up to MAX_BACKOFF apart, keep failing
        self._spawn_failures = EpisodeLog(log, loop, "cannot start a worker process", quiet=2 * MAX_BACKOFF)

    # -- events ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the first workers (a few at a time: the rest follow as these are ready)."""
        self._liveness_timer = self.loop.call_later(LIVENESS_INTERVAL, self._check_deadlines)
        self._settle()

    def reload(self, signame: str = "SIGHUP") -> None:
        """SIGHUP: a new generation for every index; each old worker retires once its successor is ready."""
        if self.stopping:
            return
        self.generation += 1
        log.info("%s: reload: rolling restart of %d workers (generation %d)", signame, self.count, self.generation)
        # An operator's reload is a new attempt: no back-off is carried over from the old code.
        self._failures = [0] * self.count
        self._not_before = [0.0] * self.count
        self._settle()

    def stop(self, signame: str) -> None:
        """SIGINT/SIGTERM: every worker drains as a single server does; a second call tells them,
        over their channel, to close now (a worker itself never counts a signal twice)."""
        if self.stopping:
            log.warning("%s again: telling the workers to close now", signame)
            for worker in self.workers:
                worker.channel.send({"type": "close"})
            return
        self.stopping = True
        if self._wake_timer is not None:
            self._wake_timer.cancel()
            self._wake_timer = None
        log.info("%s: stopping %d workers", signame, len(self.workers))
        for worker in list(self.workers):
            if worker.state is WorkerState.RETIRING:
                self._terminate(worker)  # from "finish your clients" to a shutdown that flushes them now
                self._set_deadline(worker, WorkerState.RETIRING)
            else:
                self._enter(worker, WorkerState.RETIRING)
        self._settle()

    def reap(self) -> None:
        """SIGCHLD, or a channel's EOF: collect every worker that has exited."""
        for worker in list(self.workers):
            if worker.process.poll() is None:
                continue
            worker.channel.drain()  # its last snapshot may still be unread: the totals need it
            exited = WorkerState.EXITED if worker.state is WorkerState.RETIRING else WorkerState.FAILED
            self._enter(worker, exited)
        self._settle()

    def _on_message(self, worker: Worker, message: dict[str, Any]) -> None:
        worker.heard_at = time.monotonic()
        if worker.state is WorkerState.SERVING:  # its heartbeat: the deadline moves on
            self._set_deadline(worker, WorkerState.SERVING)
        kind = message.get("type")
        if kind == "stats":
            worker.snapshot = message.get("snapshot")
        elif kind == "failed":
            worker.failure = str(message.get("reason"))
        elif kind == "ready" and worker.state is WorkerState.STARTING:
            self._enter(worker, WorkerState.SERVING)
            self._settle()

    def _set_deadline(self, worker: Worker, before: WorkerState | None) -> None:
        """The one deadline of a worker process, whatever its state, as gunicorn's murder_workers
        applies one rule to every worker; set on each transition (``before``: the state it left,
        None at its start), and moved on by each report while it serves:

        - starting: ``--worker-start-timeout`` after it started (a slow import is not a hang: the
          bound is its own, minutes rather than seconds);
        - serving: ``--worker-timeout`` after its last report (its heartbeat is a timer of its own
          loop, so a blocked loop falls silent);
        - retiring (its successor is ready, or the server stops): the stop timeout after it was
          told to go, never later than a deadline it already had in that state;
        - superseded (told to go while still starting, for an older generation): the same, or its
          start deadline if that comes first.
        """
        now = time.monotonic()
        if worker.state is WorkerState.STARTING:
            worker.deadline = bound(
                self.start_timeout,
                worker.started,
                f"is not ready {{elapsed:.1f}} s after it started (--worker-start-timeout {self.start_timeout:g})",
            )
        elif worker.state is WorkerState.SERVING:
            worker.deadline = bound(
                self.worker_timeout,
                worker.heard_at,
                f"has not reported for {{elapsed:.1f}} s (--worker-timeout {self.worker_timeout:g})",
            )
        elif worker.state is WorkerState.RETIRING:
            told = bound(
                self.stop_timeout, now, f"has not exited {{elapsed:.1f}} s after it was told to stop ({self.stop_rule})"
            )
            kept = worker.deadline if before in (WorkerState.STARTING, WorkerState.RETIRING) else None
            worker.deadline = earliest(kept, told)
        else:
            worker.deadline = None

    def _check_deadlines(self) -> None:
        """Kill every worker past its deadline (SIGKILL: a stopped or blocked process cannot act on
        SIGTERM); _settle replaces it, with back-off."""
        self._liveness_timer = self.loop.call_later(LIVENESS_INTERVAL, self._check_deadlines)
        # What the workers sent is read first: a stall of the parent's own loop (kill -STOP, a long
        # pass) is not their fault, and their reports wait in the channels.  The pass that runs
        # this timer may have had no event for them: epoll_wait fails with EINTR once a stopped
        # process is continued (signal(7)), and CPython's retry of a wait whose timeout has passed
        # returns no event (PEP 475).
        for worker in list(self.workers):
            worker.channel.drain()
        now = time.monotonic()
        for worker in self.workers:
            deadline = worker.deadline
            if deadline is None or now < deadline.at or worker.process.poll() is not None:
                continue
            why = deadline.overdue.format(elapsed=now - deadline.since)
            log.warning("worker %d (pid %d) %s: killing it", worker.index, worker.pid, why)
            worker.deadline = None  # the kernel ends it; the reap follows
            self.timeouts_total += 1
            worker.process.kill()

    # -- the one place states change ---------------------------------------------------------------

    def _enter(self, worker: Worker, state: WorkerState) -> None:
        """Move worker to state, and do what entering that state means."""
        if state not in TRANSITIONS[worker.state]:
            raise RuntimeError(f"worker {worker.index}: no transition from {worker.state.value} to {state.value}")
        before, worker.state = worker.state, state
        if state is WorkerState.SERVING:
            worker.ready_at = worker.heard_at = time.monotonic()
        self._set_deadline(worker, before)
        if state is WorkerState.SERVING:
            log.info("worker %d (pid %d) started (generation %d)", worker.index, worker.pid, worker.generation)
            if not self._first_ready_seen:
                self._first_ready_seen = True
                if self.on_first_ready is not None:
                    self.on_first_ready()
            # Its predecessors at this index may go now, and only now.
            for old in list(self.workers):
                if (
                    old.index == worker.index
                    and old.generation < worker.generation
                    and old.state is WorkerState.SERVING
                ):
                    self._enter(old, WorkerState.RETIRING)
        elif state is WorkerState.RETIRING:
            if before is WorkerState.SERVING and not self.stopping:
                log.info(
                    "worker %d (pid %d) of generation %d: retiring, its successor is ready",
                    worker.index,
                    worker.pid,
                    worker.generation,
                )
                worker.channel.send({"type": "retire"})
            else:
                self._terminate(worker)  # the server stops, or it was still starting for an older generation
        else:  # EXITED or FAILED: the process is gone
            self.workers.remove(worker)
            worker.channel.close()
            self._retire_totals(worker)
            self._log_exit(worker, before)
            if state is WorkerState.FAILED and not self.stopping and not self._cannot_start(worker, before):
                self._back_off(worker)

    def _settle(self) -> None:
        """Compare what runs with what is wanted, and act: a worker of the newest generation for
        every index, at most STARTING_AT_ONCE starting, none before its back-off is over."""
        if self.stopping:
            if not self.workers:
                self._all_stopped()
            return
        for worker in list(self.workers):
            if worker.state is WorkerState.STARTING and worker.generation < self.generation:
                log.info("worker %d (pid %d): superseded before it was ready; stopping it", worker.index, worker.pid)
                self._enter(worker, WorkerState.RETIRING)
        now = time.monotonic()
        starting = sum(worker.state is WorkerState.STARTING for worker in self.workers)
        wake_at: float | None = None
        for index in range(self.count):
            if self._filled(index):
                continue
            if now < self._not_before[index]:
                wake_at = min(wake_at or self._not_before[index], self._not_before[index])
                continue
            if starting >= STARTING_AT_ONCE:
                break  # the next ready or failure settles again
            if self._spawn(index):
                starting += 1
            else:
                wake_at = min(wake_at or self._not_before[index], self._not_before[index])
        if wake_at is not None:
            self._wake(wake_at)

    def _filled(self, index: int) -> bool:
        """The index has its worker of the newest generation, serving or on its way."""
        return any(
            worker.index == index
            and worker.generation == self.generation
            and worker.state in (WorkerState.STARTING, WorkerState.SERVING)
            for worker in self.workers
        )

    def _wake(self, when: float) -> None:
        """Settle again at when (a back-off ends), unless an earlier wake-up is set."""
        if self._wake_timer is not None:
            if self._wake_at <= when:
                return
            self._wake_timer.cancel()
        self._wake_at = when

        def wake() -> None:
            self._wake_timer = None
            self._settle()

        self._wake_timer = self.loop.call_later(max(0.0, when - time.monotonic()), wake)

    # -- what the transitions do -------------------------------------------------------------------

    def _spawn(self, index: int) -> bool:
        """Start a worker for index in the newest generation; False if it cannot be started now
        (no fd for its channel, no process: EMFILE, EAGAIN, ENOMEM ...).  Whatever the failure, the
        index is retried after a back-off, and the failures are logged once per episode."""
        try:
            worker = self._start_worker(index)
        except Exception as exc:
            traceback = None if isinstance(exc, OSError) else exc  # an OSError says all in one line
            self._spawn_failures.event(f"worker {index}: {exc}; retrying with back-off", traceback)
            self._delay_restart(index, failed=True, quiet=True)
            return False
        self.workers.append(worker)
        return True

    def _start_worker(self, index: int) -> Worker:
        """The process and its channel, or an exception with nothing left open."""
        parent_end, child_end = socket.socketpair()
        try:
            listen_fds = tuple(sock.fileno() for sock in self.listeners)
            role = WorkerRole(index, child_end.fileno(), listen_fds)
            process = subprocess.Popen(
                [*compiled.command(), *self.argv],
                stdin=subprocess.DEVNULL,
                pass_fds=(*listen_fds, child_end.fileno()),
                env={**os.environ, WORKER_ENV: role.to_env()},
            )
        except BaseException:
            parent_end.close()
            child_end.close()
            raise
        child_end.close()
        worker: Worker

        def on_message(message: dict[str, Any]) -> None:
            self._on_message(worker, message)

        def on_closed() -> None:
            self.loop.call_soon(self.reap)  # the process is exiting, or has

        try:
            channel = Channel(self.loop, parent_end, on_message, on_closed)
        except BaseException:  # the loop cannot watch it (select's FD_SETSIZE): no worker without one
            parent_end.close()
            process.kill()
            process.wait()
            raise
        worker = Worker(index, self.generation, process, channel)
        self._set_deadline(worker, None)
        return worker

    def _terminate(self, worker: Worker) -> None:
        """SIGTERM: the worker drains as a single server does (a second SIGTERM changes nothing)."""
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)

    def _log_exit(self, worker: Worker, before: WorkerState) -> None:
        how = describe_exit(worker.process.returncode)
        lived = time.monotonic() - worker.started
        log.info("worker %d (pid %d) stopped (%s) after %.1f s", worker.index, worker.pid, how, lived)
        if before is not WorkerState.STARTING or self.stopping or worker.generation != self.generation:
            return
        # A new generation that cannot start while an older one serves: a failed deploy.  Said
        # once per reload; the retries that follow are the back-off's WARNING lines.
        previous = any(
            other.state is WorkerState.SERVING and other.generation < worker.generation for other in self.workers
        )
        if previous and self._failure_reported < worker.generation:
            self._failure_reported = worker.generation
            log.error(
                "reload failed: worker %d of generation %d exited before it was ready (%s)%s; "
                "the previous workers keep serving, and the new ones are retried with back-off",
                worker.index,
                worker.generation,
                how,
                f": {worker.failure}" if worker.failure else "",
            )

    def _cannot_start(self, worker: Worker, before: WorkerState) -> bool:
        """At the first start, before any worker was ever ready, a worker that exits with status 2
        (the command's exit status for a usage or configuration error, as a single server's
        ``--max-fds 1``) would fail the same way every time: the server stops with its reason and
        exits 2, as gunicorn halts on a worker's boot error, rather than restart it forever.  After
        a worker has served, the same exit is a failed reload, and the serving workers stay."""
        if before is not WorkerState.STARTING or self._first_ready_seen or worker.process.returncode != 2:
            return False
        self.start_failure = f"worker {worker.index} cannot start: {worker.failure or 'exit 2'}"
        log.error("%s; stopping the server", self.start_failure)
        self.stop("a worker that cannot start")
        return True

    def _back_off(self, worker: Worker) -> None:
        """A worker that ended unasked is restarted: at once if it had served a while, else later
        and later (a crash at start must not become a fork loop)."""
        healthy = worker.ready_at is not None and time.monotonic() - worker.ready_at >= HEALTHY_AFTER
        self._delay_restart(worker.index, failed=not healthy)

    def _delay_restart(self, index: int, *, failed: bool, quiet: bool = False) -> None:
        """No start for index before the back-off is over; ``quiet``: the caller logs the failure."""
        self._failures[index] = self._failures[index] + 1 if failed else 0
        failures = self._failures[index]
        delay = 0.0 if failures == 0 else min(FIRST_BACKOFF * 2 ** (failures - 1), MAX_BACKOFF)
        if delay and not quiet:
            log.warning("worker %d: restarting in %.1f s (%d quick exits in a row)", index, delay, failures)
        self._not_before[index] = time.monotonic() + delay

    def _retire_totals(self, worker: Worker) -> None:
        if worker.snapshot is None:
            return
        for key in COUNTERS:
            value = worker.snapshot.get(key)
            if isinstance(value, int):
                self.retired_totals[key] = self.retired_totals.get(key, 0) + value
        busy = worker.snapshot.get("loop_busy_s")
        if isinstance(busy, (int, float)):
            self.retired_busy_s += busy
        merged = add_histograms([self.retired_lag_buckets, worker.snapshot.get("loop_lag_buckets") or []])
        lag_sum = worker.snapshot.get("loop_lag_sum_s")
        if merged is not None and isinstance(lag_sum, (int, float)):
            self.retired_lag_buckets = merged
            self.retired_lag_sum_s += lag_sum

    # -- stopping ----------------------------------------------------------------------------------

    def _all_stopped(self) -> None:
        if self._liveness_timer is not None:
            self._liveness_timer.cancel()
            self._liveness_timer = None
        self._spawn_failures.close()
        if self.on_all_stopped is not None:
            callback, self.on_all_stopped = self.on_all_stopped, None
            callback()

    def close(self) -> None:
        """Kill what still runs (the parent is going away) and wait for it."""
        self._spawn_failures.close()
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.kill()
            worker.process.wait()
            worker.channel.close()
        self.workers.clear()

    # -- figures -------------------------------------------------------------------------------

    @property
    def serving(self) -> int:
        """Workers accepting clients now."""
        return sum(worker.state is WorkerState.SERVING for worker in self.workers)

    def snapshots(self) -> list[tuple[int, int, dict[str, Any]]]:
        """(index, pid, snapshot) of every worker that has reported, by index."""
        rows = [(w.index, w.pid, w.snapshot) for w in self.workers if w.snapshot is not None]
        return sorted(rows, key=lambda row: (row[0], row[1]))


#: snapshot fields that are running totals: summed over workers, the retired ones included
COUNTERS = (
    "connections_accepted",
    "connections_closed",
    "connections_refused",
    "connections_idle_closed",
    "connections_idle_reset",
    "bytes_in",
    "bytes_out",
    "loop_iterations",
    "events_total",
    "tls_handshakes",
    "tls_handshake_failures",
    "slow_callbacks",
    "slow_passes",
)
#: snapshot fields that are levels: summed over the workers alive now
LEVELS = ("registered_fds", "process_fds", "connections_open", "write_buffer_bytes")


class SupervisorStats:
    """The whole server as the parent sees it, for its stats endpoint: every key of a single
    server's snapshot, meaning all the workers together (counters summed, the exited workers'
    included, so they never go back; ``pid`` the parent's; fds of the parent and the workers
    together; ``fd_usage`` the highest of any worker, since each hits its own limit), plus
    ``workers``: each worker's own snapshot with its ``index`` and ``pid``.  Loop health is the
    worst worker's (an average would hide the one that is stuck): utilization and lag the highest,
    the slowest callback of any; busy seconds and the lag histogram are counters, summed as the
    others are (the exited workers' included)."""

    #: the parent's own fd count is refreshed at most this often
    fd_refresh_interval = 1.0

    def __init__(self, loop: EventLoop, supervisor: Supervisor) -> None:
        self.loop = loop
        self.supervisor = supervisor
        self.process = psutil.Process()
        self.started = time.monotonic()
        self._parent_fds: int | None = None
        self._parent_fds_at = -1.0
        #: set from the first stop signal on
        self.draining = False

    def parent_fds(self) -> int | None:
        now = time.monotonic()
        if self._parent_fds_at < 0 or now - self._parent_fds_at >= self.fd_refresh_interval:
            try:
                self._parent_fds = count_fds(self.process)
            except (OSError, psutil.Error):
                self._parent_fds = None
            self._parent_fds_at = now
        return self._parent_fds

    def current(self) -> list[Worker]:
        """The worker that stands for each index, by index: the serving one of the newest generation
        (or, while none serves there, the newest that has reported), so a rolling restart never
        shows one index twice."""
        newest: dict[int, Worker] = {}
        for worker in self.supervisor.workers:
            if worker.snapshot is None:
                continue
            rank = (worker.state is WorkerState.SERVING, worker.generation)
            shown = newest.get(worker.index)
            if shown is None or rank > (shown.state is WorkerState.SERVING, shown.generation):
                newest[worker.index] = worker
        return [newest[index] for index in sorted(newest)]

    def worker_row(self, worker: Worker, now: float) -> dict[str, Any]:
        """One worker in /stats: its own snapshot, and what the parent knows of it."""
        age = now - worker.heard_at
        assert worker.snapshot is not None
        return {
            "index": worker.index,
            "pid": worker.pid,
            **worker.snapshot,
            "state": worker.state.value,
            "generation": worker.generation,
            "snapshot_age_s": round(age, 3),
            "stale": age > STALE_AFTER,
        }

    def snapshot(self) -> dict[str, Any]:
        everyone = [snap for _, _, snap in self.supervisor.snapshots()]
        parent_fds = self.parent_fds()
        out: dict[str, Any] = {field.name: None for field in dataclasses.fields(Snapshot)}
        first = everyone[0] if everyone else {}
        out.update(
            pid=self.process.pid,
            backend=self.loop.backend.name,
            backend_capacity=first.get("backend_capacity"),
            fd_soft_limit=first.get("fd_soft_limit"),
            fd_hard_limit=first.get("fd_hard_limit"),
            uptime_s=round(time.monotonic() - self.started, 3),
        )
        for key in LEVELS:
            out[key] = sum(snap.get(key) or 0 for snap in everyone)
        out["registered_fds"] += len(self.loop.backend)
        fds = [snap.get("process_fds") for snap in everyone]
        out["process_fds"] = None if parent_fds is None or None in fds else parent_fds + sum(fds)  # type: ignore[arg-type]
        for key in COUNTERS:
            out[key] = self.supervisor.retired_totals.get(key, 0) + sum(snap.get(key) or 0 for snap in everyone)
        limits = [snap.get("connections_limit") for snap in everyone]
        out["connections_limit"] = None if not limits or None in limits else sum(limits)
        usages = [u for snap in everyone if (u := snap.get("fd_usage")) is not None]
        out["fd_usage"] = max(usages) if usages else usage(parent_fds, out["fd_soft_limit"])
        now = time.monotonic()
        shown = self.current()
        out.update(
            worst_loop_health([(worker.index, worker.pid, worker.snapshot or {}) for worker in shown]),
            draining=self.draining,
        )
        if everyone:
            # Running totals since start, as counters must be, summed like COUNTERS over every
            # worker that reports (a retiring one too) and those that have exited.
            busy = sum(snap.get("loop_busy_s") or 0 for snap in everyone)
            out["loop_busy_s"] = round(self.supervisor.retired_busy_s + busy, 6)
            buckets = add_histograms(
                [self.supervisor.retired_lag_buckets, *(snap.get("loop_lag_buckets") or [] for snap in everyone)]
            )
            if buckets is not None:
                out["loop_lag_buckets"] = buckets
                lag_sum = sum(snap.get("loop_lag_sum_s") or 0 for snap in everyone)
                out["loop_lag_sum_s"] = round(self.supervisor.retired_lag_sum_s + lag_sum, 6)
        out["workers"] = [self.worker_row(worker, now) for worker in shown]
        out["workers_serving"] = self.supervisor.serving
        out["workers_wanted"] = self.supervisor.count
        out["worker_timeouts_total"] = self.supervisor.timeouts_total
        out["generation"] = self.supervisor.generation
        return out

    def json(self) -> str:
        return json.dumps(self.snapshot())

    def log_line(self) -> str:
        """The whole server's stats line (SIGUSR1 to the parent): every worker's figures together,
        as /stats sums them, then how many workers serve."""
        snapshot = self.snapshot()
        whole = Snapshot(**{field.name: snapshot[field.name] for field in dataclasses.fields(Snapshot)})
        return f"{log_line(whole)} | workers {self.supervisor.serving}/{self.supervisor.count} serving"

    def metrics(self) -> str:
        now = time.monotonic()
        shown = self.current()
        rows = [({"worker": str(worker.index)}, worker.snapshot or {}) for worker in shown]
        extra: list[tuple[str, str, str, float]] = []
        parent_fds = self.parent_fds()
        if parent_fds is not None:
            help_text = "File descriptors open in the supervising parent."
            extra.append(("pollserve_supervisor_open_fds", "gauge", help_text, parent_fds))
        supervisor = self.supervisor
        extra += [
            ("pollserve_workers", "gauge", "Worker processes that have reported.", len(rows)),
            ("pollserve_workers_serving", "gauge", "Workers accepting clients now.", supervisor.serving),
            ("pollserve_workers_wanted", "gauge", "Workers the server runs when all is well.", supervisor.count),
            (
                "pollserve_worker_timeouts_total",
                "counter",
                "Workers killed past their deadline: not ready in --worker-start-timeout, silent past "
                "--worker-timeout, or not gone in the stop timeout after they were told to stop.",
                supervisor.timeouts_total,
            ),
        ]
        page = prometheus_page(self.process.pid, self.loop.backend.name, rows, extra)
        ages = [(worker.index, now - worker.heard_at) for worker in shown]
        lines = [
            "# HELP pollserve_worker_snapshot_age_seconds Seconds since the worker last reported.",
            "# TYPE pollserve_worker_snapshot_age_seconds gauge",
            *(f'pollserve_worker_snapshot_age_seconds{{worker="{index}"}} {age:.3f}' for index, age in ages),
            f"# HELP pollserve_worker_stale Whether the worker has been silent for more than {STALE_AFTER:g} s.",
            "# TYPE pollserve_worker_stale gauge",
            *(f'pollserve_worker_stale{{worker="{index}"}} {int(age > STALE_AFTER)}' for index, age in ages),
        ]
        return page + ("\n".join(lines) + "\n" if ages else "")


def worst_loop_health(workers: list[tuple[int, int, dict[str, Any]]]) -> dict[str, Any]:
    """The whole server's loop health keys from its workers' (see SupervisorStats)."""
    snaps = [snap for _, _, snap in workers]
    out: dict[str, Any] = {}
    if not snaps:
        return out
    out["loop_window_s"] = snaps[0].get("loop_window_s")
    for key in ("loop_utilization", "loop_lag_p50_s", "loop_lag_p99_s", "loop_lag_max_s"):
        values = [value for snap in snaps if (value := snap.get(key)) is not None]
        out[key] = max(values) if values else None
    out["loop_busy_s"] = round(sum(snap.get("loop_busy_s") or 0 for snap in snaps), 6)
    buckets = add_histograms([snap.get("loop_lag_buckets") or [] for snap in snaps])
    if buckets is not None:
        out["loop_lag_buckets"] = buckets
        out["loop_lag_sum_s"] = round(sum(snap.get("loop_lag_sum_s") or 0 for snap in snaps), 6)
    slowest = [
        (snap["slowest_callback_s"], f"worker {index}: {snap['slowest_callback']}")
        for index, _, snap in workers
        if snap.get("slowest_callback") and snap.get("slowest_callback_s") is not None
    ]
    if slowest:
        out["slowest_callback_s"], out["slowest_callback"] = max(slowest)
    return out


def add_histograms(histograms: list[list[int]]) -> list[int] | None:
    """Cumulative bucket counts added bucket by bucket, the empty ones (nothing reported yet) left
    out; None if the others do not have the same buckets (workers of two pollserve versions)."""
    present = [counts for counts in histograms if counts]
    if not present:
        return []
    if any(len(counts) != len(present[0]) for counts in present):
        return None
    return [sum(column) for column in zip(*present, strict=True)]
