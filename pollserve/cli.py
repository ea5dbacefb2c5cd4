"""The ``pollserve`` command: run a server, or list the backends.

User errors (a backend this OS lacks, an app that does not import, an address
in use) are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

from . import __version__
from .apps import BUILTIN_APPS, AppError, load_app
from .backends import BACKENDS, BackendError, auto_backend, get_backend
from .http import HTTPEndpoint, Route
from .loop import EventLoop
from .probe import ProbeError, fetch_stats, probe_process
from .server import Server, format_address
from .stats import StatsCollector, StatsReporter, prometheus_text, table

log = logging.getLogger("pollserve")

ENV_BACKEND = "POLLSERVE_BACKEND"
BACKEND_CHOICES = ["auto", *BACKENDS]

#: exit status for usage errors, as argparse uses it
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pollserve",
        description="A TCP server on one event loop over select, poll, epoll, kqueue or devpoll.",
        epilog=f"Without a command, runs the server. {ENV_BACKEND} sets the backend when --backend is absent.",
    )
    parser.add_argument("--version", action="version", version=f"pollserve {__version__}")
    parser.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default=None,
        help=f"polling backend (default: ${ENV_BACKEND}, else auto: the best this OS has)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; ::1 for IPv6)")
    parser.add_argument("--port", type=int, default=5001, help="TCP port; 0 picks a free one (default: 5001)")
    parser.add_argument(
        "--app",
        default="hello",
        help=f"{' or '.join(BUILTIN_APPS)} (built in) or MODULE:FACTORY, a protocol class or factory (default: hello)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        help="default: info",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, how long to flush buffered replies before closing anyway (default: 5)",
    )
    parser.add_argument(
        "--stats-interval",
        type=float,
        metavar="SECONDS",
        help="log one line of fd and loop statistics every SECONDS (default: off)",
    )
    parser.add_argument(
        "--stats-port",
        type=int,
        metavar="PORT",
        help="serve GET /stats (JSON) and /metrics (Prometheus) on --host:PORT; 0 picks a port (default: off)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("backends", help="list the backends, whether this OS has them, and which auto picks")
    stats = commands.add_parser(
        "stats",
        help="show fd statistics of a running process (--pid) or pollserve server (--url)",
        description="Show file-descriptor statistics of a running process, read from outside with psutil "
        "(--pid), or of a pollserve server through its stats endpoint (--url).",
    )
    source = stats.add_mutually_exclusive_group(required=True)
    source.add_argument("--pid", type=int, help="any process: fds, limits, TCP sockets by state, listening addresses")
    source.add_argument("--url", help="a pollserve stats endpoint, e.g. http://127.0.0.1:9100 or .../stats")
    stats.add_argument("--json", action="store_true", help="print JSON (one object per line with --watch)")
    stats.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    return parser


#: the Content-Type Prometheus expects for text exposition format 0.0.4
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4"


def stats_routes(collector: StatsCollector) -> dict[str, Route]:
    def stats() -> tuple[str, bytes]:
        return "application/json", collector.snapshot().to_json().encode() + b"\n"

    def metrics() -> tuple[str, bytes]:
        return PROMETHEUS_CONTENT_TYPE, prometheus_text(collector.snapshot()).encode()

    return {"/stats": stats, "/metrics": metrics}


def fail(message: str, status: int = 1) -> int:
    print(f"pollserve: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "backends":
        return show_backends()
    if args.command == "stats":
        return show_stats(args)
    return serve(args)


def show_backends() -> int:
    auto = auto_backend().name
    rows = [("backend", "available", "capacity", "auto")]
    for name, cls in BACKENDS.items():
        available = cls.is_available()
        if cls.capacity is not None:
            capacity = f"fd < {cls.capacity}"
        elif name == "select":
            capacity = "512 sockets"  # Windows: a count, not an fd number
        else:
            capacity = "unbounded"
        rows.append((name, "yes" if available else "no", capacity, "<- auto" if name == auto else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}".rstrip())
    return 0


def show_stats(args: argparse.Namespace) -> int:
    if args.watch is not None and not args.watch > 0:
        return fail("--watch needs a positive number of seconds", EXIT_USAGE)
    try:
        while True:
            try:
                data = probe_process(args.pid) if args.pid is not None else fetch_stats(args.url)
            except ProbeError as exc:
                return fail(str(exc))
            if args.json:
                print(json.dumps(data), flush=True)
            else:
                if args.watch is not None:
                    print(time.strftime("-- %Y-%m-%d %H:%M:%S"))
                print(table(data), flush=True)
            if args.watch is None:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def check_port(option: str, port: int | None) -> str | None:
    if port is not None and not 0 <= port <= 65535:
        return f"{option} {port} is out of range 0-65535"
    return None


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    backend_name = args.backend or os.environ.get(ENV_BACKEND) or "auto"
    try:
        backend_class = get_backend(backend_name)
        factory = load_app(args.app)
    except (BackendError, AppError) as exc:
        return fail(str(exc), EXIT_USAGE)
    problem = check_port("port", args.port) or check_port("--stats-port", args.stats_port)
    if args.stats_interval is not None and not args.stats_interval > 0:
        problem = "--stats-interval needs a positive number of seconds"
    if problem:
        return fail(problem, EXIT_USAGE)

    loop = EventLoop(backend_class())
    server = Server(loop, factory, args.host, args.port)
    collector = StatsCollector(loop, server)
    # The endpoint's own connections are kept out of the app's counters: a Server of its own.
    endpoint = functools.partial(HTTPEndpoint, stats_routes(collector), loop.call_later)
    stats_server = Server(loop, endpoint, args.host, args.stats_port or 0)
    try:
        for listener, port in ((server, args.port), (stats_server, args.stats_port)):
            if port is not None:
                listener.start()
    except OSError as exc:
        server.close()
        stats_server.close()
        loop.close()
        where = format_address((args.host, port))
        return fail(f"cannot listen on {where}: {exc.strerror or exc}")

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
        server.shutdown(args.shutdown_timeout, loop.stop)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_stop_signal, signal.Signals(signum).name)

    reporter = StatsReporter(collector, log, args.stats_interval)
    if hasattr(signal, "SIGUSR1"):
        loop.add_signal_handler(signal.SIGUSR1, reporter.log_now)

    log.info(
        "listening on %s (backend %s, app %s)",
        format_address(server.address),
        loop.backend.name,
        args.app,
    )
    if stats_server.sockets:
        log.info("stats on http://%s", format_address(stats_server.address, url=True))
    reporter.start()
    try:
        loop.run_forever()
    finally:
        server.close()
        stats_server.close()
        loop.close()
    log.info(
        "stopped: %d connections accepted, %d refused, %d bytes in, %d bytes out, %d loop iterations",
        server.connections_accepted,
        server.connections_refused,
        server.bytes_in,
        server.bytes_out,
        loop.iterations,
    )
    return 0
