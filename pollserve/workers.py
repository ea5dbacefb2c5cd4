"""``--workers N``: a parent that supervises N worker processes, each a whole pollserve server.

The parent binds the listening sockets once and holds them for its whole life; each worker is
a fresh interpreter (``python -m pollserve`` with the same arguments) that inherits them, so a
worker that dies or is replaced never closes a listener and no queued connection is reset
(gunicorn's and nginx's model).  With ``--reuse-port`` each worker binds its own SO_REUSEPORT
listener instead and the parent only holds the port.  A fresh interpreter rather than fork():
a rolling restart (SIGHUP) imports the app afresh, so new code is picked up.

Parent and worker talk over a socketpair, one JSON object per line.  The worker says
``ready`` once it accepts, then sends its stats snapshot every second; the parent sends
``retire`` to a worker that a rolling restart replaces.  A worker whose channel reaches EOF has
lost its parent and shuts down, so no worker outlives the parent, even one killed with SIGKILL.

Signals: SIGINT/SIGTERM to the parent stop every worker as a single server stops (drain, then
exit) and the parent exits 0 once all are gone; a second one means "close now".  Workers ignore
SIGINT: a Ctrl-C reaches the whole process group, and must count once, through the parent.
SIGHUP is a rolling restart.  The loop and the server know nothing of processes: this module
and the worker role in service.py do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil

from .loop import EventLoop, Handle
from .stats import Snapshot, count_fds, prometheus_page, usage

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


def auto_count() -> int:
    """``--workers auto``: the CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


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

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
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
    """A worker's end of the channel: it says ready, reports its snapshot every second, and takes
    the parent's orders.  The channel's EOF means the parent is gone."""

    def __init__(
        self,
        loop: EventLoop,
        role: WorkerRole,
        snapshot: Callable[[], Any],
        *,
        retire: Callable[[], Any],
        parent_gone: Callable[[], Any],
    ) -> None:
        self.loop = loop
        self.role = role
        self.snapshot = snapshot
        self.retire = retire
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
        if message.get("type") == "retire":
            log.info("retiring: no longer accepting; the open connections may finish")
            self.retire()

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


class Worker:
    """The parent's record of one worker process."""

    def __init__(self, index: int, process: subprocess.Popen[bytes], channel: Channel) -> None:
        self.index = index
        self.process = process
        self.channel = channel
        self.started = time.monotonic()
        self.ready = False
        self.retiring = False
        #: the last snapshot it sent (a dict of the Snapshot fields), or None
        self.snapshot: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


class Supervisor:
    """Runs N workers on shared listeners, restarts the dead, rolls them on SIGHUP, stops them all."""

    def __init__(
        self,
        loop: EventLoop,
        count: int,
        argv: Sequence[str],
        listeners: Sequence[socket.socket],
        *,
        stop_timeout: float,
        on_first_ready: Callable[[], Any] | None = None,
        on_all_stopped: Callable[[], Any] | None = None,
    ) -> None:
        self.loop = loop
        self.count = count
        #: the worker's command line after ``python -m pollserve``
        self.argv = list(argv)
        self.listeners = list(listeners)
        self.stop_timeout = stop_timeout
        self.on_first_ready = on_first_ready
        self.on_all_stopped = on_all_stopped
        #: every worker process alive (a retiring one and its replacement share an index)
        self.workers: list[Worker] = []
        #: running totals of the workers that have exited, so the server's counters never go back
        self.retired_totals: dict[str, int] = {}
        self.stopping = False
        self._failures = [0] * count
        self._restart_timers: dict[int, Handle] = {}
        self._first_ready_seen = False
        self._kill_timer: Handle | None = None

    # -- starting -------------------------------------------------------------------

    def start(self) -> None:
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restart_timers.pop(index, None)
        if self.stopping:
            return
        parent_end, child_end = socket.socketpair()
        listen_fds = tuple(sock.fileno() for sock in self.listeners)
        role = WorkerRole(index, child_end.fileno(), listen_fds)
        env = {**os.environ, WORKER_ENV: role.to_env()}
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "pollserve", *self.argv],
                stdin=subprocess.DEVNULL,
                pass_fds=(*listen_fds, child_end.fileno()),
                env=env,
            )
        except OSError as exc:
            parent_end.close()
            child_end.close()
            log.error("worker %d: cannot start: %s", index, exc)
            self._schedule_restart(index, failed=True)
            return
        child_end.close()
        worker: Worker

        def on_message(message: dict[str, Any]) -> None:
            self._on_message(worker, message)

        def on_closed() -> None:
            self.loop.call_soon(self.reap)  # the process is exiting, or has

        worker = Worker(index, process, Channel(self.loop, parent_end, on_message, on_closed))
        self.workers.append(worker)

    def _on_message(self, worker: Worker, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "stats":
            worker.snapshot = message.get("snapshot")
        elif kind == "ready":
            worker.ready = True
            log.info("worker %d (pid %d) started", worker.index, worker.pid)
            if not self._first_ready_seen:
                self._first_ready_seen = True
                if self.on_first_ready is not None:
                    self.on_first_ready()
            # A rolling restart: the worker this one replaces may go now.
            for old in self.workers:
                if old is not worker and old.index == worker.index and not old.retiring:
                    old.retiring = True
                    old.channel.send({"type": "retire"})

    # -- exits and restarts ---------------------------------------------------------------

    def reap(self) -> None:
        """Collect every worker that has exited; restart the ones that should still run."""
        for worker in list(self.workers):
            status = worker.process.poll()
            if status is None:
                continue
            self.workers.remove(worker)
            worker.channel.close()
            self._retire_totals(worker)
            lived = time.monotonic() - worker.started
            how = f"exit {status}" if status >= 0 else f"killed by {signal.Signals(-status).name}"
            log.info("worker %d (pid %d) stopped (%s) after %.1f s", worker.index, worker.pid, how, lived)
            if self.stopping or worker.retiring:
                continue
            if any(other.index == worker.index for other in self.workers):
                continue  # its replacement runs already
            self._schedule_restart(worker.index, failed=lived < HEALTHY_AFTER or not worker.ready)
        if self.stopping and not self.workers:
            self._all_stopped()

    def _schedule_restart(self, index: int, *, failed: bool) -> None:
        self._failures[index] = self._failures[index] + 1 if failed else 0
        failures = self._failures[index]
        delay = 0.0 if failures == 0 else min(FIRST_BACKOFF * 2 ** (failures - 1), MAX_BACKOFF)
        if delay:
            log.warning("worker %d: restarting in %.1f s (%d quick exits in a row)", index, delay, failures)
        self._restart_timers[index] = self.loop.call_later(delay, self._spawn, index)

    def _retire_totals(self, worker: Worker) -> None:
        if worker.snapshot is None:
            return
        for key in COUNTERS:
            value = worker.snapshot.get(key)
            if isinstance(value, int):
                self.retired_totals[key] = self.retired_totals.get(key, 0) + value

    # -- reload and stop ---------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: start a new worker for every index; each old one retires once its successor is ready."""
        if self.stopping:
            return
        log.info("SIGHUP: reload: rolling restart of %d workers", self.count)
        current = {worker.index for worker in self.workers if not worker.retiring}
        for index in range(self.count):
            if index in current:
                self._spawn(index)

    def stop(self, signame: str) -> None:
        """Stop every worker as a single server stops; a second call closes them now."""
        if self.stopping:
            log.warning("%s again: telling the workers to close now", signame)
            self._signal_all(signal.SIGTERM)
            return
        self.stopping = True
        for timer in self._restart_timers.values():
            timer.cancel()
        self._restart_timers.clear()
        log.info("%s: stopping %d workers", signame, len(self.workers))
        self._signal_all(signal.SIGTERM)
        self._kill_timer = self.loop.call_later(self.stop_timeout, self._kill_stragglers)
        if not self.workers:
            self._all_stopped()

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signum)

    def _kill_stragglers(self) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                log.warning("worker %d (pid %d) still running; killing it", worker.index, worker.pid)
                worker.process.kill()

    def _all_stopped(self) -> None:
        if self._kill_timer is not None:
            self._kill_timer.cancel()
            self._kill_timer = None
        if self.on_all_stopped is not None:
            callback, self.on_all_stopped = self.on_all_stopped, None
            callback()

    def close(self) -> None:
        """Kill what still runs (the parent is going away) and wait for it."""
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.kill()
            worker.process.wait()
            worker.channel.close()
        self.workers.clear()

    # -- figures -------------------------------------------------------------------------------

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
    "bytes_in",
    "bytes_out",
    "loop_iterations",
    "events_total",
    "tls_handshakes",
    "tls_handshake_failures",
    "slow_callbacks",
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
    the slowest callback of any; busy seconds and the lag histogram are summed."""

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

    def current(self) -> list[tuple[int, int, dict[str, Any]]]:
        """(index, pid, snapshot) per index: the newest worker of each, so a rolling restart
        never shows one index twice."""
        newest: dict[int, tuple[int, int, dict[str, Any]]] = {}
        for worker in self.supervisor.workers:
            if worker.snapshot is not None and (worker.index not in newest or not worker.retiring):
                newest[worker.index] = (worker.index, worker.pid, worker.snapshot)
        return [newest[index] for index in sorted(newest)]

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
        out.update(worst_loop_health(self.current()), draining=self.draining)
        out["workers"] = [{"index": index, "pid": pid, **snap} for index, pid, snap in self.current()]
        return out

    def json(self) -> str:
        return json.dumps(self.snapshot())

    def metrics(self) -> str:
        rows = [({"worker": str(index)}, snap) for index, _, snap in self.current()]
        extra: list[tuple[str, str, str, float]] = []
        parent_fds = self.parent_fds()
        if parent_fds is not None:
            help_text = "File descriptors open in the supervising parent."
            extra.append(("pollserve_supervisor_open_fds", "gauge", help_text, parent_fds))
        extra.append(("pollserve_workers", "gauge", "Worker processes that have reported.", len(rows)))
        return prometheus_page(self.process.pid, self.loop.backend.name, rows, extra)


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
    histograms = [snap.get("loop_lag_buckets") or [] for snap in snaps]
    width = max(map(len, histograms))
    if all(len(counts) == width for counts in histograms):
        out["loop_lag_buckets"] = [sum(column) for column in zip(*histograms, strict=True)]
        out["loop_lag_sum_s"] = round(sum(snap.get("loop_lag_sum_s") or 0 for snap in snaps), 6)
    slowest = [
        (snap["slowest_callback_s"], f"worker {index}: {snap['slowest_callback']}")
        for index, _, snap in workers
        if snap.get("slowest_callback") and snap.get("slowest_callback_s") is not None
    ]
    if slowest:
        out["slowest_callback_s"], out["slowest_callback"] = max(slowest)
    return out
