"""Requests per second of pollserve's ``hello`` and ``echo`` apps on every polling backend.

Each (backend, app) pair gets a fresh server subprocess and a closed-loop load: every connection
sends one request, waits for the whole reply, checks it, and only then sends the next.  Throughput is
bounded by round trips, and on a 2-core machine by the Python load client too; the server's CPU time
per request is not, and ranks the backends.  The load runs in separate processes, with the same
client as ``pollserve bench`` (pollserve.load); the server is measured by pollserve.bench.

Run ``python benchmarks/bench_backends.py --help``; benchmarks/README.md says how to read the table.
Timings never fail the run: the exit status is 1 only when a server did not start or stop cleanly
or a reply was wrong.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sys
from collections.abc import Sequence

from pollserve import __version__
from pollserve.backends import available_backends
from pollserve.bench import BenchError, Measurement, ServerProcess, aligned, measure, pollserve_argv
from pollserve.load import LoadSpec

APPS = ("hello", "echo")


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


def header(title: str, parameters: str) -> list[str]:
    """Everything needed to compare two tables: the machine, the versions, the parameters."""
    started = datetime.datetime.now(datetime.timezone.utc)
    return [
        title,
        f"date:       {started:%Y-%m-%d %H:%M:%S} UTC",
        f"machine:    {platform.platform()}",
        f"cpu:        {cpu_model()}, {os.cpu_count()} logical CPUs",
        f"python:     {platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        f"pollserve:  {__version__}; psutil {package_version('psutil')}",
        f"parameters: {parameters}",
    ]


def table(names: list[str], apps: list[str], results: dict[tuple[str, str], Measurement | None]) -> list[str]:
    """Rows are backends; per app: requests/s, ratio to the best backend, mean latency, server CPU per request."""
    best = {app: max((r.rate for n in names if (r := results.get((n, app)))), default=0.0) for app in apps}
    head = ["target"]
    for app in apps:
        head += [f"{app} req/s", "vs best", "lat us", "srv cpu us/req"]
    rows = [head]
    for name in names:
        row = [name]
        for app in apps:
            result = results.get((name, app))
            if result is None:
                row += ["failed", "-", "-", "-"]
                continue
            latency = result.seconds * result.connections / result.requests * 1e6 if result.requests else 0
            row += [
                f"{result.rate:,.0f}",
                f"{result.rate / best[app]:.2f}x" if best[app] else "-",
                f"{latency:.0f}",
                "-" if result.cpu_us_per_request is None else f"{result.cpu_us_per_request:.1f}",
            ]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [aligned(row, widths) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def parse_args(argv: Sequence[str] | None, available: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Closed-loop requests/s of pollserve's hello and echo apps on each polling backend.",
        epilog="Exit status: 0 whatever the timings; 1 if a server failed to start or stop or a reply was wrong.",
    )
    parser.add_argument("--backends", default=",".join(available), help="comma-separated backends (default: all here)")
    parser.add_argument("--apps", default="hello,echo", help="comma-separated apps (default: hello,echo)")
    parser.add_argument("--clients", type=int, default=50, metavar="N", help="concurrent connections (default: 50)")
    parser.add_argument("--seconds", type=float, default=5.0, metavar="T", help="measured seconds per run (default: 5)")
    parser.add_argument("--size", type=int, default=64, metavar="BYTES", help="echo request size (default: 64)")
    parser.add_argument("--client-procs", type=int, default=1, metavar="K", help="load processes (default: 1)")
    parser.add_argument("--warmup", type=float, default=1.0, metavar="T", help="uncounted seconds first (default: 1)")
    args = parser.parse_args(argv)
    args.backends = [name for name in args.backends.split(",") if name]
    args.apps = [name for name in args.apps.split(",") if name]
    unknown = [name for name in args.backends if name not in available]
    if unknown:
        parser.error(f"backend(s) not available here: {', '.join(unknown)} (available: {', '.join(available)})")
    if [app for app in args.apps if app not in APPS] or not args.apps or not args.backends:
        parser.error(f"--apps takes {', '.join(APPS)}; --backends and --apps need one name each at least")
    if args.client_procs < 1 or args.clients < args.client_procs or args.size < 1:
        parser.error("need 1 <= --client-procs <= --clients, and --size >= 1")
    if not args.seconds > 0 or not args.warmup >= 0:
        parser.error("--seconds must be > 0 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, available_backends())
    results: dict[tuple[str, str], Measurement | None] = {}
    problems: list[str] = []
    for name in args.backends:
        for app in args.apps:
            print(f"running {name}/{app} ...", file=sys.stderr, flush=True)
            spec = LoadSpec(
                port=0, app=app, size=args.size, connections=args.clients, warmup=args.warmup, seconds=args.seconds
            )
            try:
                result = measure(ServerProcess(name, pollserve_argv(name, app)), spec, args.client_procs)
            except BenchError as exc:
                results[(name, app)] = None
                problems.append(str(exc))
                continue
            results[(name, app)] = result
            if result.errors:
                detail = "\n".join(f"    {message}" for message in result.messages)
                problems.append(f"{name}/{app}: {result.errors} wrong replies or broken connections:\n{detail}")
    parameters = (
        f"{args.clients} clients in {args.client_procs} process(es), {args.seconds:g} s measured after "
        f"{args.warmup:g} s warmup, echo payload {args.size} bytes"
    )
    print("\n".join(header("pollserve backend benchmark (closed loop, requests/s, higher is better)", parameters)))
    print()
    print("\n".join(table(args.backends, args.apps, results)))
    print()
    print("lat us = mean round trip per request, from (measured seconds x connections / requests).")
    print("srv cpu us/req = server CPU per request in the measured window: lower is better;")
    print("  unlike req/s it does not depend on how fast the load generator is.")
    for problem in problems:
        print(f"ERROR: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
