"""Does a flood of stats requests hurt the app?  hello throughput with and without one.

One pollserve server runs ``hello`` with its stats endpoint on.  Optionally a
holder process keeps N idle app connections open.  Then, rep after rep, two
windows are measured back to back: the app's closed-loop hello throughput
alone, and the same while F concurrent clients request ``/metrics`` as fast
as the server answers them (each connects, sends one request, reads to EOF,
closes, and starts again).  Odd reps measure alone first, even reps flooded
first, so a drift within a rep does not always favour one side.  Everything is
measured from outside the server: the load client counts the hello replies,
and a prober asks ``/healthz`` every half second, as a balancer would, timing
each answer.  The table shows both rates, their ratio per rep (paired, so
machine drift cancels), the /healthz answers, what the flood got, and the
server's CPU.

Timings never fail the run; the exit status is 1 only when a server does not
start or stop cleanly or a hello reply is wrong.  benchmarks/README.md says
more.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import multiprocessing
import os
import platform
import re
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from multiprocessing.connection import Connection

from bench_backends import cpu_model, package_version

from pollserve.bench import BenchError, Measurement, ServerProcess, drive
from pollserve.load import LoadSpec, flood_metrics, raise_fd_limit

HOST = "127.0.0.1"
#: connecting a helper process's sockets; generous for slow machines
READY_TIMEOUT = 30.0
#: seconds of flood with no app load, to read what the flood alone costs the server
FLOOD_ONLY_SECONDS = 2.0

STATS_RE = re.compile(r"stats on http://127\.0\.0\.1:(\d+)")


# -- children ----------------------------------------------------------------------


def hold_idle(pipe: Connection, port: int, count: int) -> None:
    """Open count idle app connections, report, hold them until told to stop."""
    raise_fd_limit(count + 64)
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection((HOST, port), timeout=10))
    except OSError as exc:
        pipe.send(("error", f"idle connection {len(socks) + 1}: {exc}"))
        return
    pipe.send(("ready", len(socks)))
    with contextlib.suppress(EOFError):
        pipe.recv()
    for sock in socks:
        sock.close()


def flood(pipe: Connection, port: int, concurrency: int) -> None:
    """Keep `concurrency` /metrics requests in flight until told to stop; report status counts."""
    raise_fd_limit(concurrency + 64)
    statuses: dict[str, int] = {}
    pipe.send(("ready", None))
    if pipe.recv() != "go":
        return
    flood_metrics((HOST, port), concurrency, pipe.poll, statuses, poll_interval=0.2)
    pipe.send(("result", statuses))


class HealthProber:
    """GET /healthz every half second on a thread, as a balancer's check does (HTTP/1.0, no Host),
    until stopped: each answer's status (or error) and how long it took, connect included."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            reply = b""
            try:
                with socket.create_connection((HOST, self.port), timeout=10) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                    while chunk := sock.recv(4096):
                        reply += chunk
                status = reply[9:12].decode("ascii", "replace") if reply.startswith(b"HTTP/1.1 ") else "no reply"
            except OSError as exc:
                status = type(exc).__name__
            self.answers.append((time.monotonic() - started, status))
            self._stop.wait(0.5)

    def stop(self) -> list[tuple[float, str]]:
        self._stop.set()
        self._thread.join(15)
        return self.answers


def health_summary(answers: list[tuple[float, str]]) -> str:
    if not answers:
        return "none"
    seconds = sorted(took for took, _ in answers)
    statuses = Counter(status for _, status in answers)
    shown = " ".join(f"{status}x{count}" for status, count in sorted(statuses.items()))
    return f"{statistics.median(seconds):.2f}/{seconds[-1]:.2f} s {shown}"


# -- the parent ------------------------------------------------------------------------


def start_child(target, *args) -> tuple[multiprocessing.process.BaseProcess, Connection]:
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    proc = context.Process(target=target, args=(child_end, *args), daemon=True)
    proc.start()
    child_end.close()
    return proc, parent_end


def expect(pipe: Connection, kind: str, timeout: float, doing: str):
    if not pipe.poll(timeout):
        raise BenchError(f"no answer from a helper process for {timeout:g} s while {doing}")
    got, detail = pipe.recv()
    if got != kind:
        raise BenchError(f"{doing}: {detail}")
    return detail


def stop_child(proc: multiprocessing.process.BaseProcess, pipe: Connection) -> None:
    pipe.close()
    proc.join(timeout=10)
    if proc.is_alive():
        proc.terminate()  # this child only, by its own PID
        proc.join(timeout=5)


def cpu_share(row: Measurement) -> float:
    """The server's CPU time over the window, as a share of one core."""
    return (row.cpu_us_per_request or 0.0) * row.requests / 1e6 / row.seconds


def supports(option: str) -> bool:
    """Whether the pollserve under test has a command-line option (to compare old and new trees)."""
    import subprocess

    result = subprocess.run([sys.executable, "-m", "pollserve", "--help"], capture_output=True, text=True)
    return option in result.stdout


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="epoll", help="polling backend (default: epoll)")
    parser.add_argument("--app-clients", type=int, default=20, help="hello connections, closed loop (default: 20)")
    parser.add_argument("--idle", type=int, default=10000, help="idle app connections held open (default: 10000)")
    parser.add_argument("--flood", type=int, default=1000, help="concurrent /metrics clients (default: 1000)")
    parser.add_argument("--flood-procs", type=int, default=2, help="processes sharing the flood (default: 2)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per window (default: 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds per window (default: 1)")
    parser.add_argument("--reps", type=int, default=3, help="baseline/flood pairs (default: 3)")
    return parser.parse_args(argv)


def measure_alone(server: ServerProcess, spec: LoadSpec, stats_port: int) -> tuple[Measurement, list]:
    prober = HealthProber(stats_port)
    try:
        return drive(server, spec), prober.answers
    finally:
        prober.stop()


def measure_flooded(
    server: ServerProcess, spec: LoadSpec, stats_port: int, args: argparse.Namespace
) -> tuple[Measurement, list, Counter[str], float]:
    flooders = [start_child(flood, stats_port, share) for share in [args.flood // args.flood_procs] * args.flood_procs]
    try:
        for _, pipe in flooders:
            expect(pipe, "ready", READY_TIMEOUT, "starting the flood")
        for _, pipe in flooders:
            pipe.send("go")
        time.sleep(1.0)  # let the flood reach its steady state
        # What the flood alone costs the server, as a share of one core: with no app load to
        # compete with, a figure that the machine's other load barely moves (unlike a rate).
        cpu_before = server.cpu_seconds()
        time.sleep(FLOOD_ONLY_SECONDS)
        flood_cpu = (server.cpu_seconds() - cpu_before) / FLOOD_ONLY_SECONDS
        prober = HealthProber(stats_port)
        try:
            flooded = drive(server, spec)
        finally:
            answers = prober.stop()
        outcomes: Counter[str] = Counter()
        for _, pipe in flooders:
            pipe.send("stop")
        for _, pipe in flooders:
            outcomes.update(expect(pipe, "result", 30, "stopping the flood"))
    finally:
        for proc, pipe in flooders:
            stop_child(proc, pipe)
    settle(stats_port)
    return flooded, answers, outcomes, flood_cpu


def settle(stats_port: int, limit: float = 60.0) -> None:
    """Wait until /healthz answers within half a second: the flood's connections left in the
    kernel's backlog are drained, so the next window (alone, in even reps) starts clean."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        started = time.monotonic()
        with contextlib.suppress(OSError):
            with socket.create_connection((HOST, stats_port), timeout=1) as sock:
                sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                while sock.recv(4096):
                    pass
            if time.monotonic() - started < 0.5:
                return
        time.sleep(0.2)
    raise BenchError(f"the stats endpoint did not settle within {limit:g} s of the flood stopping")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    raise_fd_limit(args.idle + args.flood + 256)
    command = [sys.executable, "-m", "pollserve", "--backend", args.backend, "--host", HOST, "--port", "0"]
    command += ["--stats-port", "0", "--log-level", "info"]
    if supports("--idle-timeout"):
        command += ["--idle-timeout", "0"]  # the idle connections are the point
    server = ServerProcess("pollserve", command)
    port = server.start()
    stats_port = None
    deadline = time.monotonic() + 10
    while stats_port is None and time.monotonic() < deadline:
        line = server.lines.get(timeout=10)
        found = STATS_RE.search(line or "")
        if found:
            stats_port = int(found.group(1))
    if stats_port is None:
        server.kill()
        raise BenchError("no 'stats on' line")
    spec = LoadSpec(port=port, connections=args.app_clients, warmup=args.warmup, seconds=args.seconds)
    rows = []
    holder = None
    try:
        if args.idle:
            holder = start_child(hold_idle, port, args.idle)
            expect(holder[1], "ready", READY_TIMEOUT + args.idle / 500, f"opening {args.idle} idle connections")
        for rep in range(1, args.reps + 1):
            if rep % 2:
                alone, health_alone = measure_alone(server, spec, stats_port)
                flooded, health_flooded, outcomes, flood_cpu = measure_flooded(server, spec, stats_port, args)
            else:
                flooded, health_flooded, outcomes, flood_cpu = measure_flooded(server, spec, stats_port, args)
                alone, health_alone = measure_alone(server, spec, stats_port)
            if alone.errors or flooded.errors:
                raise BenchError(f"hello errors: {(alone.messages + flooded.messages)[:3]}")
            rows.append((rep, alone, flooded, outcomes, health_alone, health_flooded, flood_cpu))
    except BaseException:
        server.kill()
        raise
    finally:
        if holder is not None:
            stop_child(*holder)
    server.stop()

    print("pollserve stats-flood benchmark: hello replies/s with and without a /metrics flood")
    print(f"date:       {started:%Y-%m-%d %H:%M:%S} UTC (start)")
    print(f"machine:    {platform.platform()}")
    print(f"cpu:        {cpu_model()}, {os.cpu_count()} logical CPUs")
    print(f"python:     {platform.python_implementation()} {platform.python_version()}")
    print(f"pollserve:  {package_version('pollserve')}; psutil {package_version('psutil')}")
    print(
        f"parameters: backend {args.backend}, {args.app_clients} hello clients, {args.idle} idle app connections, "
        f"{args.flood} concurrent /metrics clients in {args.flood_procs} processes, {args.seconds:g} s windows"
    )
    print()
    head = f"{'rep':>3}  {'alone req/s':>11}  {'flooded req/s':>13}  {'ratio':>6}  {'srv cpu alone':>13}"
    head += f"  {'srv cpu flood':>13}  {'flood only':>10}"
    head += f"  {'/healthz alone: median/max':<30}  {'/healthz flooded: median/max':<30}"
    head += "  flood answers (whole flood window)"
    print(head)
    print("-" * len(head))
    ratios = []
    flood_cpus = []
    for rep, alone, flooded, outcomes, health_alone, health_flooded, flood_cpu in rows:
        flood_cpus.append(flood_cpu)
        ratio = flooded.rate / alone.rate if alone.rate else 0.0
        ratios.append(ratio)
        answers = ", ".join(f"{key} {value:,}" for key, value in sorted(outcomes.items()))
        cpu_alone, cpu_flood = cpu_share(alone), cpu_share(flooded)
        print(
            f"{rep:>3}  {alone.rate:>11,.0f}  {flooded.rate:>13,.0f}  {ratio:>6.3f}  {cpu_alone:>12.0%}  "
            f"{cpu_flood:>12.0%}  {flood_cpu:>9.1%}  "
            f"{health_summary(health_alone):<30}  {health_summary(health_flooded):<30}  {answers}"
        )
    print(
        f"ratio flooded/alone: median {statistics.median(ratios):.3f}, "
        f"range {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} reps"
    )
    print(
        f"server CPU of the flood alone: median {statistics.median(flood_cpus):.1%} of a core, "
        f"range {min(flood_cpus):.1%}-{max(flood_cpus):.1%}"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench_stats_flood: {exc}", file=sys.stderr)
        sys.exit(1)
