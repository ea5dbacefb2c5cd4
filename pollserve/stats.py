"""File-descriptor and loop statistics: one snapshot type, rendered by every view.

The loop, the backend and the server keep plain integer counters on the hot
path, read exactly by every snapshot.  psutil is asked at most once a second,
and less often when counting the fds takes longer than 1% of that: its
figures are shared by every view (the periodic log line, the HTTP endpoint,
SIGUSR1, the fd-usage watch), so a request to the stats endpoint costs
microseconds, not a scan of ``/proc``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import psutil

from .health import LAG_BUCKETS, WINDOW, LoopHealth

if TYPE_CHECKING:
    from .aio.counts import ConnectionCounts
    from .loop import EventLoop
    from .server import Server
    from .tls import TLSLayerFactory

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Everything an operator sees, at one instant.  Field order is the JSON key order."""

    pid: int
    backend: str
    #: fds must be below this (select's FD_SETSIZE); None when unbounded
    backend_capacity: int | None
    #: fds the backend watches: listeners, clients, the loop's wakeup socket
    registered_fds: int
    #: fds (Windows: handles) the whole process holds, from psutil
    process_fds: int | None
    fd_soft_limit: int | None
    fd_hard_limit: int | None
    #: process_fds / fd_soft_limit, 0..1; None when either is unknown
    fd_usage: float | None
    connections_open: int
    connections_accepted: int
    connections_closed: int
    connections_refused: int
    #: the connection limit (--max-connections or the fd budget); None when there is none
    connections_limit: int | None
    connections_idle_closed: int
    #: of those, the ones reset because the client had not received every byte (README, idle timeout)
    connections_idle_reset: int
    bytes_in: int
    bytes_out: int
    #: bytes waiting in write buffers, all connections together
    write_buffer_bytes: int
    loop_iterations: int
    events_total: int
    uptime_s: float
    #: TLS handshakes completed, and failed (timed out, not TLS, refused); 0 without TLS
    tls_handshakes: int = 0
    tls_handshake_failures: int = 0
    #: loop health (pollserve.health), over the last ``loop_window_s`` seconds: the share of wall
    #: time spent outside the backend's wait (0 idle .. 1 saturated), and the busy seconds since start;
    #: None where nothing measures the loop
    loop_window_s: float = WINDOW
    loop_utilization: float | None = None
    loop_busy_s: float | None = None
    #: how late a timer due in the window ran: p50, p99 and max, seconds; None before the first probe
    loop_lag_p50_s: float | None = None
    loop_lag_p99_s: float | None = None
    loop_lag_max_s: float | None = None
    #: the lag histogram since start: cumulative counts per bucket of health.LAG_BUCKETS, then all
    #: (Prometheus' +Inf), and the sum of the lags
    loop_lag_buckets: tuple[int, ...] = ()
    loop_lag_sum_s: float = 0.0
    #: handlers and callbacks that held the loop past --slow-callback, since start; the window's slowest
    slow_callbacks: int = 0
    #: passes of several handlers, not timed one by one, that held the loop past --slow-callback together
    slow_passes: int = 0
    slowest_callback: str | None = None
    slowest_callback_s: float | None = None
    #: a stop signal came: /healthz answers 503 and the server drains (--drain-delay, then the shutdown)
    draining: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


# -- reading a process with psutil ----------------------------------------------


def count_fds(process: psutil.Process) -> int:
    """Open fds of a process; on Windows, its handles (psutil has no num_fds there)."""
    if sys.platform == "win32":
        return process.num_handles()
    return process.num_fds()


def _finite(limit: int) -> int | None:
    infinity = {psutil.RLIM_INFINITY} if hasattr(psutil, "RLIM_INFINITY") else set()
    if resource is not None:
        infinity.add(resource.RLIM_INFINITY)
    return None if limit in infinity or limit < 0 else limit


def fd_limits(process: psutil.Process) -> tuple[int | None, int | None]:
    """(soft, hard) RLIMIT_NOFILE of a process; None where unknown or unlimited.

    psutil reads any process's limits on Linux and FreeBSD (prlimit); elsewhere
    only our own process can be asked, through ``resource``.  Windows has no
    such per-process limit.
    """
    if hasattr(psutil, "RLIMIT_NOFILE") and hasattr(process, "rlimit"):
        soft, hard = process.rlimit(psutil.RLIMIT_NOFILE)
    elif resource is not None and process.pid == os.getpid():
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    else:
        return None, None
    return _finite(soft), _finite(hard)


def usage(fds: int | None, soft_limit: int | None) -> float | None:
    if fds is None or not soft_limit:
        return None
    return round(fds / soft_limit, 4)


class StatsCollector:
    """Builds snapshots of one loop and the server of the app's clients."""

    #: psutil figures are reused for at least this long...
    fd_refresh_interval = 1.0
    #: ...and longer when counting would take more than this share of the time
    fd_count_budget = 0.01

    def __init__(
        self,
        loop: EventLoop,
        server: Server | ConnectionCounts,
        tls: TLSLayerFactory | None = None,
        health: LoopHealth | None = None,
    ) -> None:
        self.loop = loop
        self.server = server
        #: the loop's utilization, lag and slow callbacks, when measured
        self.health = health
        #: set from the first stop signal on
        self.draining = False
        #: the TLS layer's handshake counters, when the server speaks TLS
        self.tls = tls
        self.process = psutil.Process()
        self.started = time.monotonic()
        self._fd_cache: tuple[int | None, int | None, int | None] | None = None
        self._fd_next_count = 0.0

    def fd_figures(self) -> tuple[int | None, int | None, int | None]:
        """(open fds, soft limit, hard limit), counted at most once per refresh interval.

        Counting lists /proc/PID/fd on Linux, whose cost grows with the count (74 ms
        for 19,000 fds on a 2-core machine): the next count waits long enough to keep
        within fd_count_budget of the time.
        """
        now = time.monotonic()
        if self._fd_cache is None or now >= self._fd_next_count:
            started = time.perf_counter()
            self._fd_cache = self._count_fds()
            cost = time.perf_counter() - started
            self._fd_next_count = now + max(self.fd_refresh_interval, cost / self.fd_count_budget)
        return self._fd_cache

    def _count_fds(self) -> tuple[int | None, int | None, int | None]:
        """Counting opens /proc/PID/fd on Linux, which fails with EMFILE exactly when the
        figure matters most: then the process is at its limit, and says so."""
        try:
            soft, hard = fd_limits(self.process)
        except (OSError, psutil.Error):
            soft = hard = None
        try:
            fds: int | None = count_fds(self.process)
        except OSError as exc:
            fds = soft if exc.errno in (errno.EMFILE, errno.ENFILE) else None
        except psutil.Error:
            fds = None
        return fds, soft, hard

    def json(self) -> str:
        """The ``/stats`` page."""
        return self.snapshot().to_json()

    def metrics(self) -> str:
        """The ``/metrics`` page."""
        return prometheus_text(self.snapshot())

    def snapshot(self) -> Snapshot:
        backend = self.loop.backend
        server = self.server
        fds, soft, hard = self.fd_figures()
        return Snapshot(
            pid=self.process.pid,
            backend=backend.name,
            backend_capacity=backend.capacity,
            registered_fds=len(backend),
            process_fds=fds,
            fd_soft_limit=soft,
            fd_hard_limit=hard,
            fd_usage=usage(fds, soft),
            **connection_fields(server),
            loop_iterations=self.loop.iterations,
            events_total=self.loop.events_total,
            uptime_s=round(time.monotonic() - self.started, 3),
            tls_handshakes=self.tls.handshakes if self.tls is not None else 0,
            tls_handshake_failures=self.tls.handshake_failures if self.tls is not None else 0,
            draining=self.draining,
            **health_fields(self.health),
        )


def connection_fields(server: Server | ConnectionCounts) -> dict[str, Any]:
    """The snapshot's connection and byte keys: of a pollserve Server, or of every asyncio transport
    on an AsyncioLoop (``connections_accepted`` then counts the connected ones too, and nothing
    closes a connection for idleness: pollserve's limits do not apply there unless asked for)."""
    from .aio.counts import ConnectionCounts  # here: the asyncio face's modules import this one

    if not isinstance(server, ConnectionCounts):
        return {
            "connections_open": len(server.connections),
            "connections_accepted": server.connections_accepted,
            "connections_closed": server.connections_closed,
            "connections_refused": server.connections_refused,
            "connections_limit": server.max_connections,
            "connections_idle_closed": server.connections_idle_closed,
            "connections_idle_reset": server.connections_idle_reset,
            "bytes_in": server.bytes_in,
            "bytes_out": server.bytes_out,
            "write_buffer_bytes": server.write_buffer_bytes,
        }
    return {
        "connections_open": server.connections_open,
        "connections_accepted": server.connections_accepted + server.connections_connected,
        "connections_closed": server.connections_closed,
        "connections_refused": server.connections_refused,
        "connections_limit": None,
        "connections_idle_closed": 0,
        "connections_idle_reset": 0,
        "bytes_in": server.bytes_in,
        "bytes_out": server.bytes_out,
        "write_buffer_bytes": server.write_buffer_bytes,
    }


def health_fields(health: LoopHealth | None) -> dict[str, Any]:
    """The snapshot's loop health keys; none (the defaults) when nothing measures the loop."""
    if health is None:
        return {}
    lag = health.lag()
    slowest = health.slowest()
    return {
        "loop_window_s": health.window,
        "loop_utilization": round(health.utilization(), 4),
        "loop_busy_s": round(health.busy_seconds(), 6),
        "loop_lag_p50_s": None if lag is None else round(lag[0], 6),
        "loop_lag_p99_s": None if lag is None else round(lag[1], 6),
        "loop_lag_max_s": None if lag is None else round(lag[2], 6),
        "loop_lag_buckets": tuple(health.lag_histogram()),
        "loop_lag_sum_s": round(health.lag_sum, 6),
        "slow_callbacks": health.slow_callbacks,
        "slow_passes": health.slow_passes,
        "slowest_callback": None if slowest is None else slowest[0],
        "slowest_callback_s": None if slowest is None else round(slowest[1], 6),
    }


# -- views ------------------------------------------------------------------------


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def log_line(snap: Snapshot, previous: Snapshot | None = None) -> str:
    """One line for the log, readable at a glance; rates since ``previous`` (else since start)."""
    base_iterations = previous.loop_iterations if previous else 0
    base_events = previous.events_total if previous else 0
    elapsed = snap.uptime_s - (previous.uptime_s if previous else 0.0)
    iterations = snap.loop_iterations - base_iterations
    events = snap.events_total - base_events
    per_second = iterations / elapsed if elapsed > 0 else 0.0
    per_iteration = events / iterations if iterations else 0.0
    open_fds = "?" if snap.process_fds is None else snap.process_fds
    if snap.fd_soft_limit and snap.fd_usage is not None:
        fds = f"fds {open_fds}/{snap.fd_soft_limit} ({100 * snap.fd_usage:.1f}%)"
    else:
        fds = f"fds {open_fds}/{snap.fd_soft_limit or 'unlimited'}"
    return (
        f"stats: backend {snap.backend} | {fds}, {snap.registered_fds} registered"
        f" | connections {snap.connections_open} open, {snap.connections_accepted} total,"
        f" {snap.connections_refused} refused"
        f" | in {human_bytes(snap.bytes_in)}, out {human_bytes(snap.bytes_out)}"
        f" | {per_second:.1f} loop iterations/s, {per_iteration:.2f} events/iteration"
        f" | {loop_health_text(snap.to_dict())}"
    )


def seconds_text(value: float | None) -> str:
    """A short duration for people: ms below a second."""
    if value is None:
        return "-"
    return f"{1000 * value:.1f} ms" if value < 1 else f"{value:.2f} s"


def loop_health_text(snap: dict[str, Any]) -> str:
    """Utilization, lag and the slowest callback of a snapshot, in words."""
    window = snap.get("loop_window_s") or WINDOW
    utilization = snap.get("loop_utilization")
    busy = "?" if utilization is None else f"{100 * utilization:.0f}%"
    text = f"loop busy {busy} (last {window:g} s)"
    if snap.get("loop_lag_p99_s") is not None:
        text += (
            f", lag p50 {seconds_text(snap.get('loop_lag_p50_s'))} p99 {seconds_text(snap.get('loop_lag_p99_s'))}"
            f" max {seconds_text(snap.get('loop_lag_max_s'))}"
        )
    text += f", {snap.get('slow_callbacks') or 0} slow callbacks"
    if snap.get("slowest_callback"):
        text += f" (slowest {snap['slowest_callback']}: {snap.get('slowest_callback_s') or 0:.3f} s)"
    text += f", {snap.get('slow_passes') or 0} slow passes"
    if snap.get("draining"):
        text += " | draining"
    return text


#: snapshot field -> (metric name, type, help); fields not listed are rendered specially
_METRICS: list[tuple[str, str, str, str]] = [
    ("backend_capacity", "pollserve_backend_capacity_fds", "gauge", "The backend watches only fds below this number."),
    ("registered_fds", "pollserve_registered_fds", "gauge", "File descriptors registered with the polling backend."),
    ("process_fds", "pollserve_process_open_fds", "gauge", "File descriptors open in the process."),
    ("fd_soft_limit", "pollserve_process_fds_soft_limit", "gauge", "Soft limit on open fds (RLIMIT_NOFILE)."),
    ("fd_hard_limit", "pollserve_process_fds_hard_limit", "gauge", "Hard limit on open fds (RLIMIT_NOFILE)."),
    ("fd_usage", "pollserve_process_fds_usage_ratio", "gauge", "Open fds divided by the soft limit."),
    ("connections_open", "pollserve_connections_open", "gauge", "Client connections open now."),
    ("connections_accepted", "pollserve_connections_accepted_total", "counter", "Client connections accepted."),
    ("connections_closed", "pollserve_connections_closed_total", "counter", "Client connections closed."),
    ("connections_refused", "pollserve_connections_refused_total", "counter", "Client connections refused."),
    ("connections_limit", "pollserve_connections_limit", "gauge", "Client connections allowed open at once."),
    (
        "connections_idle_closed",
        "pollserve_connections_idle_closed_total",
        "counter",
        "Client connections closed by the idle timeout.",
    ),
    (
        "connections_idle_reset",
        "pollserve_connections_idle_reset_total",
        "counter",
        "Of the connections closed by the idle timeout, those reset with bytes the client had not received.",
    ),
    ("bytes_in", "pollserve_received_bytes_total", "counter", "Bytes received from clients."),
    ("bytes_out", "pollserve_sent_bytes_total", "counter", "Bytes sent to clients."),
    ("write_buffer_bytes", "pollserve_write_buffer_bytes", "gauge", "Bytes waiting to be sent, all clients together."),
    ("loop_iterations", "pollserve_loop_iterations_total", "counter", "Returns from the backend's poll call."),
    ("events_total", "pollserve_events_total", "counter", "Readiness events returned by the backend."),
    ("uptime_s", "pollserve_uptime_seconds", "gauge", "Seconds since the server started."),
    ("tls_handshakes", "pollserve_tls_handshakes_total", "counter", "TLS handshakes completed."),
    (
        "tls_handshake_failures",
        "pollserve_tls_handshake_failures_total",
        "counter",
        "TLS handshakes that failed: timed out, not TLS, or refused.",
    ),
    (
        "loop_utilization",
        "pollserve_loop_utilization_ratio",
        "gauge",
        "Share of wall time the loop spent outside the backend's wait over the last loop window.",
    ),
    ("loop_busy_s", "pollserve_loop_busy_seconds_total", "counter", "Seconds the loop spent outside the wait."),
    (
        "slow_callbacks",
        "pollserve_slow_callbacks_total",
        "counter",
        "Handlers and callbacks that held the loop longer than --slow-callback.",
    ),
    (
        "slow_passes",
        "pollserve_slow_passes_total",
        "counter",
        "Loop passes of several handlers, not timed one by one, that held the loop longer than --slow-callback.",
    ),
    ("draining", "pollserve_draining", "gauge", "1 from the first stop signal on, while the server drains."),
]

#: the lag histogram's metric (health.LAG_BUCKETS; the snapshot's loop_lag_buckets and loop_lag_sum_s)
LAG_METRIC = "pollserve_loop_lag_seconds"

#: for tools and tests: metric name -> snapshot field
METRIC_FIELDS = {metric: field for field, metric, _, _ in _METRICS}


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(snap: Snapshot) -> str:
    """Prometheus text exposition format 0.0.4; unknown values are left out, not faked."""
    return prometheus_page(snap.pid, snap.backend, [({}, snap.to_dict())])


def prometheus_page(
    pid: int,
    backend: str,
    rows: list[tuple[dict[str, str], dict[str, Any]]],
    extra: list[tuple[str, str, str, float]] | None = None,
) -> str:
    """Every snapshot field as a series, one sample per row with that row's labels (a worker's
    index, say), so that Prometheus' sum() over them is the whole server's figure; ``extra`` adds
    (metric, type, help, value) samples without labels."""
    lines = [
        "# HELP pollserve_info The polling backend in use and the process id.",
        "# TYPE pollserve_info gauge",
        f'pollserve_info{{backend="{_escape_label(backend)}",pid="{pid}"}} 1',
    ]
    for field, metric, kind, help_text in _METRICS:
        samples = [(labels, values.get(field)) for labels, values in rows if values.get(field) is not None]
        if not samples:
            continue
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
        lines += [f"{metric}{_labels(labels)} {_number(value)}" for labels, value in samples]
    lines += _lag_histogram(rows)
    for metric, kind, help_text, value in extra or []:
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}", f"{metric} {value}"]
    return "\n".join(lines) + "\n"


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def _lag_histogram(rows: list[tuple[dict[str, str], dict[str, Any]]]) -> list[str]:
    """How late the loop ran what was due, as a Prometheus histogram per row."""
    lines: list[str] = []
    for labels, values in rows:
        counts = values.get("loop_lag_buckets")
        if not counts or len(counts) != len(LAG_BUCKETS) + 1:
            continue
        if not lines:
            lines += [
                f"# HELP {LAG_METRIC} How late the loop ran a timer, from the lag probe.",
                f"# TYPE {LAG_METRIC} histogram",
            ]
        for bound, count in zip((*map(str, LAG_BUCKETS), "+Inf"), counts, strict=True):
            lines.append(f"{LAG_METRIC}_bucket{_labels({**labels, 'le': bound})} {count}")
        lines.append(f"{LAG_METRIC}_sum{_labels(labels)} {values.get('loop_lag_sum_s') or 0}")
        lines.append(f"{LAG_METRIC}_count{_labels(labels)} {counts[-1]}")
    return lines


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{_escape_label(value)}"' for name, value in labels.items()) + "}"


def table(rows: dict[str, Any]) -> str:
    """A two-column table of key and value, for ``pollserve stats``."""
    width = max((len(key) for key in rows if key not in _TABLE_LEFT_OUT), default=0)
    out = []
    for key, value in rows.items():
        if key in _TABLE_LEFT_OUT:
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = "; ".join(_item(item) for item in value) or "-"
        elif isinstance(value, float) and key.endswith(("usage", "utilization")):
            value = f"{100 * value:.1f}%"
        elif value is None:
            value = "-"
        out.append(f"{key:<{width}}  {value}")
    return "\n".join(out)


#: what ``pollserve stats`` shows of each child or worker in a list: the whole snapshot is too wide
_ITEM_KEYS = ("index", "pid", "process_fds", "connections_open", "connections_accepted", "loop_utilization")
#: keys for machines only (the lag histogram's counts: /metrics renders them)
_TABLE_LEFT_OUT = {"loop_lag_buckets"}


def _item(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    return " ".join(f"{key} {item[key]}" for key in _ITEM_KEYS if key in item)


class FdUsageWatch:
    """Hysteresis for the fd-usage warning: warn once above ``high``, re-arm below ``low``."""

    def __init__(self, high: float = 0.8, low: float = 0.7) -> None:
        self.high = high
        self.low = low
        self.warned = False

    def crossed(self, fd_usage: float | None) -> bool:
        """True exactly when usage goes above ``high`` for the first time since it was below ``low``."""
        if fd_usage is None:
            return False
        if not self.warned and fd_usage >= self.high:
            self.warned = True
            return True
        if self.warned and fd_usage < self.low:
            self.warned = False
        return False


class StatsReporter:
    """The loop-driven views: the periodic log line, the on-demand line, the fd-usage warning."""

    #: how often fd usage is checked for the warning; the collector counts less often if that is costly
    fd_check_interval = 1.0

    def __init__(self, collector: StatsCollector, log: logging.Logger, interval: float | None = None) -> None:
        self.collector = collector
        self.log = log
        self.interval = interval
        self.watch = FdUsageWatch()
        self._previous: Snapshot | None = None

    def start(self) -> None:
        loop = self.collector.loop
        if self.interval:
            self._previous = self.collector.snapshot()
            loop.call_later(self.interval, self._log_periodic)
        loop.call_soon(self._check_fds)

    def log_now(self) -> None:
        """One snapshot line, rates since start (SIGUSR1)."""
        self.log.info("%s", log_line(self.collector.snapshot()))

    def _log_periodic(self) -> None:
        snap = self.collector.snapshot()
        self.log.info("%s", log_line(snap, self._previous))
        self._previous = snap
        assert self.interval is not None  # armed by start() only when there is one
        self.collector.loop.call_later(self.interval, self._log_periodic)

    def _check_fds(self) -> None:
        fds, soft, _ = self.collector.fd_figures()
        self._warn_if_crossed(usage(fds, soft), fds, soft)
        self.collector.loop.call_later(self.fd_check_interval, self._check_fds)

    def fds_exhausted(self) -> None:
        """accept() failed for lack of fds: usage is 100%, whatever the last count said."""
        _, soft, _ = self.collector.fd_figures()
        self._warn_if_crossed(1.0, soft, soft)

    def _warn_if_crossed(self, fd_usage: float | None, fds: int | None, soft: int | None) -> None:
        if self.watch.crossed(fd_usage):
            self.log.warning(
                "fd usage at %.0f%% of the soft limit (%s of %s): new connections fail at the limit; "
                "raise it (ulimit -n, or LimitNOFILE= under systemd)",
                100 * (fd_usage or 0),
                "?" if fds is None else fds,
                "?" if soft is None else soft,
            )
