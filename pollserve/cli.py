"""The ``pollserve`` command: run a server, or list the backends.

User errors (a backend this OS lacks, an app that does not import, an address
in use) are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence

from . import __version__
from .apps import BUILTIN_APPS, AppError, load_app
from .backends import BACKENDS, BackendError, auto_backend, get_backend
from .limits import LimitError
from .probe import ProbeArgumentError, ProbeError, fetch_stats, probe_process
from .service import ListenError, ServeOptions
from .service import serve as run_server
from .stats import table

ENV_BACKEND = "POLLSERVE_BACKEND"
BACKEND_CHOICES = ["auto", *BACKENDS]

#: exit status for usage errors, as argparse uses it
EXIT_USAGE = 2
#: closes a connection idle this long by default: long enough for an interactive client or a
#: request/reply client between requests, short enough that connections whose client vanished
#: without a FIN (a host that lost power, a NAT that dropped the mapping: TCP alone never notices)
#: are reclaimed within minutes, before the ~350 s idle timeouts of common NATs and cloud balancers
DEFAULT_IDLE_TIMEOUT = 300.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pollserve",
        # One line: argparse's generated synopsis of every option would bury the error below it.
        usage="%(prog)s [OPTIONS] | %(prog)s backends | %(prog)s stats (--pid PID | --url URL) ... (see --help)",
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
        help="serve GET /stats (JSON) and /metrics (Prometheus) on --stats-host:PORT; 0 picks a port (default: off)",
    )
    parser.add_argument(
        "--stats-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address of the stats endpoint, whatever --host is (default: 127.0.0.1)",
    )
    parser.add_argument(
        "--max-fds",
        type=int,
        metavar="N",
        help="set the soft fd limit (RLIMIT_NOFILE) to N at start (default: raise it to the hard limit)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="refuse clients past N open connections (default: what the fd limit allows after a reserve)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help=f"close a connection that has neither sent nor received for SECONDS; 0 disables "
        f"(default: {DEFAULT_IDLE_TIMEOUT:g})",
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


def fail(message: str, status: int = 1) -> int:
    print(f"pollserve: {message}", file=sys.stderr)
    return status


#: options of the server itself: meaningless with a command such as `backends`
SERVER_OPTIONS = (
    "backend",
    "host",
    "port",
    "app",
    "log_level",
    "shutdown_timeout",
    "stats_interval",
    "stats_port",
    "stats_host",
    "max_fds",
    "max_connections",
    "idle_timeout",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is not None:
        given = [name for name in SERVER_OPTIONS if getattr(args, name) != parser.get_default(name)]
        if given:
            options = ", ".join("--" + name.replace("_", "-") for name in given)
            return fail(f"{options} applies to the server, not to 'pollserve {args.command}'", EXIT_USAGE)
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
    problem = check_seconds("--watch", args.watch, zero_ok=False)
    if problem:
        return fail(problem, EXIT_USAGE)
    try:
        while True:
            try:
                data = probe_process(args.pid) if args.pid is not None else fetch_stats(args.url)
            except ProbeArgumentError as exc:
                return fail(str(exc), EXIT_USAGE)
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


def check_seconds(option: str, value: float | None, *, zero_ok: bool) -> str | None:
    """A finite number of seconds, positive (or zero where zero means "off")."""
    if value is None:
        return None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        kind = "a non-negative" if zero_ok else "a positive"
        return f"{option} needs {kind} number of seconds, not {value}"
    return None


def unbracket(host: str) -> str:
    """``[::1]`` as URLs write it is the host ``::1``."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def check_count(option: str, value: int | None) -> str | None:
    if value is not None and value < 1:
        return f"{option} needs a positive number, not {value}"
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
    problem = (
        check_port("port", args.port)
        or check_port("--stats-port", args.stats_port)
        or check_seconds("--shutdown-timeout", args.shutdown_timeout, zero_ok=True)
        or check_seconds("--stats-interval", args.stats_interval, zero_ok=False)
        or check_seconds("--idle-timeout", args.idle_timeout, zero_ok=True)
        or check_count("--max-fds", args.max_fds)
        or check_count("--max-connections", args.max_connections)
    )
    if not problem and args.stats_port and args.stats_port == args.port:
        problem = f"--port and --stats-port are both {args.port}; give the stats endpoint a port of its own"
    if problem:
        return fail(problem, EXIT_USAGE)
    options = ServeOptions(
        backend=backend_class,
        factory=factory,
        app=args.app,
        host=unbracket(args.host),
        port=args.port,
        shutdown_timeout=args.shutdown_timeout,
        stats_interval=args.stats_interval,
        stats_port=args.stats_port,
        stats_host=unbracket(args.stats_host),
        max_fds=args.max_fds,
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout or None,
    )
    try:
        run_server(options)
    except LimitError as exc:
        return fail(str(exc), EXIT_USAGE)
    except ListenError as exc:
        return fail(str(exc))
    return 0
