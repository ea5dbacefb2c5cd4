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
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import __version__, compiled
from .apps import BUILTIN_APPS, AppError, load_app
from .backends import BackendError, auto_backend, available_backends, get_backend, list_backends
from .limits import LimitError
from .loop import DEFAULT_SLOW_CALLBACK
from .probe import RETRY_WITHIN, ProbeArgumentError, ProbeError, fetch_stats, probe_process
from .proxy import Network, parse_networks
from .roles import Role, ignore_from_the_start
from .service import ListenError, ServeOptions
from .service import serve as run_server
from .stats import table
from .systemd import STATS_NAME, ActivationError, Notifier, listen_sockets
from .tls import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_TLS12_CIPHERS, ServerTLS, TLSConfigError, TLSOptions, parse_alpn
from .workers import (
    DEFAULT_WORKER_START_TIMEOUT,
    DEFAULT_WORKER_TIMEOUT,
    REPORT_INTERVAL,
    WORKER_ENV,
    WorkerRole,
    WorkerStartError,
    auto_count,
    capacity_problem,
    tell_parent_failed,
)

log = logging.getLogger("pollserve")

ENV_BACKEND = "POLLSERVE_BACKEND"

#: why an option may be given once only, for the ones that argparse would silently keep the last of
ONCE_ONLY = {
    "--host": "one --host is served; a name that resolves to several addresses (such as localhost) "
    "listens on each of them",
    "--unix": "one UNIX socket is served",
}

#: exit status for usage errors, as argparse uses it
EXIT_USAGE = 2
#: closes a connection idle this long by default: long enough for an interactive client or a
#: request/reply client between requests, short enough that connections whose client vanished
#: without a FIN (a host that lost power, a NAT that dropped the mapping: TCP alone never notices)
#: are reclaimed within minutes, before the ~350 s idle timeouts of common NATs and cloud balancers
DEFAULT_IDLE_TIMEOUT = 300.0


class GivenOnce(argparse.Action):
    """Stores the value as ``store`` does, and notes a second use in ``repeated``: serve() refuses
    it with one line, where argparse would silently keep the last."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        seen = vars(namespace).setdefault("given", set())
        if self.dest in seen:
            vars(namespace).setdefault("repeated", []).append(self.option_strings[0])
        seen.add(self.dest)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pollserve",
        # One line: argparse's generated synopsis of every option would bury the error below it.
        usage="%(prog)s [OPTIONS] | %(prog)s backends | %(prog)s stats ... | %(prog)s bench ... (see --help)",
        description="A TCP server on one event loop over select, poll, epoll, kqueue or devpoll.",
        epilog=f"Without a command, runs the server. {ENV_BACKEND} sets the backend when --backend is absent. "
        "Signals: SIGINT or SIGTERM drains and stops it (a second one: at once), SIGHUP reloads (with --workers, "
        "a rolling restart), SIGUSR1 logs the stats line; the README's signal table says what each does in a "
        "--workers parent and in its workers.",
    )
    parser.add_argument("--version", action="version", version=f"pollserve {__version__} ({compiled.build()})")
    parser.add_argument(
        "--backend",
        metavar="NAME",
        default=None,
        # Checked by the registry, not by argparse choices: plugins and MODULE:CLASS are names too.
        help=f"polling backend: auto, a name `pollserve backends` lists, or MODULE:CLASS "
        f"(default: ${ENV_BACKEND}, else auto: the best this OS has)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        action=GivenOnce,
        help="address to listen on (default: 127.0.0.1; ::1 for IPv6)",
    )
    parser.add_argument("--port", type=int, default=5001, help="TCP port; 0 picks a free one (default: 5001)")
    parser.add_argument(
        "--unix",
        metavar="PATH",
        action=GivenOnce,
        help="listen on a UNIX stream socket at PATH, and on TCP only if --port is given too (default: off)",
    )
    parser.add_argument(
        "--unix-mode",
        metavar="MODE",
        help="permissions of the --unix socket file, in octal such as 660 (default: what the umask leaves)",
    )
    parser.add_argument(
        "--app",
        default="hello",
        help=f"{' or '.join(BUILTIN_APPS)} (built in), or MODULE:NAME: an async def handler(reader, writer) as "
        "asyncio.start_server takes, or a protocol class or factory (default: hello)",
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
        help="on SIGINT/SIGTERM, how long to flush buffered replies (and let async def handlers end) before closing "
        "anyway; a client not yet given its whole reply is then reset (default: 5)",
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
        help=f"close a connection on which nothing moved for SECONDS: no byte either way, and its kernel send "
        f"queue did not shrink (a slow reader counts while its reads reopen its TCP window: keep the timeout "
        f"above twice its window over its read rate); one with bytes undelivered is reset; 0 disables "
        f"(default: {DEFAULT_IDLE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="every app connection starts with a PROXY header (v1 or v2, as HAProxy's send-proxy sends it) "
        "naming the real client; one without is closed (default: off)",
    )
    parser.add_argument(
        "--proxy-from",
        metavar="CIDR[,CIDR...]",
        help="with --proxy-protocol: only peers in these networks may connect (default: any)",
    )
    parser.add_argument(
        "--drain-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, answer 503 on /healthz and keep accepting for SECONDS before the shutdown, "
        "so a balancer takes the server out first (default: 0)",
    )
    parser.add_argument(
        "--slow-callback",
        type=float,
        default=DEFAULT_SLOW_CALLBACK,
        metavar="SECONDS",
        help="log a handler or callback that holds the loop longer than SECONDS, naming it (or the loop pass "
        "of several handlers that did); 0 disables "
        f"(default: {DEFAULT_SLOW_CALLBACK:g})",
    )
    parser.add_argument(
        "--workers",
        default="1",
        metavar="N",
        help="worker processes under a supervising parent; auto: one per CPU (default: 1, no parent)",
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="with --workers: each worker listens on its own SO_REUSEPORT socket (default: they share the parent's)",
    )
    parser.add_argument(
        "--worker-timeout",
        type=float,
        metavar="SECONDS",
        help="with --workers: kill and replace a worker whose loop has not reported for SECONDS since it "
        f"was ready; 0: never (default: {DEFAULT_WORKER_TIMEOUT:g})",
    )
    parser.add_argument(
        "--worker-start-timeout",
        type=float,
        metavar="SECONDS",
        help="with --workers: kill and restart (with back-off) a worker not ready SECONDS after it started; "
        f"0: never (default: {DEFAULT_WORKER_START_TIMEOUT:g})",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="serve the app over TLS with this PEM certificate chain; SIGHUP reloads it (default: off)",
    )
    parser.add_argument(
        "--tls-key", metavar="FILE", help="the PEM private key of --tls-cert (default: in the --tls-cert file)"
    )
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="verify client certificates against these PEM CA certificates when clients send one (default: off)",
    )
    parser.add_argument(
        "--tls-verify-client",
        action="store_true",
        help="with --tls-ca: refuse clients without a certificate that CA issued (mutual TLS)",
    )
    parser.add_argument(
        "--tls-handshake-timeout",
        type=float,
        metavar="SECONDS",
        help=f"close a client whose TLS handshake is not done in SECONDS (default: {DEFAULT_HANDSHAKE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--tls-alpn",
        metavar="LIST",
        help="comma-separated protocols offered through ALPN, preferred first, e.g. h2,http/1.1; a client whose "
        "ALPN names none of them is refused (no_application_protocol), one without ALPN is served (default: none)",
    )
    parser.add_argument(
        "--tls-ciphers",
        metavar="STRING",
        help=f"OpenSSL cipher string for the TLS 1.2 suites; TLS 1.3's are all AEAD (default: {DEFAULT_TLS12_CIPHERS})",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Each command names its own prog and usage: argparse would build them from the one-line usage above.
    commands.add_parser(
        "backends",
        prog="pollserve backends",
        usage="%(prog)s",
        help="list the backends, whether this OS has them, and which auto picks",
    )
    stats = commands.add_parser(
        "stats",
        prog="pollserve stats",
        usage="%(prog)s (--pid PID | --url URL) [--json] [--watch SECONDS]",
        help="show fd statistics of a running process (--pid) or pollserve server (--url)",
        description="Show file-descriptor statistics of a running process, read from outside with psutil "
        "(--pid), or of a pollserve server through its stats endpoint (--url).",
    )
    source = stats.add_mutually_exclusive_group(required=True)
    source.add_argument("--pid", type=int, help="any process: fds, limits, TCP sockets by state, listening addresses")
    source.add_argument(
        "--url",
        help="a pollserve stats endpoint, e.g. http://127.0.0.1:9100 or .../stats; one that answers 429 or 503 "
        f"with Retry-After is asked again when it says, for up to {RETRY_WITHIN:g} s",
    )
    stats.add_argument("--json", action="store_true", help="print JSON (one object per line with --watch)")
    stats.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    bench = commands.add_parser(
        "bench",
        prog="pollserve bench",
        usage="%(prog)s [--backends LIST] [--idle LIST] [--peers] [--json] [--plot FILE.png] ... (see --help)",
        help="which backend should I use here? server CPU per request, latency and RSS, by idle connections",
        description="Measure every backend available here (and, with --peers, asyncio and uvloop) under a paced "
        "load with 0, 1000 and 5000 idle connections: server CPU time per request, p50/p99 latency, RSS.",
    )
    bench.add_argument("--backends", metavar="LIST", help="comma-separated backends (default: all available here)")
    bench.add_argument(
        "--idle", default="0,1000,5000", metavar="LIST", help="idle connection counts (default: 0,1000,5000)"
    )
    bench.add_argument("--rate", type=float, default=2000.0, help="paced requests per second (default: 2000)")
    bench.add_argument("--connections", type=int, default=20, help="connections carrying the load (default: 20)")
    bench.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run (default: 3)")
    bench.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds per run (default: 1)")
    bench.add_argument("--peers", action="store_true", help="add asyncio (and uvloop, when installed) as rows")
    bench.add_argument("--json", action="store_true", help="print JSON instead of the table")
    bench.add_argument("--plot", metavar="FILE.png", help="draw CPU per request against idle connections (matplotlib)")
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
    "proxy_protocol",
    "proxy_from",
    "drain_delay",
    "slow_callback",
    "workers",
    "reuse_port",
    "worker_timeout",
    "worker_start_timeout",
    "unix",
    "unix_mode",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "tls_verify_client",
    "tls_handshake_timeout",
    "tls_alpn",
    "tls_ciphers",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is not None:
        given = server_options_given(argv)
        if given:
            options = ", ".join("--" + name.replace("_", "-") for name in given)
            verb = "applies" if len(given) == 1 else "apply"
            return fail(f"{options} {verb} to the server, not to 'pollserve {args.command}'", EXIT_USAGE)
    if args.command == "backends":
        return show_backends()
    if args.command == "stats":
        return show_stats(args)
    if args.command == "bench":
        return run_bench(args)
    return serve(args, list(argv) if argv is not None else sys.argv[1:])


def server_options_given(argv: Sequence[str] | None) -> list[str]:
    """The server options present on the command line, even at their default value: parsed again
    with a marker as every default, an option differs from the marker only if it was given."""
    absent = object()  # not a string: argparse converts string defaults through the option's type
    probe = build_parser()
    probe.set_defaults(**dict.fromkeys(SERVER_OPTIONS, absent))
    given = vars(probe.parse_args(argv))
    return [name for name in SERVER_OPTIONS if given[name] is not absent]


def run_bench(args: argparse.Namespace) -> int:
    from . import bench  # only for this command: the server does not pay for importing it

    available = available_backends()
    if args.backends is not None and not args.backends.strip(" ,"):
        return fail(f"--backends needs comma-separated names (available: {', '.join(available)})", EXIT_USAGE)
    names = [name.strip() for name in (args.backends or ",".join(available)).split(",") if name.strip()]
    for name in names:
        if name not in available:
            return fail(f"--backends: {name!r} is not available here (available: {', '.join(available)})", EXIT_USAGE)
    try:
        idle = [int(count) for count in args.idle.split(",")]
    except ValueError:
        return fail(f"--idle needs comma-separated numbers, not {args.idle!r}", EXIT_USAGE)
    problem = (
        (f"--idle needs counts of 0 or more, not {args.idle!r}" if any(count < 0 for count in idle) else None)
        or check_seconds("--rate", args.rate, zero_ok=False)
        or check_count("--connections", args.connections)
        or check_seconds("--seconds", args.seconds, zero_ok=False)
        or check_seconds("--warmup", args.warmup, zero_ok=True)
    )
    if problem:
        return fail(problem.replace("number of seconds", "number"), EXIT_USAGE)
    args.backends, args.idle, args.app = names, idle, "hello"
    return bench.main(args)


def show_backends() -> int:
    """The built-ins and every plugin installed; a plugin that cannot be used is one line on stderr
    and the others are listed all the same."""
    infos, problems = list_backends()
    for problem in problems:
        fail(problem)
    try:
        auto = auto_backend().name
    except BackendError as exc:  # POLLSERVE_AUTO_PLUGINS names something unusable
        fail(str(exc))
        auto = None
    rows = [("backend", "available", "capacity", "origin", "auto")]
    for info in infos:
        cls = info.backend
        if cls is None:
            capacity = "-"
        elif cls.capacity is not None:
            capacity = f"fd < {cls.capacity}"
        elif info.name == "select":
            capacity = "512 sockets"  # Windows: a count, not an fd number
        else:
            capacity = "unbounded"
        available = "yes" if info.available else "no"
        rows.append((info.name, available, capacity, info.origin, "<- auto" if info.name == auto else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [f"{cell:<{width}}" for cell, width in zip(row[:4], widths, strict=True)]
        print("  ".join([*cells, row[4]]).rstrip())
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
    except BrokenPipeError:
        # The reader has gone (`| head`): end quietly, as cat does.  stdout goes to /dev/null so
        # that Python's flush at exit does not fail on the closed pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
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


def check_host(option: str, host: str) -> str | None:
    """Brackets only around the whole address, as URLs write IPv6 (``[::1]``)."""
    inner = unbracket(host)
    if not inner or "[" in inner or "]" in inner:
        return f"{option} {host!r} is not a host name or address (brackets go around a whole IPv6 address)"
    return None


#: hosts that listen on every address of their family, so they share ports with every other host
WILDCARD_HOSTS = ("0.0.0.0", "::")


def same_port_conflicts(args: argparse.Namespace) -> str | None:
    """--port and --stats-port equal can only work on two different, specific addresses."""
    if not args.stats_port or args.stats_port != args.port:
        return None
    hosts = {unbracket(args.host), unbracket(args.stats_host)}
    if len(hosts) == 1 or hosts & set(WILDCARD_HOSTS):
        return f"--port and --stats-port are both {args.port}; give the stats endpoint a port of its own"
    return None


def check_count(option: str, value: int | None) -> str | None:
    if value is not None and value < 1:
        return f"{option} needs a positive number, not {value}"
    return None


def check_proxy_from(text: str | None, proxy_protocol: bool) -> tuple[tuple[Network, ...], str | None]:
    """--proxy-from's networks, or the problem; it means nothing without --proxy-protocol."""
    if text is None:
        return (), None
    if not proxy_protocol:
        return (), "--proxy-from needs --proxy-protocol: it says which peers may send the PROXY header"
    try:
        return parse_networks(text), None
    except ValueError as exc:
        return (), f"--proxy-from: {exc}"


def check_unix(path: str | None, mode: str | None) -> str | None:
    """--unix needs AF_UNIX and a path; --unix-mode needs --unix, and octal permissions."""
    if path is not None and not hasattr(socket, "AF_UNIX"):
        return "--unix needs UNIX domain sockets, which Python does not offer on this OS"
    if path is not None and not path:
        return "--unix needs a path"
    if mode is not None and path is None:
        return "--unix-mode applies to the --unix socket; give --unix PATH too"
    if mode is not None and not (1 <= len(mode) <= 4 and set(mode) <= set("01234567")):
        return f"--unix-mode needs octal permissions such as 660, not {mode!r}"
    return None


def check_workers(value: str) -> tuple[int, str | None]:
    """``--workers N`` or ``auto``: (count, problem)."""
    if value == "auto":
        return auto_count(), None
    try:
        count = int(value)
    except ValueError:
        return 0, f"--workers needs a positive number or auto, not {value!r}"
    return count, check_count("--workers", count)


def check_tls(args: argparse.Namespace) -> tuple[TLSOptions | None, str | None]:
    """The --tls-* options, or the problem; every one but --tls-cert needs --tls-cert.  The files
    are not read here (ServerTLS.load does)."""
    if args.tls_cert is None:
        names = ("tls_key", "tls_ca", "tls_handshake_timeout", "tls_alpn", "tls_ciphers")
        given = [name for name in names if getattr(args, name) is not None]
        given += ["tls_verify_client"] if args.tls_verify_client else []
        if given:
            option = "--" + given[0].replace("_", "-")
            return None, f"{option} needs --tls-cert: it applies to the TLS that the certificate enables"
        return None, None
    if args.tls_verify_client and args.tls_ca is None:
        return None, "--tls-verify-client needs --tls-ca: the CA certificates that client certificates must chain to"
    timeout = DEFAULT_HANDSHAKE_TIMEOUT if args.tls_handshake_timeout is None else args.tls_handshake_timeout
    problem = check_seconds("--tls-handshake-timeout", timeout, zero_ok=False)
    if problem:
        return None, problem
    try:
        alpn = parse_alpn(args.tls_alpn) if args.tls_alpn is not None else ()
    except ValueError as exc:
        return None, f"--tls-alpn: {exc}"
    options = TLSOptions(
        args.tls_cert, args.tls_key, args.tls_ca, args.tls_verify_client, timeout, alpn, args.tls_ciphers
    )
    return options, None


def import_from_current_directory() -> None:
    """MODULE:FACTORY and MODULE:CLASS import from the current directory, as gunicorn and uvicorn
    do; ``python -m`` puts it on sys.path, the ``pollserve`` script does not.  Added once pollserve
    is imported, so that a local file cannot stand in for pollserve itself."""
    here = os.getcwd()
    if not any(os.path.abspath(entry or os.curdir) == here for entry in sys.path):
        sys.path.insert(0, here)


def worker_role() -> WorkerRole | None:
    """This process is a worker of a supervising parent when WORKER_ENV says so.  Taken out of
    the environment, and its fds made close-on-exec, so that what the app starts inherits neither."""
    value = os.environ.pop(WORKER_ENV, None)
    if value is None:
        return None
    role = WorkerRole.from_env(value)
    role.keep_to_self()
    return role


def fail_as(role: WorkerRole | None, message: str, status: int = 1) -> int:
    """fail(), or in a worker (a reload whose new code does not start, say) a log line with the
    time and ``worker N:`` like every worker line, and the reason sent to the parent."""
    if role is None:
        return fail(message, status)
    log.error("%s", message)
    tell_parent_failed(role, message)
    return status


def serve(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    role = worker_role()
    prefix = "" if role is None else f"worker {role.index}: "
    if role is not None:
        # What a worker ignores (a Ctrl-C reaches the whole process group, and only the parent
        # counts it; SIGHUP is the parent's rolling restart), from the first moment, so that such a
        # signal during the app's import neither kills nor interrupts it.
        ignore_from_the_start(Role.WORKER)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {prefix}%(message)s",
        stream=sys.stderr,
    )
    repeated = getattr(args, "repeated", [])  # GivenOnce sets it
    if repeated:
        return fail(f"{repeated[0]} is given more than once: {ONCE_ONLY[repeated[0]]}", EXIT_USAGE)
    if args.backend == "":
        return fail("--backend needs a name: auto, or one `pollserve backends` lists", EXIT_USAGE)
    from_env = args.backend is None and bool(os.environ.get(ENV_BACKEND))
    backend_name = args.backend or os.environ.get(ENV_BACKEND) or "auto"
    if ":" in backend_name or ":" in args.app:
        import_from_current_directory()
    try:
        backend_class = get_backend(backend_name)
    except BackendError as exc:
        return fail_as(role, f"{ENV_BACKEND}={backend_name}: {exc}" if from_env else str(exc), EXIT_USAGE)
    try:
        factory = load_app(args.app)
    except AppError as exc:
        return fail_as(role, str(exc), EXIT_USAGE)
    problem = (
        check_host("--host", args.host)
        or check_host("--stats-host", args.stats_host)
        or check_port("--port", args.port)
        or check_port("--stats-port", args.stats_port)
        or check_seconds("--shutdown-timeout", args.shutdown_timeout, zero_ok=True)
        or check_seconds("--stats-interval", args.stats_interval, zero_ok=False)
        or check_seconds("--idle-timeout", args.idle_timeout, zero_ok=True)
        or check_count("--max-fds", args.max_fds)
        or check_count("--max-connections", args.max_connections)
    )
    # --unix alone listens on no TCP port: 5001 is the default of a TCP-only server
    tcp = args.unix is None or "port" in server_options_given(argv)
    problem = problem or (same_port_conflicts(args) if tcp else None)
    workers, workers_problem = check_workers(args.workers)
    problem = problem or workers_problem
    if not problem and args.reuse_port and workers < 2:
        problem = "--reuse-port needs --workers 2 or more: it gives each worker a listener of its own"
    worker_timeout = DEFAULT_WORKER_TIMEOUT if args.worker_timeout is None else args.worker_timeout
    if not problem and args.worker_timeout is not None and workers < 2:
        problem = "--worker-timeout needs --workers 2 or more: it is how the parent finds a hung worker"
    problem = problem or check_seconds("--worker-timeout", worker_timeout, zero_ok=True)
    if not problem and 0 < worker_timeout < 2 * REPORT_INTERVAL:
        problem = (
            f"--worker-timeout {worker_timeout:g} is shorter than two of the workers' reports "
            f"({REPORT_INTERVAL:g} s apart): give 0 (off) or at least {2 * REPORT_INTERVAL:g}"
        )
    start_timeout = DEFAULT_WORKER_START_TIMEOUT if args.worker_start_timeout is None else args.worker_start_timeout
    if not problem and args.worker_start_timeout is not None and workers < 2:
        problem = "--worker-start-timeout needs --workers 2 or more: it bounds a worker's start-up"
    problem = problem or check_seconds("--worker-start-timeout", start_timeout, zero_ok=True)
    if not problem and args.reuse_port and not hasattr(socket, "SO_REUSEPORT"):
        problem = "--reuse-port needs SO_REUSEPORT, which this OS does not have"
    problem = problem or check_unix(args.unix, args.unix_mode)
    if not problem and args.unix is not None and args.reuse_port:
        problem = "--reuse-port is for TCP: with --unix the workers share the parent's socket"
    proxy_from, proxy_problem = check_proxy_from(args.proxy_from, args.proxy_protocol)
    problem = problem or proxy_problem or check_seconds("--drain-delay", args.drain_delay, zero_ok=True)
    problem = problem or check_seconds("--slow-callback", args.slow_callback, zero_ok=True)
    tls_options, tls_problem = check_tls(args)
    problem = problem or tls_problem
    if not problem and workers > 1 and role is None:
        problem = capacity_problem(workers)
    if problem:
        return fail_as(role, problem, EXIT_USAGE)
    # Loaded before anything binds, so a bad file is exit 2 and not a server that cannot handshake.
    # With --workers the parent only checks them: each worker loads its own.
    try:
        tls = ServerTLS.load(tls_options) if tls_options is not None else None
    except TLSConfigError as exc:
        return fail_as(role, str(exc), EXIT_USAGE)
    if role is not None:  # the parent serves the stats endpoint, and supervises
        args.stats_port, workers = None, 1
    # systemd's sockets and notify socket belong to the process it started: read once, not by workers.
    try:
        inherited = listen_sockets() if role is None else []
    except ActivationError as exc:
        return fail(str(exc))
    if inherited and all(passed.name == STATS_NAME for passed in inherited):
        return fail(f"socket activation: every socket systemd passed is named {STATS_NAME!r}; none is for the app")
    if inherited and args.reuse_port:
        return fail("--reuse-port does not apply to sockets systemd passed: the workers share them")
    notifier = Notifier.from_environment() if role is None else None
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
        tcp=tcp,
        unix=args.unix,
        unix_mode=None if args.unix_mode is None else int(args.unix_mode, 8),
        inherited=tuple(inherited),
        notifier=notifier,
        workers=workers,
        reuse_port=args.reuse_port,
        worker_timeout=worker_timeout,
        worker_start_timeout=start_timeout,
        argv=tuple(argv),
        worker=role,
        proxy_protocol=args.proxy_protocol,
        proxy_from=proxy_from,
        drain_delay=args.drain_delay,
        tls=tls,
        slow_callback=args.slow_callback,
    )
    try:
        run_server(options)
    except (LimitError, WorkerStartError) as exc:
        return fail_as(role, str(exc), EXIT_USAGE)
    except ListenError as exc:
        return fail_as(role, str(exc))
    return 0
