"""What does HAProxy in front cost?  hello through HAProxy (send-proxy-v2) against hello direct.

Two targets, measured in interleaved reps so drift of the shared machine hits both alike:
- ``direct``: the load client talks to pollserve;
- ``haproxy``: the load client talks to HAProxy, run with the shipped contrib/haproxy/haproxy.cfg
  (both of its server slots pointed at the one instance), which relays to pollserve started with
  ``--proxy-protocol``.
Each measurement gets a fresh pollserve (and HAProxy).  Two scenarios: a closed loop (requests/s)
and a paced rate (server CPU microseconds per request, the figure that stays meaningful when the
client is the bottleneck).  The load keeps its connections open, so the PROXY header is parsed once
per connection and the server's cost per request should hardly move; what HAProxy adds is a hop of
latency and its own CPU, reported per request too.  On Linux with two CPUs or more, pollserve runs
on CPU 0 and HAProxy with the load client on CPU 1: on a 2-core machine they share it, which
bounds the closed-loop rate through HAProxy below what HAProxy alone could relay.

Needs ``haproxy`` on PATH.  Timings never fail the run; the exit status is 1 when a server does not
start or stop cleanly or a reply is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil
from bench_backends import header

from pollserve.bench import BenchError, Measurement, ServerProcess, drive, pollserve_argv
from pollserve.load import LoadSpec

CONFIG = Path(__file__).resolve().parent.parent / "contrib" / "haproxy" / "haproxy.cfg"
SERVER_CPU, PROXY_CPU = 0, 1
STATS_RE = re.compile(r"stats on http://127\.0\.0\.1:(\d+)")
TARGETS = ("direct", "haproxy")


def pinned(cpu: int) -> Callable[[], None] | None:
    """preexec_fn pinning a child to one CPU (Linux, with two CPUs or more), else None."""
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stats_port(server: ServerProcess) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        line = server.lines.get(timeout=10)
        found = STATS_RE.search(line or "")
        if found:
            return int(found.group(1))
    raise BenchError(f"{server.name}: no 'stats on' line")


@contextlib.contextmanager
def haproxy(app_port: int, app_stats_port: int) -> Iterator[tuple[int, psutil.Process]]:
    """HAProxy in the foreground on a free port, both server slots on the one instance; killed by PID."""
    haproxy_path = shutil.which("haproxy")
    assert haproxy_path is not None
    port = free_port()
    env = {**os.environ, "POLLSERVE_FRONTEND_HOST": "127.0.0.1", "POLLSERVE_FRONTEND_PORT": str(port)}
    for index in (1, 2):
        env[f"POLLSERVE{index}_PORT"], env[f"POLLSERVE{index}_STATS_PORT"] = str(app_port), str(app_stats_port)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [haproxy_path, "-db", "-f", str(CONFIG)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,  # a file, not a pipe: its per-connection log lines must never block it
            preexec_fn=pinned(PROXY_CPU),
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise BenchError(f"haproxy did not start:\n{log.read()[-2000:]}") from None
                    time.sleep(0.05)
            yield port, psutil.Process(proc.pid)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


class Sampled:
    """The server as drive() sees it, also reading HAProxy's CPU time at the same two instants."""

    def __init__(self, server: ServerProcess, proxy: psutil.Process) -> None:
        self.server = server
        self.proxy = proxy
        self.name = server.name
        self.proxy_cpu: list[float] = []

    def cpu_seconds(self) -> float:
        times = self.proxy.cpu_times()  # clock ticks (10 ms): fine over a window of seconds
        self.proxy_cpu.append(times.user + times.system)
        return self.server.cpu_seconds()

    def rss_mib(self) -> float:
        return self.server.rss_mib()


@dataclasses.dataclass
class Row:
    target: str
    scenario: str
    measured: Measurement
    #: HAProxy's CPU microseconds per request (None for direct)
    proxy_us: float | None = None


def run_once(target: str, scenario: str, args: argparse.Namespace) -> Row:
    argv = [*pollserve_argv(args.backend), "--stats-port", "0"]
    if target == "haproxy":
        argv += ["--proxy-protocol", "--proxy-from", "127.0.0.1"]
    server = ServerProcess(target, argv, preexec_fn=pinned(SERVER_CPU))
    spec = LoadSpec(
        port=server.start(),
        connections=args.connections,
        rate=args.rate if scenario == "paced" else None,
        warmup=args.warmup,
        seconds=args.seconds,
    )
    try:
        if target == "direct":
            row = Row(target, scenario, drive(server, spec))
        else:
            with haproxy(spec.port, stats_port(server)) as (port, proxy):
                sampled = Sampled(server, proxy)
                measured = drive(sampled, dataclasses.replace(spec, port=port))  # type: ignore[arg-type]
                proxy_seconds = sampled.proxy_cpu[-1] - sampled.proxy_cpu[0]
                per_request = proxy_seconds / measured.requests * 1e6 if measured.requests else None
                row = Row(target, scenario, measured, per_request)
    except BaseException:
        server.kill()
        raise
    server.stop()
    if row.measured.errors:
        raise BenchError(f"{target}: {row.measured.errors} errors: {row.measured.messages[:3]}")
    return row


def median(values: Sequence[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(rows: list[Row], args: argparse.Namespace) -> list[str]:
    pinning = "pollserve on CPU 0, HAProxy and the load client on CPU 1" if pinned(0) else "no CPU pinning"
    lines = header(
        "pollserve behind HAProxy: hello direct and through HAProxy (send-proxy-v2, --proxy-protocol)",
        f"backend {args.backend}, {args.connections} connections, paced at {args.rate:g} req/s, "
        f"{args.seconds:g} s windows, {args.reps} reps; {pinning}",
    )
    lines.append("")
    head = f"{'scenario':<8}  {'target':<8}  {'req/s':>8}  {'srv us/req':>10}  {'haproxy us/req':>14}"
    head += f"  {'p50 us':>7}  {'p99 us':>7}  reps (req/s)"
    lines += [head, "-" * len(head)]
    for scenario in ("closed", "paced"):
        for target in TARGETS:
            mine = [row for row in rows if row.target == target and row.scenario == scenario]
            each = ", ".join(f"{row.measured.rate:,.0f}" for row in mine)
            lines.append(
                f"{scenario:<8}  {target:<8}  {cell(median([r.measured.rate for r in mine]), ',.0f'):>8}"
                f"  {cell(median([r.measured.cpu_us_per_request for r in mine]), '.1f'):>10}"
                f"  {cell(median([r.proxy_us for r in mine]), '.1f'):>14}"
                f"  {cell(median([r.measured.p50_us for r in mine]), '.0f'):>7}"
                f"  {cell(median([r.measured.p99_us for r in mine]), '.0f'):>7}  {each}"
            )
    ratios = []
    for rep in range(args.reps):
        closed = {row.target: row for row in rows[rep * 4 : rep * 4 + 4] if row.scenario == "closed"}
        if closed["direct"].measured.rate:
            ratios.append(closed["haproxy"].measured.rate / closed["direct"].measured.rate)
    if ratios:
        lines += [
            "",
            f"closed loop through HAProxy / direct, median of per-rep ratios: {statistics.median(ratios):.2f}",
        ]
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="epoll", help="polling backend (default: epoll)")
    parser.add_argument("--connections", type=int, default=20, help="load connections (default: 20)")
    parser.add_argument("--rate", type=float, default=2000.0, help="paced requests/s (default: 2000)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per window (default: 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds per window (default: 1)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved reps (default: 3)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("haproxy") is None:
        raise BenchError("haproxy is not on PATH (Debian: apt-get install haproxy)")
    load_cpu = pinned(PROXY_CPU)
    if load_cpu is not None:
        load_cpu()  # the load client's processes are spawned from here, and inherit it
    rows = []
    for rep in range(1, args.reps + 1):
        for scenario in ("closed", "paced"):
            for target in TARGETS:
                print(f"rep {rep}/{args.reps}: {scenario} {target}", file=sys.stderr)
                rows.append(run_once(target, scenario, args))
    print("\n".join(report(rows, args)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench_haproxy: {exc}", file=sys.stderr)
        sys.exit(1)
