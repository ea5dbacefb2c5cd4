"""One running server, assembled from checked options: fd budget, loop, listeners, stats, signals.

cli.py checks the arguments and owns exit codes and messages; this module
turns options it has checked into a running server and runs it until a
signal stops it.  Errors a user can cause surface as LimitError (an fd limit
that cannot be had) or ListenError (an address that cannot be bound), raised
before anything is served.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import signal

import psutil

from .apps import ProtocolFactory
from .backends import Backend
from .http import HTTPEndpoint, Route
from .limits import Budget, FdLimit, LimitError, connection_budget, set_fd_limit
from .loop import EventLoop
from .rates import RateLimit
from .server import Server, format_address
from .stats import StatsCollector, StatsReporter, count_fds, prometheus_text

log = logging.getLogger("pollserve")

#: the Content-Type Prometheus expects for text exposition format 0.0.4
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4"

# The stats endpoint must stay cheap whatever is thrown at it, and reachable when the app's
# connections have used up their budget: its fds are part of the reserve.
#: stats connections open at once; the excess waits in the kernel's backlog
STATS_MAX_CONNECTIONS = 16
#: stats requests answered per second (and at once): far above a scrape every few seconds,
#: a dashboard polling every second and a balancer's health checks; the excess gets 503
STATS_RATE = 50.0
STATS_BURST = 50
#: stats connections accepted per second (and at once); past that the listener is not watched
#: until the next token, so a connect flood waits in the kernel's backlog and costs the loop
#: nothing -- answering each of its requests, even with a 503, took most of a core
STATS_ACCEPT_RATE = 2 * STATS_RATE
STATS_ACCEPT_BURST = 2 * STATS_BURST
#: accepts per wakeup on the stats listener, so a connect storm there takes a small share
STATS_ACCEPT_BATCH = 8


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """What cli.py has checked: every value here is valid."""

    backend: type[Backend]
    factory: ProtocolFactory
    app: str
    host: str = "127.0.0.1"
    port: int = 5001
    shutdown_timeout: float = 5.0
    stats_interval: float | None = None
    stats_port: int | None = None
    stats_host: str = "127.0.0.1"
    max_fds: int | None = None
    max_connections: int | None = None
    idle_timeout: float | None = None


class ListenError(Exception):
    """An address that cannot be bound; the message is meant for the user as it is."""


def stats_routes(collector: StatsCollector) -> dict[str, Route]:
    def stats() -> tuple[str, bytes]:
        return "application/json", collector.snapshot().to_json().encode() + b"\n"

    def metrics() -> tuple[str, bytes]:
        return PROMETHEUS_CONTENT_TYPE, prometheus_text(collector.snapshot()).encode()

    return {"/stats": stats, "/metrics": metrics}


def fds_in_use() -> int:
    try:
        return count_fds(psutil.Process())
    except (OSError, psutil.Error):
        return 0  # unknown: the spare fds in the reserve have to do


def is_loopback(address: object) -> bool:
    try:
        return ipaddress.ip_address(str(address[0]).split("%")[0]).is_loopback  # type: ignore[index]
    except (ValueError, TypeError, IndexError):
        return False


def describe_budget(limit: FdLimit, budget: Budget, max_connections: int | None) -> str:
    if limit.soft is None:
        fds = "fd limit: none on this OS"
    else:
        fds = f"fd limit {limit.soft}"
        if limit.before != limit.soft:
            verb = "raised" if limit.before is None or limit.soft > limit.before else "lowered"
            fds += f" ({verb} from {limit.before if limit.before is not None else 'unlimited'})"
        fds += f", hard limit {limit.hard if limit.hard is not None else 'unlimited'}"
        if limit.note:
            fds += f" ({limit.note})"
    if max_connections is None:
        return f"{fds}; no connection limit"
    line = f"{fds}; at most {max_connections} connections at once, {budget.reserve} fds kept in reserve"
    if budget.bound.startswith("FD_SETSIZE"):
        line += f"; {budget.bound} is the tighter bound"
    return line


def serve(options: ServeOptions) -> None:
    """Run until SIGINT/SIGTERM has drained the app's connections; raises LimitError or ListenError."""
    fd_limit = set_fd_limit(options.max_fds)  # before the backend: /dev/poll sizes itself from it
    loop = EventLoop(options.backend())
    server = Server(
        loop, options.factory, options.host, options.port, app=options.app, idle_timeout=options.idle_timeout
    )
    collector = StatsCollector(loop, server)
    # The endpoint's own connections are kept out of the app's counters: a Server of its own.
    endpoint = functools.partial(
        HTTPEndpoint, stats_routes(collector), loop.call_later, rate_limit=RateLimit(STATS_RATE, STATS_BURST)
    )
    stats_server = Server(
        loop,
        endpoint,
        options.stats_host,
        options.stats_port or 0,
        name="stats",
        max_connections=STATS_MAX_CONNECTIONS,
        refuse_excess=False,
        accept_batch=STATS_ACCEPT_BATCH,
        accept_rate=RateLimit(STATS_ACCEPT_RATE, STATS_ACCEPT_BURST),
    )

    def close_all() -> None:
        server.close()
        stats_server.close()
        loop.close()

    for listener, host, port, option in (
        (server, options.host, options.port, "--port"),
        (stats_server, options.stats_host, options.stats_port, "--stats-port"),
    ):
        if port is None:
            continue
        try:
            listener.start()
        except OSError as exc:
            close_all()
            where = exc.filename or format_address((host, port))
            raise ListenError(f"cannot listen on {where} ({option}): {exc.strerror or exc}") from None

    stats_reserve = STATS_MAX_CONNECTIONS if stats_server.sockets else 0
    budget = connection_budget(fd_limit.soft, fds_in_use(), stats_reserve, loop.backend.capacity)
    max_connections = options.max_connections or budget.connections
    if budget.connections is not None and max_connections is not None and max_connections > budget.connections:
        close_all()
        raise LimitError(
            f"--max-connections {max_connections} is more than the fds allow: at most {budget.connections} "
            f"with {budget.bound} and {budget.reserve} fds in reserve (raise --max-fds, or the hard limit)"
        )
    if max_connections is not None and max_connections < 1:
        close_all()
        raise LimitError(
            f"no fds left for connections: {budget.bound} leaves none once {budget.reserve} are kept in reserve"
        )
    server.max_connections = max_connections

    stopping = False

    def on_stop_signal(signame: str) -> None:
        nonlocal stopping
        if stopping:  # a second signal: do not wait for slow clients
            log.warning("%s again: closing now", signame)
            server.close()
            loop.stop()
            return
        stopping = True
        log.info("%s: no longer accepting; flushing %d connections", signame, len(server.connections))
        stats_server.close()
        server.shutdown(options.shutdown_timeout, loop.stop)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_stop_signal, signal.Signals(signum).name)
    if hasattr(signal, "SIGHUP"):
        # "Reload", by the convention of nginx and gunicorn, and never "stop": the default
        # action would kill the server without draining it.
        loop.add_signal_handler(signal.SIGHUP, log.info, "SIGHUP: reload: nothing to reload; still serving")

    reporter = StatsReporter(collector, log, options.stats_interval)
    server.on_fd_exhausted = stats_server.on_fd_exhausted = reporter.fds_exhausted
    if hasattr(signal, "SIGUSR1"):
        loop.add_signal_handler(signal.SIGUSR1, reporter.log_now)

    log.info("%s", describe_budget(fd_limit, budget, max_connections))
    # Scripts look for exactly one "listening on" line: the first address.
    log.info("listening on %s (backend %s, app %s)", format_address(server.address), loop.backend.name, options.app)
    if len(server.sockets) > 1:
        log.info("also on %s", ", ".join(format_address(address) for address in server.addresses[1:]))
    if stats_server.sockets:
        log.info("stats on http://%s", format_address(stats_server.address, url=True))
        public = [address for address in stats_server.addresses if not is_loopback(address)]
        if public:
            log.warning(
                "the stats endpoint listens on %s, not loopback: anyone who can reach it sees the server's figures",
                ", ".join(format_address(address) for address in public),
            )
    reporter.start()
    try:
        loop.run_forever()
    finally:
        close_all()
    log.info(
        "stopped: %d connections accepted, %d refused, %d closed idle, %d bytes in, %d bytes out, %d loop iterations",
        server.connections_accepted,
        server.connections_refused,
        server.connections_idle_closed,
        server.bytes_in,
        server.bytes_out,
        loop.iterations,
    )
