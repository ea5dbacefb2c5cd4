"""The ``pollserve`` command: run a server, or list the backends.

User errors (a backend this OS lacks, an app that does not import, an address
in use) are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from . import __version__
from .apps import BUILTIN_APPS, AppError, load_app
from .backends import BACKENDS, BackendError, auto_backend, get_backend
from .loop import EventLoop
from .server import Server, format_address

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
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("backends", help="list the backends, whether this OS has them, and which auto picks")
    return parser


def fail(message: str, status: int = 1) -> int:
    print(f"pollserve: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "backends":
        return show_backends()
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
    if not 0 <= args.port <= 65535:
        return fail(f"port {args.port} is out of range 0-65535", EXIT_USAGE)

    loop = EventLoop(backend_class())
    server = Server(loop, factory, args.host, args.port)
    try:
        server.start()
    except OSError as exc:
        loop.close()
        where = format_address((args.host, args.port))
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
        server.shutdown(args.shutdown_timeout, loop.stop)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_stop_signal, signal.Signals(signum).name)

    log.info(
        "listening on %s (backend %s, app %s)",
        format_address(server.address),
        loop.backend.name,
        args.app,
    )
    try:
        loop.run_forever()
    finally:
        server.close()
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
