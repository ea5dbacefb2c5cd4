"""One running server, assembled from checked options: fd budget, loop, listeners, stats, signals.

cli.py checks the arguments and owns exit codes and messages; this module
turns options it has checked into a running server and runs it until a
signal stops it.  Errors a user can cause surface as LimitError (an fd limit
that cannot be had) or ListenError (an address that cannot be bound), raised
before anything is served.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import ipaddress
import logging
import signal
import socket
from collections.abc import Callable

import psutil

from .apps import ProtocolFactory
from .backends import Backend
from .dashboard import page
from .health import LoopHealth
from .http import HTTPEndpoint, Response, Route, Slots
from .limits import Budget, FdLimit, LimitError, connection_budget, set_fd_limit
from .listeners import DEFAULT_BACKLOG, SocketFile, adopt, bind_tcp, bind_unix
from .loop import DEFAULT_SLOW_CALLBACK, EventLoop
from .proxy import Network, ProxyLayerFactory
from .rates import RateLimit
from .server import Server, format_address
from .stats import StatsCollector, StatsReporter, count_fds
from .systemd import STATS_NAME, ListenSocket, Notifier
from .tls import ServerTLS, TLSLayerFactory, reload_certificates
from .workers import (
    DEFAULT_WORKER_START_TIMEOUT,
    DEFAULT_WORKER_TIMEOUT,
    Supervisor,
    SupervisorStats,
    WorkerLink,
    WorkerRole,
    WorkerStartError,
)

log = logging.getLogger("pollserve")

#: the Content-Type Prometheus expects for text exposition format 0.0.4
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4"

# The stats endpoint must stay cheap whatever is thrown at it, and reachable when the app's
# connections have used up their budget: its fds are part of the reserve.  And it is a balancer's
# health check: no crowd of slow clients and no flood of other requests may keep /healthz from
# answering, or make it answer anything but the truth.
#: stats connections held at once; a newcomer past them closes an older one (http.Slots says
#: which), so its fds are this many plus the newcomer's
STATS_MAX_CONNECTIONS = 16
#: stats requests answered per second (and at once), /healthz apart: far above a scrape every few
#: seconds and a dashboard polling every second; the excess gets 429.  Each /metrics or /stats
#: answer renders a snapshot, so this bounds what a flood of them takes from the app
STATS_RATE = 25.0
STATS_BURST = 25
#: /healthz requests answered per second (and at once), from a bucket of their own: a flood of
#: /metrics or /stats cannot refuse a health check, and a flood of /healthz is bounded too
HEALTH_RATE = 20.0
HEALTH_BURST = 20
#: stats connections accepted per second (and at once); past that the listener is not watched
#: until the next token, so a connect flood waits in the kernel's backlog and costs the loop
#: little -- answering each of its requests, even with a refusal, took most of a core.  A health
#: check waits behind that backlog: N clients flooding take N / STATS_ACCEPT_RATE seconds to pass
STATS_ACCEPT_RATE = 600.0
STATS_ACCEPT_BURST = 600
#: accepts per wakeup on the stats listener, so a connect storm there takes a small share; at most
#: half the slots, so a client accepted in one wakeup is read in the next before it can be evicted
STATS_ACCEPT_BATCH = STATS_MAX_CONNECTIONS // 2
#: beyond --shutdown-timeout, what a worker's shutdown may take (its lingering closes) before the
#: parent kills it
STOP_MARGIN = 5.0


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
    #: listen on host:port; False for --unix without --port
    tcp: bool = True
    #: --unix: a UNIX stream socket's path, listened on after host:port; --unix-mode: its permissions
    unix: str | None = None
    unix_mode: int | None = None
    #: listening sockets systemd passed (socket activation): served on instead of host, port and unix
    inherited: tuple[ListenSocket, ...] = ()
    #: tells systemd when serving starts and when a shutdown does (sd_notify), when it asked to be told
    notifier: Notifier | None = None
    #: --workers: worker processes under a supervising parent (1: this process serves, no parent)
    workers: int = 1
    #: --reuse-port: each worker binds its own SO_REUSEPORT listener instead of inheriting the parent's
    reuse_port: bool = False
    #: --worker-timeout: a worker silent this long after ready is killed and replaced; 0: never
    worker_timeout: float = DEFAULT_WORKER_TIMEOUT
    #: --worker-start-timeout: a worker not ready this long after it started is killed and restarted; 0: never
    worker_start_timeout: float = DEFAULT_WORKER_START_TIMEOUT
    #: the command line after ``pollserve``, for the supervisor to start its workers with
    argv: tuple[str, ...] = ()
    #: set in a worker process: its index, channel and inherited listeners (workers.WORKER_ENV)
    worker: WorkerRole | None = None
    #: --proxy-protocol: every app connection starts with a PROXY header (pollserve.proxy);
    #: --proxy-from: the peers that may send one (empty: any)
    proxy_protocol: bool = False
    proxy_from: tuple[Network, ...] = ()
    #: --drain-delay: after the first stop signal, /healthz answers 503 and the app's listener
    #: keeps accepting this long, so a balancer takes the server out before it stops
    drain_delay: float = 0.0
    #: --tls-*: the app is served over TLS (pollserve.tls), with the files already loaded
    tls: ServerTLS | None = None
    #: --slow-callback: a handler or callback holding the loop longer is logged and counted (0: off)
    slow_callback: float = DEFAULT_SLOW_CALLBACK


class ListenError(Exception):
    """An address that cannot be bound; the message is meant for the user as it is."""


#: the option that names the host of each port option
HOST_OPTION = {"--port": "--host", "--stats-port": "--stats-host"}


def listen_error(exc: OSError, host: str, port: int | None, option: str) -> ListenError:
    """One line for an address that cannot be bound, naming the option at fault: the host's when
    the name does not resolve or is no address of this machine, else the port's."""
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        option = HOST_OPTION[option]
    where = exc.filename or format_address((host, port))
    return ListenError(f"cannot listen on {where} ({option}): {exc.strerror or exc}")


class Health:
    """What ``GET /healthz`` tells a balancer: 200 while serving, 503 from the first stop signal
    on, so that its health check takes the server out before the listener closes.  A supervising
    parent passes ``workers`` (serving, wanted): 200 ``ok 2/2 workers`` while at least one serves,
    503 ``no worker serving`` while none does."""

    def __init__(self, workers: Callable[[], tuple[int, int]] | None = None) -> None:
        self.draining = False
        self.workers = workers

    SERVING = Response("text/plain; charset=utf-8", b"ok\n")
    DRAINING = Response("text/plain; charset=utf-8", b"draining\n", status=503)
    NO_WORKER = Response("text/plain; charset=utf-8", b"no worker serving\n", status=503)

    def route(self) -> Response:
        if self.draining:
            return self.DRAINING
        if self.workers is None:
            return self.SERVING
        serving, wanted = self.workers()
        if not serving:
            return self.NO_WORKER
        return Response("text/plain; charset=utf-8", f"ok {serving}/{wanted} workers\n".encode())


def stats_routes(collector: StatsCollector | SupervisorStats, health: Health | None = None) -> dict[str, Route]:
    """The endpoint's pages, from one server's collector or a supervisor's view of its workers."""

    def stats() -> tuple[str, bytes]:
        return "application/json", collector.json().encode() + b"\n"

    def metrics() -> tuple[str, bytes]:
        return PROMETHEUS_CONTENT_TYPE, collector.metrics().encode()

    dashboard = page()  # the live dashboard (pollserve.dashboard): read and its response built once, here
    return {"/stats": stats, "/metrics": metrics, "/healthz": (health or Health()).route, "/": lambda: dashboard}


def stats_endpoint(
    loop: EventLoop, collector: StatsCollector | SupervisorStats, health: Health, options: ServeOptions
) -> Server:
    """The stats endpoint's server (not started), with the bounds that keep it from hurting the app."""
    endpoint = functools.partial(
        HTTPEndpoint,
        stats_routes(collector, health),
        loop.call_later,
        rate_limit=RateLimit(STATS_RATE, STATS_BURST),
        own_limits={"/healthz": RateLimit(HEALTH_RATE, HEALTH_BURST)},
        slots=Slots(STATS_MAX_CONNECTIONS),
    )
    return Server(
        loop,
        endpoint,
        options.stats_host,
        options.stats_port or 0,
        name="stats",
        # the held connections and the newcomer that makes room; never reached while Slots makes room
        max_connections=STATS_MAX_CONNECTIONS + 1,
        refuse_excess=False,
        accept_batch=STATS_ACCEPT_BATCH,
        accept_rate=RateLimit(STATS_ACCEPT_RATE, STATS_ACCEPT_BURST),
    )


def fds_in_use() -> int:
    try:
        return count_fds(psutil.Process())
    except (OSError, psutil.Error):
        return 0  # unknown: the spare fds in the reserve have to do


def is_loopback(address: object) -> bool:
    if isinstance(address, (str, bytes)):  # a UNIX socket (systemd may pass one): this host's only
        return True
    try:
        return ipaddress.ip_address(str(address[0]).split("%")[0]).is_loopback  # type: ignore[index]
    except (ValueError, TypeError, IndexError):
        return False


def no_fds_left(budget: Budget) -> LimitError:
    return LimitError(
        f"no fds left for connections: {budget.bound} leaves none once {budget.reserve} are kept in reserve"
    )


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


def worker_listeners(options: ServeOptions) -> list[socket.socket]:
    """A worker's listeners: the parent's, inherited, or with --reuse-port its own on the same port."""
    assert options.worker is not None
    if options.reuse_port:
        return bind_tcp(options.host, options.port, reuse_port=True)
    return [adopt(socket.socket(fileno=fd)) for fd in options.worker.listen_fds]


def serve(options: ServeOptions) -> None:
    """Run until SIGINT/SIGTERM has drained the app's connections; raises LimitError or ListenError."""
    fd_limit = set_fd_limit(options.max_fds)  # before the backend: /dev/poll sizes itself from it
    # A limit below what the server needs before any connection: said now, before the backend,
    # the listeners or the stats endpoint fail for want of an fd (EMFILE) somewhere inside.
    stats_passed = any(passed.name == STATS_NAME for passed in options.inherited)
    stats_reserve = STATS_MAX_CONNECTIONS if options.stats_port is not None or stats_passed else 0
    early = connection_budget(fd_limit.soft, fds_in_use(), stats_reserve, options.backend.capacity)
    if early.connections is not None and early.connections < 1:
        raise no_fds_left(early)
    loop = EventLoop(options.backend())
    # --tls-cert: a layer in front of the app, stacked only when asked for; a PROXY header
    # comes before the TLS handshake, so that layer goes in front of this one.
    tls_layer = TLSLayerFactory(options.factory, loop, options.tls) if options.tls is not None else None
    app_factory = tls_layer or options.factory
    # --proxy-protocol: a layer in front of the app, stacked only when asked for.
    proxy_layer = ProxyLayerFactory(app_factory, loop, allowed=options.proxy_from) if options.proxy_protocol else None
    server = Server(
        loop,
        proxy_layer or app_factory,
        options.host,
        options.port,
        app=options.app,
        idle_timeout=options.idle_timeout,
    )
    loop_health = LoopHealth(loop, log, options.slow_callback)
    collector = StatsCollector(loop, server, tls_layer, loop_health)
    health = Health()
    # The endpoint's own connections are kept out of the app's counters: a Server of its own.
    stats_server = stats_endpoint(loop, collector, health, options)

    socket_files: list[SocketFile] = []

    def remove_socket_files() -> None:
        # --unix: once, and before the listener closes: while it is open the file's inode cannot be
        # freed and reused, so "the same device and inode" still means "the file we made".
        while socket_files:
            socket_files.pop().remove()

    def close_all() -> None:
        remove_socket_files()
        loop_health.close()
        server.close()
        stats_server.close()
        if proxy_layer is not None:
            proxy_layer.close()
        if tls_layer is not None:
            tls_layer.close()
        loop.close()

    if options.worker is not None:
        # Before any listener: a SIGTERM from here on is a drain (with --reuse-port this worker's
        # listener has a queue of its own from the moment it is bound), never the default exit.
        loop.add_signal_handler(signal.SIGTERM, lambda: on_stop_signal("SIGTERM"))
    # Sockets systemd passed take the place of binding (sd_listen_fds(3)); "stats" names the endpoint's.
    passed_app = [passed.sock for passed in options.inherited if passed.name != STATS_NAME]
    passed_stats = [passed.sock for passed in options.inherited if passed.name == STATS_NAME]
    if options.worker is not None:
        # The parent's listeners stand for host:port, --unix and systemd's sockets alike.
        try:
            passed_app = worker_listeners(options)
        except OSError as exc:
            close_all()
            raise listen_error(exc, options.host, options.port, "--port") from None
    for listener, passed in ((server, passed_app), (stats_server, passed_stats)):
        if passed:
            listener.start(passed)
    for listener, host, port, option in (
        (server, options.host, options.port if options.tcp and not passed_app else None, "--port"),
        (stats_server, options.stats_host, None if passed_stats else options.stats_port, "--stats-port"),
    ):
        if port is None:
            continue
        try:
            listener.start()
        except OSError as exc:
            close_all()
            raise listen_error(exc, host, port, option) from None
    if options.unix is not None and not passed_app:
        try:
            unix_socket, socket_file = bind_unix(options.unix, backlog=server.backlog, mode=options.unix_mode)
        except OSError as exc:
            close_all()
            where = format_address(options.unix)
            raise ListenError(f"cannot listen on {where} (--unix): {exc.strerror or exc}") from None
        socket_files.append(socket_file)
        server.start([unix_socket])  # after any TCP listener: "listening on" names host:port then

    stats_reserve = (stats_server.max_connections or 0) if stats_server.sockets else 0
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
        raise no_fds_left(budget)
    server.max_connections = max_connections

    stopping = False

    def on_stop_signal(signame: str) -> None:
        nonlocal stopping
        if stopping and options.worker is not None:
            # The same SIGTERM may come twice, straight and relayed by the parent (a group kill,
            # KillMode=control-group): only the parent's "close" order means "now".
            log.info("%s again: still draining (the parent orders a close now, if it gets a second signal)", signame)
            return
        if stopping:  # a second signal: do not wait for slow clients
            close_now(f"{signame} again")
            return
        stopping = True
        if options.notifier is not None:  # systemd counts the service as stopping from the signal on
            options.notifier.stopping(f"stopping: draining {len(server.connections)} connections")
        # The stats endpoint stays up to the end, so a balancer sees /healthz answer 503.
        health.draining = collector.draining = True
        if options.drain_delay > 0:
            health_note = "" if options.worker is not None else "/healthz answers 503; "  # the parent's
            log.info("%s: draining: %sstill accepting for %g s", signame, health_note, options.drain_delay)
            loop.call_later(options.drain_delay, stop_serving, signame)
        else:
            stop_serving(signame)

    def close_now(why: str) -> None:
        log.warning("%s: closing now", why)
        remove_socket_files()
        server.close()
        loop.stop()

    def stop_serving(signame: str) -> None:
        log.info("%s: no longer accepting; flushing %d connections", signame, len(server.connections))
        remove_socket_files()
        server.shutdown(options.shutdown_timeout, loop.stop)

    link: WorkerLink | None = None
    if options.worker is not None:
        # A worker takes its orders from the parent: SIGTERM (drain; installed above), "retire"
        # (a rolling restart), "close" (the parent's second stop signal), and the channel's EOF
        # (the parent is gone).  SIGINT and SIGHUP are the parent's (cli.py ignores them here).
        link = WorkerLink(
            loop,
            options.worker,
            collector.snapshot,
            retire=lambda: server.retire(options.shutdown_timeout, loop.stop),
            close_now=lambda: close_now("the parent's order"),
            parent_gone=lambda: None if stopping else on_stop_signal("the parent's exit"),
        )
    for signum in (signal.SIGINT, signal.SIGTERM):
        if options.worker is None:
            loop.add_signal_handler(signum, on_stop_signal, signal.Signals(signum).name)
    if hasattr(signal, "SIGHUP") and options.worker is None:
        # "Reload", by the convention of nginx and gunicorn, and never "stop": the default
        # action would kill the server without draining it.
        if options.tls is not None:  # new handshakes get the new certificate; sessions go on
            loop.add_signal_handler(signal.SIGHUP, reload_certificates, options.tls)
        else:
            loop.add_signal_handler(signal.SIGHUP, log.info, "SIGHUP: reload: nothing to reload; still serving")

    reporter = StatsReporter(collector, log, options.stats_interval)
    server.on_fd_exhausted = stats_server.on_fd_exhausted = reporter.fds_exhausted
    if hasattr(signal, "SIGUSR1"):
        loop.add_signal_handler(signal.SIGUSR1, reporter.log_now)

    log.info("%s", describe_budget(fd_limit, budget, max_connections))
    if options.inherited:
        ignored = ["--host", "--port", "--unix", *(["--stats-host", "--stats-port"] if passed_stats else [])]
        log.info(
            "socket activation: serving on the sockets systemd passed (%s); %s and %s are ignored",
            ", ".join(f"{passed.name} {format_address(passed.sock.getsockname())}" for passed in options.inherited),
            ", ".join(ignored[:-1]),
            ignored[-1],
        )
    if link is not None:
        # The parent says "listening on", once for every worker.
        log.info("serving %s (backend %s, app %s)", format_address(server.address), loop.backend.name, options.app)
        link.ready()
    else:
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
    if proxy_layer is not None:
        senders = ", ".join(map(str, options.proxy_from)) if options.proxy_from else "any peer"
        log.info("PROXY protocol: every app connection must start with a v1 or v2 header, from %s", senders)
    if options.tls is not None:
        log.info("TLS: %s", options.tls.describe())
    if options.notifier is not None:  # Type=notify: systemd counts the service started from here
        options.notifier.ready(f"serving on {format_address(server.address)}")
    reporter.start()
    loop_health.start()
    try:
        loop.run_forever()
    finally:
        if link is not None:
            link.close()  # its last snapshot first: the parent's totals stay exact
        close_all()
    if proxy_layer is not None:
        log.info(
            "PROXY protocol: %d connections closed for a bad or missing header, %d from peers outside --proxy-from",
            proxy_layer.headers_rejected,
            proxy_layer.peers_refused,
        )
    if tls_layer is not None:
        log.info("TLS: %d handshakes, %d failed", tls_layer.handshakes, tls_layer.handshake_failures)
    log.info(
        "%s: %d connections accepted, %d refused, %d closed idle, %d bytes in, %d bytes out, %d loop iterations",
        "stopped" if link is None else "finished",  # the parent says "stopped:" once, with the totals
        server.connections_accepted,
        server.connections_refused,
        server.connections_idle_closed,
        server.bytes_in,
        server.bytes_out,
        loop.iterations,
    )


def serve_workers(options: ServeOptions) -> None:
    """The supervising parent of ``--workers N``: binds the listeners once, serves the stats
    endpoint, runs the workers (workers.Supervisor) until SIGINT/SIGTERM has stopped them all."""
    loop = EventLoop(options.backend())
    # The app's listeners, bound once here (or passed by systemd) and inherited by every worker.
    listeners = [passed.sock for passed in options.inherited if passed.name != STATS_NAME]
    passed_stats = [passed.sock for passed in options.inherited if passed.name == STATS_NAME]
    socket_files: list[SocketFile] = []

    def close_listeners() -> None:
        while socket_files:  # before the socket closes: while it is open its inode is ours
            socket_files.pop().remove()
        for sock in listeners:
            sock.close()

    if not listeners and options.tcp:
        try:
            # With --reuse-port the parent only holds the port (bound, not listening), so that
            # --port 0 is resolved once; each worker listens on it with a socket of its own.
            listeners += bind_tcp(
                options.host, options.port, listen=not options.reuse_port, reuse_port=options.reuse_port
            )
        except OSError as exc:
            loop.close()
            raise listen_error(exc, options.host, options.port, "--port") from None
    if not options.inherited and options.unix is not None:
        try:
            unix_socket, socket_file = bind_unix(options.unix, backlog=DEFAULT_BACKLOG, mode=options.unix_mode)
        except OSError as exc:
            close_listeners()
            loop.close()
            raise ListenError(
                f"cannot listen on {format_address(options.unix)} (--unix): {exc.strerror or exc}"
            ) from None
        socket_files.append(socket_file)
        listeners.append(unix_socket)
    argv = list(options.argv)
    tcp_ports = [sock.getsockname()[1] for sock in listeners if sock.family in (socket.AF_INET, socket.AF_INET6)]
    if tcp_ports:
        # The workers parse the same arguments; a later --port wins, so port 0 is the one found here.
        argv += ["--port", str(tcp_ports[0])]
    stop_timeout = options.drain_delay + options.shutdown_timeout + 2 * STOP_MARGIN
    supervisor = Supervisor(
        loop,
        options.workers,
        argv,
        [] if options.reuse_port else listeners,
        stop_timeout=stop_timeout,
        stop_rule=f"{stop_timeout:g} s: --drain-delay + --shutdown-timeout + {2 * STOP_MARGIN:g}",
        worker_timeout=options.worker_timeout,
        start_timeout=options.worker_start_timeout,
        on_all_stopped=loop.stop,
    )
    view = SupervisorStats(loop, supervisor)
    health = Health(lambda: (supervisor.serving, supervisor.count))
    stats_server = stats_endpoint(loop, view, health, options)

    def close_all() -> None:
        supervisor.close()
        stats_server.close()
        close_listeners()
        loop.close()

    if passed_stats:
        stats_server.start(passed_stats)
    elif options.stats_port is not None:
        try:
            stats_server.start()
        except OSError as exc:
            close_all()
            raise listen_error(exc, options.stats_host, options.stats_port, "--stats-port") from None

    def first_ready() -> None:
        # Exactly one "listening on" line, once a worker accepts: the parent's, for all of them.
        how = "own SO_REUSEPORT listeners" if options.reuse_port else "shared listeners"
        log.info(
            "listening on %s (backend %s, app %s)",
            format_address(listeners[0].getsockname()),
            loop.backend.name,
            options.app,
        )
        log.info("%d workers on %s", options.workers, how)
        if len(listeners) > 1:
            log.info("also on %s", ", ".join(format_address(sock.getsockname()) for sock in listeners[1:]))
        if stats_server.sockets:
            log.info("stats on http://%s", format_address(stats_server.address, url=True))
        if options.notifier is not None:  # Type=notify: systemd counts the service started from here
            options.notifier.ready(f"serving on {format_address(listeners[0].getsockname())}, {how}")

    supervisor.on_first_ready = first_ready

    def on_stop_signal(signame: str) -> None:
        health.draining = view.draining = True  # /healthz: 503 from the first signal on, while the workers drain
        if options.notifier is not None and not supervisor.stopping:
            options.notifier.stopping(f"stopping {len(supervisor.workers)} workers")
        supervisor.stop(signame)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_stop_signal, signal.Signals(signum).name)
    loop.add_signal_handler(signal.SIGHUP, supervisor.reload)
    loop.add_signal_handler(signal.SIGCHLD, supervisor.reap)
    # From the loop, so that a stop signal during start-up is handled between two starts.
    loop.call_soon(supervisor.start)
    try:
        loop.run_forever()
    finally:
        totals = view.snapshot()
        close_all()
    log.info(
        "stopped: %d connections accepted, %d refused, %d closed idle, %d bytes in, %d bytes out, %d loop iterations"
        " (%d workers)",
        totals["connections_accepted"],
        totals["connections_refused"],
        totals["connections_idle_closed"],
        totals["bytes_in"],
        totals["bytes_out"],
        totals["loop_iterations"],
        options.workers,
    )
    if supervisor.start_failure is not None:
        raise WorkerStartError(supervisor.start_failure)
