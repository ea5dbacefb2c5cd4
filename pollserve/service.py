"""One running server, assembled from checked options: fd budget, loop, listeners, stats, signals.

cli.py checks the arguments and owns exit codes and messages; this module
turns options it has checked into a running process in its role -- the single
server, the supervising parent of ``--workers``, or one of its workers, an
object each (SingleServer, SupervisingParent, WorkerServer), whose signal
handlers come from the one table in pollserve.roles -- and runs it until a
signal stops it.  Errors a user can cause surface as LimitError (an fd limit
that cannot be had) or ListenError (an address that cannot be bound), raised
before anything is served.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import ipaddress
import logging
import signal
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, cast

import psutil

from .apps import ProtocolFactory, StreamHandler, is_stream_handler
from .backends import Backend
from .dashboard import page
from .health import LoopHealth
from .http import Budgeted, HTTPEndpoint, Response, Route, Slots
from .limits import Budget, FdLimit, LimitError, connection_budget, set_fd_limit
from .listeners import DEFAULT_BACKLOG, SocketFile, adopt, bind_tcp, bind_unix
from .loop import DEFAULT_SLOW_CALLBACK, EventLoop
from .proxy import Network, ProxyLayerFactory
from .rates import RateLimit
from .roles import Action, Role, install
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

if TYPE_CHECKING:
    from .handlers import HandlerApp

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
#: seconds and a dashboard polling every second.  Each /metrics or /stats answer renders a
#: snapshot, so this bounds what a flood of them takes from the app: past it they share their last
#: render (http.Budgeted), so that the operator's own request, lost among a flood's, is answered
#: too; other paths get 429
STATS_RATE = 25.0
STATS_BURST = 25
#: past the budget, the oldest render /stats or /metrics may share, in seconds
STATS_MAX_AGE = 1.0
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
    #: a protocol class or factory, or an ``async def handler(reader, writer)`` (pollserve.handlers)
    factory: ProtocolFactory | StreamHandler
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


def stats_routes(
    collector: StatsCollector | SupervisorStats, health: Health | None = None, renders: RateLimit | None = None
) -> dict[str, Route]:
    """The endpoint's pages, from one server's collector or a supervisor's view of its workers;
    with ``renders``, /stats and /metrics render within that budget (http.Budgeted)."""

    def stats() -> tuple[str, bytes]:
        return "application/json", collector.json().encode() + b"\n"

    def metrics() -> tuple[str, bytes]:
        return PROMETHEUS_CONTENT_TYPE, collector.metrics().encode()

    dashboard = page()  # the live dashboard (pollserve.dashboard): read and its response built once, here
    snapshots: dict[str, Route] = {"/stats": stats, "/metrics": metrics}
    if renders is not None:
        snapshots = {path: Budgeted(route, renders, STATS_MAX_AGE) for path, route in snapshots.items()}
    return {**snapshots, "/healthz": (health or Health()).route, "/": lambda: dashboard}


def stats_endpoint(
    loop: EventLoop, collector: StatsCollector | SupervisorStats, health: Health, host: str, port: int | None
) -> Server:
    """The stats endpoint's server (not started), with the bounds that keep it from hurting the app."""
    budget = RateLimit(STATS_RATE, STATS_BURST)
    endpoint = functools.partial(
        HTTPEndpoint,
        stats_routes(collector, health, budget),
        loop.call_later,
        rate_limit=budget,
        # /stats and /metrics draw on the budget themselves, sharing their last answer past it
        own_limits={"/healthz": RateLimit(HEALTH_RATE, HEALTH_BURST), "/stats": None, "/metrics": None},
        slots=Slots(STATS_MAX_CONNECTIONS),
    )
    return Server(
        loop,
        endpoint,
        host,
        port or 0,
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


def summary_line(word: str, totals: Mapping[str, Any]) -> str:
    """The one line a server says when it is done (``stopped:``, a worker's ``finished:``), from a
    snapshot's counters: one server's, or the parent's sum over its workers."""
    return (
        f"{word}: {totals['connections_accepted']} connections accepted, {totals['connections_refused']} refused, "
        f"{totals['connections_idle_closed']} closed idle ({totals['connections_idle_reset']} reset), "
        f"{totals['bytes_in']} bytes in, {totals['bytes_out']} bytes out, {totals['loop_iterations']} loop iterations"
    )


@contextlib.contextmanager
def signal_blocked(signum: int) -> Iterator[None]:
    """signum is held pending in the block (where the OS can block signals: POSIX)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def serve(options: ServeOptions) -> None:
    """Run the process in the role the options give it (pollserve.roles) until a stop signal has
    drained it; raises LimitError, ListenError, or WorkerStartError."""
    role: SingleServer | WorkerServer | SupervisingParent
    if options.workers > 1:
        role = SupervisingParent(options)
    elif options.worker is not None:
        role = WorkerServer(options)
    else:
        role = SingleServer(options)
    role.run()


class AppServer:
    """What the single server and a worker share: one loop serving the app -- the fd budget, the
    layers, the listeners, the stats endpoint and views -- until a stop signal drains it.  Each
    subclass is a role (pollserve.roles): its listeners, its signal table, what it says.

    ``run`` is the whole life: the role's signal handlers before any listener (a stop from then on
    is a drain, never the default exit), the listeners, the connection budget, the lines that say
    it serves, the loop, then everything closed and one summary line.
    """

    role: ClassVar[Role]
    #: the summary line's first word
    summary = "stopped"
    #: said when --drain-delay starts: with workers, the parent's /healthz is the one that answers
    drain_note = "/healthz answers 503; "

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.fd_limit = set_fd_limit(options.max_fds)  # before the backend: /dev/poll sizes itself from it
        # A limit below what the server needs before any connection: said now, before the backend,
        # the listeners or the stats endpoint fail for want of an fd (EMFILE) somewhere inside.
        stats_passed = any(passed.name == STATS_NAME for passed in options.inherited)
        stats_reserve = STATS_MAX_CONNECTIONS if options.stats_port is not None or stats_passed else 0
        early = connection_budget(self.fd_limit.soft, fds_in_use(), stats_reserve, options.backend.capacity)
        if early.connections is not None and early.connections < 1:
            raise no_fds_left(early)
        #: an ``async def`` app's handlers (pollserve.handlers), served on the asyncio face of the loop
        self.handler_app: HandlerApp | None = None
        protocol_factory: ProtocolFactory
        loop: EventLoop
        if is_stream_handler(options.factory):
            from .aio.loop import AsyncioLoop  # asyncio is imported for the apps that need it only
            from .handlers import HandlerApp

            loop = AsyncioLoop(options.backend())
            self.handler_app = HandlerApp(cast(StreamHandler, options.factory), loop, options.app)
            protocol_factory = cast(ProtocolFactory, self.handler_app)
        else:
            loop = EventLoop(options.backend())
            protocol_factory = cast(ProtocolFactory, options.factory)
        self.loop = loop
        # --tls-cert: a layer in front of the app, stacked only when asked for; a PROXY header
        # comes before the TLS handshake, so that layer goes in front of this one.
        self.tls_layer = TLSLayerFactory(protocol_factory, loop, options.tls) if options.tls is not None else None
        app_factory = self.tls_layer or protocol_factory
        # --proxy-protocol: a layer in front of the app, stacked only when asked for.
        self.proxy_layer = (
            ProxyLayerFactory(app_factory, loop, allowed=options.proxy_from) if options.proxy_protocol else None
        )
        self.server = self.make_server(self.proxy_layer or app_factory)
        self.loop_health = LoopHealth(loop, log, options.slow_callback)
        self.collector = StatsCollector(loop, self.server, self.tls_layer, self.loop_health)
        self.health = Health()
        # The endpoint's own connections are kept out of the app's counters: a Server of its own.
        self.stats_server = stats_endpoint(loop, self.collector, self.health, options.stats_host, options.stats_port)
        self.reporter = StatsReporter(self.collector, log, options.stats_interval)
        self.server.on_fd_exhausted = self.stats_server.on_fd_exhausted = self.reporter.fds_exhausted
        #: --unix: the socket file made, removed once on the way out
        self.socket_files: list[SocketFile] = []
        #: a stop signal came
        self.stopping = False

    def make_server(self, factory: ProtocolFactory) -> Server:
        """The app's server; for a handler app, the one that lets its handlers end in a shutdown."""
        options = self.options
        where = (self.loop, factory, options.host, options.port)
        if self.handler_app is not None:
            from .handlers import HandlerServer

            return HandlerServer(self.handler_app, *where, app=options.app, idle_timeout=options.idle_timeout)
        return Server(*where, app=options.app, idle_timeout=options.idle_timeout)

    def handlers(self) -> dict[Action, Callable[[str], Any]]:
        """The role's methods for the actions of its column in pollserve.roles.SIGNALS."""
        return {Action.STOP: self.stop, Action.LOG_STATS: self.log_stats}

    # -- the life of the process -------------------------------------------------------------

    def run(self) -> None:
        try:
            install(self.loop, self.role, self.handlers())
            self.listen()
            max_connections = self.plan_connections()
        except BaseException:
            self.close()
            raise
        self.begin(max_connections)
        try:
            self.loop.run_forever()
        finally:
            self.close()
        self.log_summary()

    def listen(self) -> None:
        """Start the listeners; ListenError for one that cannot be."""
        raise NotImplementedError

    def start_listener(self, listener: Server, host: str, port: int | None, option: str) -> None:
        try:
            listener.start()
        except OSError as exc:
            raise listen_error(exc, host, port, option) from None

    def plan_connections(self) -> int | None:
        """The connection limit the fds allow once the listeners are open; LimitError for none."""
        stats_reserve = (self.stats_server.max_connections or 0) if self.stats_server.sockets else 0
        budget = connection_budget(self.fd_limit.soft, fds_in_use(), stats_reserve, self.loop.backend.capacity)
        max_connections = self.options.max_connections or budget.connections
        if budget.connections is not None and max_connections is not None and max_connections > budget.connections:
            raise LimitError(
                f"--max-connections {max_connections} is more than the fds allow: at most {budget.connections} "
                f"with {budget.bound} and {budget.reserve} fds in reserve (raise --max-fds, or the hard limit)"
            )
        if max_connections is not None and max_connections < 1:
            raise no_fds_left(budget)
        self.server.max_connections = max_connections
        log.info("%s", describe_budget(self.fd_limit, budget, max_connections))
        return max_connections

    def begin(self, max_connections: int | None) -> None:
        """Say what is served where, tell whoever waits for it, start the timers."""
        options, server = self.options, self.server
        self.log_listening()
        if len(server.sockets) > 1:
            log.info("also on %s", ", ".join(format_address(address) for address in server.addresses[1:]))
        if self.stats_server.sockets:
            log.info("stats on http://%s", format_address(self.stats_server.address, url=True))
            public = [address for address in self.stats_server.addresses if not is_loopback(address)]
            if public:
                log.warning(
                    "the stats endpoint listens on %s, not loopback: anyone who can reach it sees the server's figures",
                    ", ".join(format_address(address) for address in public),
                )
        if self.proxy_layer is not None:
            senders = ", ".join(map(str, options.proxy_from)) if options.proxy_from else "any peer"
            log.info("PROXY protocol: every app connection must start with a v1 or v2 header, from %s", senders)
        if options.tls is not None:
            log.info("TLS: %s", options.tls.describe())
        self.ready()
        self.reporter.start()
        self.loop_health.start()

    def log_listening(self) -> None:
        raise NotImplementedError

    def ready(self) -> None:
        """Serving: tell whoever waits for it."""

    def close(self) -> None:
        self.remove_socket_files()
        self.loop_health.close()
        self.server.close()
        self.stats_server.close()
        if self.proxy_layer is not None:
            self.proxy_layer.close()
        if self.tls_layer is not None:
            self.tls_layer.close()
        self.loop.close()

    def remove_socket_files(self) -> None:
        # --unix: once, and before the listener closes: while it is open the file's inode cannot be
        # freed and reused, so "the same device and inode" still means "the file we made".
        while self.socket_files:
            self.socket_files.pop().remove()

    def log_summary(self) -> None:
        server = self.server
        if self.proxy_layer is not None:
            log.info(
                "PROXY protocol: %d connections closed for a bad or missing header, %d from peers outside --proxy-from",
                self.proxy_layer.headers_rejected,
                self.proxy_layer.peers_refused,
            )
        if self.tls_layer is not None:
            log.info("TLS: %d handshakes, %d failed", self.tls_layer.handshakes, self.tls_layer.handshake_failures)
        totals = {
            "connections_accepted": server.connections_accepted,
            "connections_refused": server.connections_refused,
            "connections_idle_closed": server.connections_idle_closed,
            "connections_idle_reset": server.connections_idle_reset,
            "bytes_in": server.bytes_in,
            "bytes_out": server.bytes_out,
            "loop_iterations": self.loop.iterations,
        }
        log.info("%s", summary_line(self.summary, totals))

    # -- what the signals do (pollserve.roles) ------------------------------------------------

    def stop(self, signame: str) -> None:
        """STOP: drain -- after --drain-delay, while /healthz answers 503 -- then exit; a second one
        closes at once."""
        if self.stopping:  # a second signal: do not wait for slow clients
            self.close_now(f"{signame} again")
            return
        self.stopping = True
        options = self.options
        if options.notifier is not None:  # systemd counts the service as stopping from the signal on
            options.notifier.stopping(f"stopping: draining {len(self.server.connections)} connections")
        # The stats endpoint stays up to the end, so a balancer sees /healthz answer 503.
        self.health.draining = self.collector.draining = True
        if options.drain_delay > 0:
            log.info("%s: draining: %sstill accepting for %g s", signame, self.drain_note, options.drain_delay)
            self.loop.call_later(options.drain_delay, self.stop_serving, signame)
        else:
            self.stop_serving(signame)

    def stop_serving(self, signame: str) -> None:
        log.info("%s: no longer accepting; flushing %d connections", signame, len(self.server.connections))
        self.remove_socket_files()
        self.server.shutdown(self.options.shutdown_timeout, self.loop.stop)

    def close_now(self, why: str) -> None:
        log.warning("%s: closing now", why)
        self.remove_socket_files()
        self.server.close()
        self.loop.stop()

    def log_stats(self, signame: str) -> None:
        """LOG_STATS: the stats line, once."""
        self.reporter.log_now()


class SingleServer(AppServer):
    """``--workers 1``: this process serves, and answers to the operator and to systemd itself."""

    role = Role.SINGLE

    def handlers(self) -> dict[Action, Callable[[str], Any]]:
        return {**super().handlers(), Action.RELOAD: self.reload}

    def listen(self) -> None:
        """Sockets systemd passed take the place of binding (sd_listen_fds(3)); "stats" names the
        endpoint's.  Else host:port, the stats endpoint, and --unix."""
        options, server = self.options, self.server
        passed_app = [passed.sock for passed in options.inherited if passed.name != STATS_NAME]
        passed_stats = [passed.sock for passed in options.inherited if passed.name == STATS_NAME]
        if passed_app:
            server.start(passed_app)
        if passed_stats:
            self.stats_server.start(passed_stats)
        if options.tcp and not passed_app:
            self.start_listener(server, options.host, options.port, "--port")
        if options.stats_port is not None and not passed_stats:
            self.start_listener(self.stats_server, options.stats_host, options.stats_port, "--stats-port")
        if options.unix is not None and not passed_app:
            try:
                unix_socket, socket_file = bind_unix(options.unix, backlog=server.backlog, mode=options.unix_mode)
            except OSError as exc:
                where = format_address(options.unix)
                raise ListenError(f"cannot listen on {where} (--unix): {exc.strerror or exc}") from None
            self.socket_files.append(socket_file)
            server.start([unix_socket])  # after any TCP listener: "listening on" names host:port then

    def log_listening(self) -> None:
        options = self.options
        if options.inherited:
            passed_stats = any(passed.name == STATS_NAME for passed in options.inherited)
            ignored = ["--host", "--port", "--unix", *(["--stats-host", "--stats-port"] if passed_stats else [])]
            log.info(
                "socket activation: serving on the sockets systemd passed (%s); %s and %s are ignored",
                ", ".join(f"{passed.name} {format_address(passed.sock.getsockname())}" for passed in options.inherited),
                ", ".join(ignored[:-1]),
                ignored[-1],
            )
        # Scripts look for exactly one "listening on" line: the first address.
        address = format_address(self.server.address)
        log.info("listening on %s (backend %s, app %s)", address, self.loop.backend.name, self.options.app)

    def ready(self) -> None:
        if self.options.notifier is not None:  # Type=notify: systemd counts the service started from here
            self.options.notifier.ready(f"serving on {format_address(self.server.address)}")

    def reload(self, signame: str) -> None:
        """RELOAD: "reload", by the convention of nginx and gunicorn, and never "stop" (the default
        action would kill the server without draining it).  New handshakes get the new certificate;
        sessions go on."""
        if self.options.tls is not None:
            reload_certificates(self.options.tls, signame)
        else:
            log.info("%s: reload: nothing to reload; still serving", signame)


class WorkerServer(AppServer):
    """One of the workers of ``--workers N``: it serves on the listeners it inherited from the
    parent (or, with --reuse-port, its own) and takes its orders from the parent over the channel
    (workers.WorkerLink): ``retire`` (a rolling restart), ``close`` (the parent's second stop
    signal), and the channel's EOF (the parent is gone).  SIGINT and SIGHUP are the parent's."""

    role = Role.WORKER
    #: the parent says "stopped:" once, with the totals
    summary = "finished"
    drain_note = ""
    link: WorkerLink | None = None

    def __init__(self, options: ServeOptions) -> None:
        assert options.worker is not None
        self.worker = options.worker
        super().__init__(options)

    def listen(self) -> None:
        # The parent's listeners stand for host:port, --unix and systemd's sockets alike.
        try:
            listeners = worker_listeners(self.options)
        except OSError as exc:
            raise listen_error(exc, self.options.host, self.options.port, "--port") from None
        self.server.start(listeners)

    def begin(self, max_connections: int | None) -> None:
        # From here on the channel is the link's: before, a worker that cannot start still has it
        # to say why (workers.tell_parent_failed).
        self.link = WorkerLink(
            self.loop,
            self.worker,
            self.collector.snapshot,
            retire=lambda: self.server.retire(self.options.shutdown_timeout, self.loop.stop),
            close_now=lambda: self.close_now("the parent's order"),
            parent_gone=lambda: None if self.stopping else self.stop("the parent's exit"),
        )
        super().begin(max_connections)

    def log_listening(self) -> None:
        # The parent says "listening on", once for every worker.
        address = format_address(self.server.address)
        log.info("serving %s (backend %s, app %s)", address, self.loop.backend.name, self.options.app)

    def ready(self) -> None:
        assert self.link is not None
        self.link.ready()

    def stop(self, signame: str) -> None:
        """STOP, counted once: the same SIGTERM may come twice, straight and relayed by the parent
        (a group kill, KillMode=control-group), and only the parent's "close" order means "now"."""
        if self.stopping:
            log.info("%s again: still draining (the parent orders a close now, if it gets a second signal)", signame)
            return
        super().stop(signame)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()  # its last snapshot first: the parent's totals stay exact
        # On its way out, as while it drains, a SIGTERM changes nothing: a group kill reaches a
        # worker straight and again through the parent, which may relay it after this worker's loop
        # has closed and restored SIGTERM's default action.  Blocked meanwhile, one that comes is
        # held pending, and SIG_IGN discards it (sigaction(2), POSIX: "Setting a signal action to
        # SIG_IGN for a signal that is pending shall cause the pending signal to be discarded").
        with signal_blocked(signal.SIGTERM):
            super().close()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


class SupervisingParent:
    """``--workers N``: binds the listeners once, serves the stats endpoint, and runs the workers
    (workers.Supervisor) until a stop signal has stopped them all."""

    role = Role.PARENT

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.loop = EventLoop(options.backend())
        # The app's listeners, bound once here (or passed by systemd) and inherited by every worker.
        self.listeners = [passed.sock for passed in options.inherited if passed.name != STATS_NAME]
        self.socket_files: list[SocketFile] = []
        try:
            self.bind()
        except BaseException:
            self.close_listeners()
            self.loop.close()
            raise
        argv = list(options.argv)
        tcp_ports = [
            sock.getsockname()[1] for sock in self.listeners if sock.family in (socket.AF_INET, socket.AF_INET6)
        ]
        if tcp_ports:
            # The workers parse the same arguments; a later --port wins, so port 0 is the one found here.
            argv += ["--port", str(tcp_ports[0])]
        stop_timeout = options.drain_delay + options.shutdown_timeout + 2 * STOP_MARGIN
        self.supervisor = Supervisor(
            self.loop,
            options.workers,
            argv,
            [] if options.reuse_port else self.listeners,
            stop_timeout=stop_timeout,
            stop_rule=f"{stop_timeout:g} s: --drain-delay + --shutdown-timeout + {2 * STOP_MARGIN:g}",
            worker_timeout=options.worker_timeout,
            start_timeout=options.worker_start_timeout,
            on_first_ready=self.first_ready,
            on_all_stopped=self.loop.stop,
        )
        self.view = SupervisorStats(self.loop, self.supervisor)
        self.health = Health(lambda: (self.supervisor.serving, self.supervisor.count))
        self.stats_server = stats_endpoint(self.loop, self.view, self.health, options.stats_host, options.stats_port)
        try:
            self.listen_stats()
        except BaseException:
            self.close()
            raise

    def handlers(self) -> dict[Action, Callable[[str], Any]]:
        return {
            Action.STOP: self.stop,
            Action.RELOAD: self.reload,
            Action.LOG_STATS: self.log_stats,
            Action.REAP: self.reap,
        }

    def bind(self) -> None:
        options = self.options
        if not self.listeners and options.tcp:
            try:
                # With --reuse-port the parent only holds the port (bound, not listening), so that
                # --port 0 is resolved once; each worker listens on it with a socket of its own.
                self.listeners += bind_tcp(
                    options.host, options.port, listen=not options.reuse_port, reuse_port=options.reuse_port
                )
            except OSError as exc:
                raise listen_error(exc, options.host, options.port, "--port") from None
        if not options.inherited and options.unix is not None:
            try:
                unix_socket, socket_file = bind_unix(options.unix, backlog=DEFAULT_BACKLOG, mode=options.unix_mode)
            except OSError as exc:
                where = format_address(options.unix)
                raise ListenError(f"cannot listen on {where} (--unix): {exc.strerror or exc}") from None
            self.socket_files.append(socket_file)
            self.listeners.append(unix_socket)

    def listen_stats(self) -> None:
        options = self.options
        passed_stats = [passed.sock for passed in options.inherited if passed.name == STATS_NAME]
        if passed_stats:
            self.stats_server.start(passed_stats)
        elif options.stats_port is not None:
            try:
                self.stats_server.start()
            except OSError as exc:
                raise listen_error(exc, options.stats_host, options.stats_port, "--stats-port") from None

    def run(self) -> None:
        install(self.loop, self.role, self.handlers())
        # From the loop, so that a stop signal during start-up is handled between two starts.
        self.loop.call_soon(self.supervisor.start)
        try:
            self.loop.run_forever()
        finally:
            totals = self.view.snapshot()
            self.close()
        log.info("%s (%d workers)", summary_line("stopped", totals), self.options.workers)
        if self.supervisor.start_failure is not None:
            raise WorkerStartError(self.supervisor.start_failure)

    def first_ready(self) -> None:
        # Exactly one "listening on" line, once a worker accepts: the parent's, for all of them.
        options = self.options
        how = "own SO_REUSEPORT listeners" if options.reuse_port else "shared listeners"
        address = format_address(self.listeners[0].getsockname())
        log.info("listening on %s (backend %s, app %s)", address, self.loop.backend.name, options.app)
        log.info("%d workers on %s", options.workers, how)
        if len(self.listeners) > 1:
            log.info("also on %s", ", ".join(format_address(sock.getsockname()) for sock in self.listeners[1:]))
        if self.stats_server.sockets:
            log.info("stats on http://%s", format_address(self.stats_server.address, url=True))
        if options.notifier is not None:  # Type=notify: systemd counts the service started from here
            options.notifier.ready(f"serving on {address}, {how}")

    def close_listeners(self) -> None:
        while self.socket_files:  # before the socket closes: while it is open its inode is ours
            self.socket_files.pop().remove()
        for sock in self.listeners:
            sock.close()

    def close(self) -> None:
        self.supervisor.close()
        self.stats_server.close()
        self.close_listeners()
        self.loop.close()

    # -- what the signals do (pollserve.roles) ------------------------------------------------

    def stop(self, signame: str) -> None:
        """STOP: every worker drains as a single server does; /healthz answers 503 from the first
        signal on, while they do.  A second one: the workers close now."""
        self.health.draining = self.view.draining = True
        if self.options.notifier is not None and not self.supervisor.stopping:
            self.options.notifier.stopping(f"stopping {len(self.supervisor.workers)} workers")
        self.supervisor.stop(signame)

    def reload(self, signame: str) -> None:
        """RELOAD: a rolling restart."""
        self.supervisor.reload(signame)

    def log_stats(self, signame: str) -> None:
        """LOG_STATS: the whole server's line, from the workers' reports."""
        log.info("%s", self.view.log_line())

    def reap(self, signame: str) -> None:
        """REAP: SIGCHLD."""
        self.supervisor.reap()
