"""Requests per second of pollserve's ``hello`` and ``echo`` apps on every polling backend.

Each (target, app) pair gets a fresh server subprocess and a closed-loop load:
every client connection sends one request, waits for the whole reply, checks
it, and only then sends the next.  Throughput is therefore bounded by round
trips, and each round trip costs the server one wakeup of its polling backend.  The load generator runs in
separate processes (stdlib ``selectors``, non-blocking sockets) so that it does
not share an interpreter, or a GIL, with the server under test.

Run ``python benchmarks/bench_backends.py --help``; benchmarks/README.md says
how to read the table.  Timings never fail the run: the exit status is 1 only
when a server did not start or stop cleanly or a reply was wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import multiprocessing
import os
import platform
import queue
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import psutil

#: the only address the benchmark ever talks to
HOST = "127.0.0.1"
#: what a target must print (on stderr) once it accepts connections
LISTENING_RE = re.compile(r"listening on 127\.0\.0\.1:(\d+)\b")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
#: spawning a client process and connecting its sockets; generous for slow CI machines
READY_TIMEOUT = 30.0
#: how long a client process waits for the replies in flight when its window is over
DRAIN_TIMEOUT = 2.0

HELLO_REQUEST = b"ping\n"
HELLO_REPLY = b"Hello world\n"
APPS = ("hello", "echo")
#: error messages kept per client process (all errors are still counted)
MAX_ERROR_MESSAGES = 5


# -- targets ------------------------------------------------------------------
#
# A target is a name and a command line that starts a server on HOST, port 0,
# running the app named by "{app}" and logging LISTENING_RE on stderr, then
# exiting 0 on SIGTERM.  Other servers (asyncio, uvloop, ...) are added by
# returning more entries from targets(); the rest of the script is generic.


def pollserve_command(backend: str) -> list[str]:
    """The pollserve CLI on one backend; "{app}" is filled in per run."""
    return [
        sys.executable,
        "-m",
        "pollserve",
        "--backend",
        backend,
        "--app",
        "{app}",
        "--host",
        HOST,
        "--port",
        "0",
        "--log-level",
        "info",
    ]


def targets(backends: Sequence[str]) -> dict[str, list[str]]:
    """Target name -> command template, in table order."""
    return {backend: pollserve_command(backend) for backend in backends}


# -- the load generator (runs in child processes) --------------------------------


def exchange(app: str, size: int, index: int) -> tuple[bytes, bytes]:
    """(request, expected reply) for connection ``index``.

    Echo payloads differ per connection so a reply delivered to the wrong
    socket would not compare equal.
    """
    if app == "hello":
        return HELLO_REQUEST, HELLO_REPLY
    payload = bytes((index + i) % 251 for i in range(size))
    return payload, payload


class Client:
    """One connection's state: the request it repeats and the reply bytes so far."""

    __slots__ = ("index", "sock", "request", "reply", "received", "pending")

    def __init__(self, index: int, sock: socket.socket, request: bytes, reply: bytes) -> None:
        self.index = index
        self.sock = sock
        self.request = request
        self.reply = reply
        self.received = b""
        self.pending: memoryview | None = None  # the unsent tail of a request


@dataclasses.dataclass
class LoadResult:
    """What one client process measured.

    It crosses the pipe as a dict: in a spawned child this class lives in
    ``__mp_main__``, a module the parent could not unpickle it from.
    """

    connections: int = 0
    measured_requests: int = 0
    measured_seconds: float = 0.0
    total_requests: int = 0
    errors: int = 0
    messages: list[str] = dataclasses.field(default_factory=list)
    capped: bool = False


def connect_clients(port: int, app: str, size: int, first: int, count: int) -> list[Client]:
    """Blocking connects (with a timeout), then switch each socket to non-blocking."""
    clients = []
    for index in range(first, first + count):
        sock = socket.create_connection((HOST, port), timeout=10.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        request, reply = exchange(app, size, index)
        clients.append(Client(index, sock, request, reply))
    return clients


def run_load(clients: list[Client], warmup: float, seconds: float, max_requests: int) -> LoadResult:
    """Closed loop over all clients until the window ends or max_requests replies came.

    A reply counts when the select() call that delivered it returned inside
    [warmup, warmup + seconds); one clock read per wakeup keeps the client cheap.
    At the end no new requests go out, and the replies in flight are read (for
    at most DRAIN_TIMEOUT) before closing, so the server sees clean closes, not
    resets from sockets closed with unread data.
    """
    result = LoadResult(connections=len(clients))
    selector = selectors.DefaultSelector()
    read, read_write = selectors.EVENT_READ, selectors.EVENT_READ | selectors.EVENT_WRITE

    def close(client: Client) -> None:
        if client.sock.fileno() < 0:  # closed already
            return
        if client.sock in selector.get_map():  # not yet, if the very first send failed
            selector.unregister(client.sock)
        client.sock.close()

    def fail(client: Client, message: str) -> None:
        result.errors += 1
        if len(result.messages) < MAX_ERROR_MESSAGES:
            result.messages.append(f"connection {client.index}: {message}")
        close(client)

    def send_request(client: Client, data: bytes | memoryview, registered: bool) -> bool:
        """Send what the kernel takes; watch for writability only while a tail is left."""
        try:
            sent = client.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            fail(client, f"send failed: {exc}")
            return False
        was_pending = client.pending is not None
        client.pending = memoryview(data)[sent:] if sent < len(data) else None
        events = read if client.pending is None else read_write
        if not registered:
            selector.register(client.sock, events, client)
        elif was_pending != (client.pending is not None):
            selector.modify(client.sock, events, client)
        return True

    start = time.monotonic()
    window_start = start + warmup
    window_end = window_start + seconds
    for client in clients:
        send_request(client, client.request, registered=False)

    total = measured = 0
    stopped_at: float | None = None  # when the last requests went out
    deadline = window_end
    while selector.get_map():
        now = time.monotonic()
        if stopped_at is None and (now >= window_end or total >= max_requests):
            stopped_at, deadline = now, now + DRAIN_TIMEOUT
        if now >= deadline:
            break
        events = selector.select(min(deadline - now, 0.5))
        now = time.monotonic()
        counting = window_start <= now < window_end
        for key, mask in events:
            client = key.data
            pending = client.pending if mask & selectors.EVENT_WRITE else None
            if pending is not None and not send_request(client, pending, registered=True):
                continue
            if not mask & selectors.EVENT_READ:
                continue
            try:
                data = client.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                fail(client, f"recv failed: {exc}")
                continue
            if not data:
                fail(client, "server closed the connection")
                continue
            received = client.received + data if client.received else data
            if len(received) < len(client.reply):
                client.received = received
                continue
            client.received = b""
            if received != client.reply:
                fail(client, f"wrong reply: expected {len(client.reply)} bytes, got {received[:40]!r}")
                continue
            total += 1
            if counting:
                measured += 1
            if client.pending is not None:
                fail(client, "reply complete before the request was fully sent")
            elif stopped_at is not None or total >= max_requests:
                close(client)
            else:
                send_request(client, client.request, registered=True)

    end = window_end if stopped_at is None else min(stopped_at, window_end)
    result.capped = total >= max_requests
    result.total_requests = total
    result.measured_requests = measured
    result.measured_seconds = max(0.0, end - window_start)
    for client in clients:
        close(client)
    selector.close()
    return result


def client_process(
    pipe: Connection,
    port: int,
    app: str,
    size: int,
    first: int,
    count: int,
    warmup: float,
    seconds: float,
    max_requests: int,
) -> None:
    """Child entry point: connect, report ready, wait for "go", run, send the result.

    Connecting before "go" keeps connection setup out of every process's timing,
    and "go" lines up the client processes' windows.  If the parent has given
    up (its end of the pipe is closed), the child just exits.
    """
    try:
        try:
            clients = connect_clients(port, app, size, first, count)
        except OSError as exc:
            pipe.send(("error", f"cannot connect to {HOST}:{port}: {exc}"))
            return
        pipe.send(("ready", None))
        if pipe.recv() != "go":
            return
        try:
            result = run_load(clients, warmup, seconds, max_requests)
        except Exception:  # a bug here must reach the report, not die in a child's stderr
            pipe.send(("error", f"client process crashed:\n{traceback.format_exc()}"))
            return
        pipe.send(("result", dataclasses.asdict(result)))
    except (EOFError, BrokenPipeError):
        return


# -- the server under test ----------------------------------------------------------


class BenchError(Exception):
    """A failed run (server start/stop, load processes); the message is for the user."""


class ServerProcess:
    """A target server subprocess whose stderr a thread drains, so the pipe never fills."""

    def __init__(self, name: str, argv: list[str], **popen_kwargs: Any) -> None:
        self.name = name
        self.argv = argv
        self.popen_kwargs = popen_kwargs  # preexec_fn, env
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.tail: deque[str] = deque(maxlen=20)  # for error messages
        self.reader: threading.Thread | None = None

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with self.proc.stderr:
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                self.tail.append(line)
                self.lines.put(line)
        self.lines.put(None)

    def describe_tail(self) -> str:
        return "\n".join(f"    | {line}" for line in self.tail) or "    (no output)"

    def start(self) -> int:
        """Start the server and return its port, once it logged its listening line."""
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **self.popen_kwargs
        )
        self.reader = threading.Thread(target=self._drain, name=f"stderr-{self.name}", daemon=True)
        self.reader.start()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.0, remaining))
            except queue.Empty:
                self.kill()
                raise BenchError(
                    f"{self.name}: no 'listening on' line within {START_TIMEOUT:g} s:\n{self.describe_tail()}"
                ) from None
            if line is None:  # stderr closed: it exited (or closed stderr, which fails it too)
                try:
                    self.proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.kill()
                status = self.proc.returncode
                raise BenchError(f"{self.name}: exited with status {status} before listening:\n{self.describe_tail()}")
            match = LISTENING_RE.search(line)
            if match:
                return int(match.group(1))

    def kill(self) -> None:
        """SIGKILL this server's own PID, if it still runs, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.reader is not None:
            self.reader.join(timeout=5.0)

    def stop(self) -> None:
        """SIGTERM, then wait; raises BenchError unless the server exited 0 in time."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            self.kill()
            raise BenchError(
                f"{self.name}: died during the run with status {self.proc.returncode}:\n{self.describe_tail()}"
            )
        self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"{self.name}: still running {STOP_TIMEOUT:g} s after SIGTERM; killed it") from None
        if self.reader is not None:
            self.reader.join(timeout=5.0)
        if status != 0:
            raise BenchError(f"{self.name}: exited with status {status} after SIGTERM:\n{self.describe_tail()}")


# -- one run and the whole benchmark -------------------------------------------------


@dataclasses.dataclass
class RunResult:
    """One table cell: the client processes' results summed."""

    requests: int = 0
    seconds: float = 0.0  # the longest measured window among the client processes
    connections: int = 0
    errors: int = 0
    messages: list[str] = dataclasses.field(default_factory=list)
    capped: bool = False
    #: CPU seconds (user + system) the server used during the measured window
    server_cpu: float = 0.0
    server_cpu_seconds: float = 0.0  # the wall-clock window server_cpu was sampled over

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def server_cpu_us(self) -> float:
        """Server CPU per request: what the server costs, whatever the client could drive.

        On a 2-core machine the Python load generator saturates a core of its own,
        so requests/s partly measures the client; CPU per request does not.
        """
        if not self.requests or not self.seconds or not self.server_cpu_seconds:
            return 0.0
        requests_in_window = self.requests * self.server_cpu_seconds / self.seconds
        return self.server_cpu / requests_in_window * 1e6

    @property
    def latency_us(self) -> float:
        """Mean round trip: each connection does requests/connections trips in `seconds`."""
        if not self.requests:
            return 0.0
        return self.seconds * self.connections / self.requests * 1e6


def split(total: int, parts: int) -> list[int]:
    """``total`` clients over ``parts`` processes, as evenly as possible."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def generate_load(port: int, app: str, args: argparse.Namespace, server_pid: int) -> RunResult:
    """Start the client processes, line up their start, and sum what they measured."""
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads
    procs: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        first = 0
        for count in split(args.clients, args.client_procs):
            parent_end, child_end = context.Pipe()
            proc = context.Process(
                target=client_process,
                args=(child_end, port, app, args.size, first, count, args.warmup, args.seconds, args.max_requests),
                daemon=True,
            )
            proc.start()
            child_end.close()
            procs.append((proc, parent_end))
            first += count

        for _, pipe in procs:
            kind, detail = receive(pipe, READY_TIMEOUT, "connecting")
            if kind != "ready":
                raise BenchError(f"load generator: {detail}")
        for _, pipe in procs:
            pipe.send("go")
        # Sample the server's CPU over the clients' measured window (warmup excluded).
        time.sleep(args.warmup)
        cpu_start, wall_start = cpu_seconds(server_pid), time.monotonic()
        time.sleep(args.seconds)
        cpu_used, wall_used = cpu_seconds(server_pid) - cpu_start, time.monotonic() - wall_start

        total = RunResult(server_cpu=cpu_used, server_cpu_seconds=wall_used)
        budget = args.warmup + args.seconds + READY_TIMEOUT
        for _, pipe in procs:
            kind, detail = receive(pipe, budget, "running")
            if kind != "result":
                raise BenchError(f"load generator: {detail}")
            part = LoadResult(**detail)
            total.requests += part.measured_requests
            total.seconds = max(total.seconds, part.measured_seconds)
            total.connections += part.connections
            total.errors += part.errors
            total.messages += part.messages
            total.capped = total.capped or part.capped
        return total
    finally:
        for proc, pipe in procs:
            pipe.close()  # a child still waiting for "go" sees EOF and exits
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.terminate()  # this child only, by its own PID
                proc.join(timeout=5.0)


def receive(pipe: Connection, timeout: float, doing: str) -> tuple[str, Any]:
    """One message from a client process, or ("error", why) on a timeout or a dead child."""
    try:
        if not pipe.poll(timeout):
            return "error", f"a client process sent nothing for {timeout:g} s while {doing}"
        return pipe.recv()
    except (EOFError, OSError):
        return "error", f"a client process died while {doing}"


def run_one(name: str, template: list[str], app: str, args: argparse.Namespace) -> RunResult:
    """A fresh server for each (target, app), so no run inherits another's state."""
    server = ServerProcess(f"{name}/{app}", [part.replace("{app}", app) for part in template])
    port = server.start()
    try:
        assert server.proc is not None
        result = generate_load(port, app, args, server.proc.pid)
    except BaseException:
        server.kill()
        raise
    server.stop()
    return result


# -- report ------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Processor", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def header(args: argparse.Namespace, pollserve_version: str, started: datetime.datetime) -> list[str]:
    """Everything needed to compare two tables: the machine, the versions, the parameters."""
    python = f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})"
    return [
        "pollserve backend benchmark (closed loop, requests/s, higher is better)",
        f"date:       {started:%Y-%m-%d %H:%M:%S} UTC (start)",
        f"machine:    {platform.platform()}",
        f"cpu:        {cpu_model()}, {os.cpu_count()} logical CPUs",
        f"python:     {python}",
        f"pollserve:  {pollserve_version}",
        f"psutil:     {package_version('psutil')}",
        f"parameters: {args.clients} clients in {args.client_procs} process(es), "
        f"{args.seconds:g} s measured after {args.warmup:g} s warmup, echo payload {args.size} bytes, "
        f"cap {args.max_requests:,} requests per process",
    ]


def table(names: list[str], apps: list[str], results: dict[tuple[str, str], RunResult | None]) -> list[str]:
    """Rows are targets; per app: requests/s, ratio to the best target, mean latency."""
    best: dict[str, float] = {}
    for app in apps:
        rates = [r.rate for name in names if (r := results.get((name, app))) is not None]
        best[app] = max(rates, default=0.0)
    head = ["target"]
    for app in apps:
        head += [f"{app} req/s", "vs best", "lat us", "srv cpu us/req"]
    rows = [head]
    for name in names:
        row = [name]
        for app in apps:
            r = results.get((name, app))
            if r is None:
                row += ["FAILED", "-", "-", "-"]
            else:
                ratio = f"{r.rate / best[app]:.2f}x" if best[app] else "-"
                row += [f"{r.rate:,.0f}", ratio, f"{r.latency_us:,.0f}", f"{r.server_cpu_us:.1f}"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    lines.insert(1, "-" * len(lines[0]))
    return lines


# -- command line -----------------------------------------------------------------


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None, available: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Closed-loop requests/s of pollserve's hello and echo apps on each polling backend.",
        epilog="Exit status: 0 whatever the timings; 1 if a server failed to start or stop or a reply was wrong.",
    )
    parser.add_argument(
        "--backends",
        type=comma_list,
        default=available,
        help=f"comma-separated backends (default: all available here: {','.join(available)})",
    )
    parser.add_argument(
        "--apps", type=comma_list, default=list(APPS), help="comma-separated apps (default: hello,echo)"
    )
    parser.add_argument("--clients", type=int, default=50, metavar="N", help="concurrent connections (default: 50)")
    parser.add_argument("--seconds", type=float, default=5.0, metavar="T", help="measured seconds per run (default: 5)")
    parser.add_argument(
        "--size", type=int, default=64, metavar="BYTES", help="echo request size; hello sends b'ping\\n' (default: 64)"
    )
    parser.add_argument(
        "--client-procs", type=int, default=1, metavar="K", help="load-generating processes (default: 1)"
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=5_000_000,
        metavar="N",
        help="stop a client process after this many replies, warmup included (default: 5000000)",
    )
    parser.add_argument("--warmup", type=float, default=1.0, metavar="T", help="uncounted seconds first (default: 1)")
    args = parser.parse_args(argv)

    unknown = [b for b in args.backends if b not in available]
    if unknown:
        parser.error(f"backend(s) not available here: {', '.join(unknown)} (available: {', '.join(available)})")
    unknown = [a for a in args.apps if a not in APPS]
    if unknown:
        parser.error(f"unknown app(s): {', '.join(unknown)} (choose from {', '.join(APPS)})")
    if not args.backends or not args.apps:
        parser.error("--backends and --apps need at least one name each")
    if args.client_procs < 1 or args.clients < args.client_procs:
        parser.error("need 1 <= --client-procs <= --clients")
    if args.size < 1 or args.max_requests < 1:
        parser.error("--size and --max-requests must be at least 1")
    if args.seconds <= 0 or args.warmup < 0:
        parser.error("--seconds must be > 0 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    # Imported here, not at the top, so the spawned load processes never load the server's code.
    import pollserve
    from pollserve.backends import available_backends

    args = parse_args(argv, list(available_backends()))
    started = datetime.datetime.now(datetime.timezone.utc)
    names = list(targets(args.backends))
    results: dict[tuple[str, str], RunResult | None] = {}
    problems: list[str] = []
    notes: list[str] = []
    for name, template in targets(args.backends).items():
        for app in args.apps:
            print(f"running {name}/{app} ...", file=sys.stderr, flush=True)
            try:
                result = run_one(name, template, app, args)
            except BenchError as exc:
                results[(name, app)] = None
                problems.append(str(exc))
                continue
            results[(name, app)] = result
            if result.errors:
                detail = "\n".join(f"    {message}" for message in result.messages)
                problems.append(f"{name}/{app}: {result.errors} wrong replies or broken connections:\n{detail}")
            if result.capped:
                notes.append(f"{name}/{app}: hit --max-requests; its window was {result.seconds:.2f} s")

    print("\n".join(header(args, pollserve.__version__, started)))
    print()
    print("\n".join(table(names, args.apps, results)))
    print()
    print("lat us = mean round trip per request, from (measured seconds x connections / requests).")
    print("srv cpu us/req = server CPU (user + system) per request in the measured window: lower is better;")
    print("  unlike req/s it does not depend on how fast the load generator is.")
    for note in notes:
        print(f"note: {note}")
    for problem in problems:
        print(f"ERROR: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
