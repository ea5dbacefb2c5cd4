"""``--workers 1`` against ``--workers 2``: closed-loop requests/s and server CPU per request.

The load comes from the C load generator (fixtures/c_load.c, compiled on the fly as in
bench_peers.py) pinned to the last CPU; the server's processes are not pinned.  On a 2-core machine
that leaves one core for one worker and has two workers share a core with the load generator, so
what this can show there is the cost of the supervisor (CPU per request at a paced rate, which
includes the parent's and every worker's CPU) and whether a second worker takes any load, not a
doubling: that needs cores the load generator does not use.

    python benchmarks/bench_workers.py [--reps 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench_backends import cpu_model
from bench_peers import compile_fixtures, run_c_load

from pollserve import __version__
from pollserve.bench import ServerProcess, pollserve_argv
from pollserve.load import LoadSpec

#: the load generator runs on the last CPU
LOAD_CPU = (os.cpu_count() or 1) - 1


def run(workers: int, rate: float | None, fixtures: dict[str, Path], args: argparse.Namespace) -> tuple[float, float]:
    """(requests/s, server CPU us per request, parent and workers together) of one fresh server."""
    argv = [*pollserve_argv("epoll"), "--workers", str(workers)]
    server = ServerProcess(f"workers {workers}", argv)
    spec = LoadSpec(
        port=server.start(), connections=args.connections, rate=rate, warmup=args.warmup, seconds=args.seconds
    )
    try:
        result = run_c_load(fixtures, server, spec, load_cpu=LOAD_CPU)
    except BaseException:
        server.kill()
        raise
    server.stop()
    return result.rate, result.cpu_us or 0.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20_000, help="paced rate for CPU per request")
    args = parser.parse_args(argv)
    fixtures = compile_fixtures(Path(tempfile.mkdtemp(prefix="pollserve-fixtures-")))
    if not fixtures:
        print("bench_workers: needs a C compiler and Linux for the load generator", file=sys.stderr)
        return 1
    rows: dict[tuple[int, str], list[float]] = {}
    for rep in range(args.reps):
        for workers in (1, 2):
            print(f"bench_workers: rep {rep + 1}, --workers {workers}", file=sys.stderr)
            closed_rate, _ = run(workers, None, fixtures, args)
            _, paced_cpu = run(workers, args.rate, fixtures, args)
            rows.setdefault((workers, "req/s"), []).append(closed_rate)
            rows.setdefault((workers, "cpu"), []).append(paced_cpu)
    print(f"# --workers 1 against --workers 2 ({platform.platform()}; {cpu_model()}, {os.cpu_count()} CPUs)")
    print(f"# python {platform.python_version()}, pollserve {__version__}; load generator pinned to CPU {LOAD_CPU}")
    print(f"# {args.connections} connections, hello, {args.seconds:g} s per run, {args.reps} reps interleaved")
    print()
    print("| workers | closed-loop req/s (median; all reps) | CPU us per request at a paced rate (median; all reps) |")
    print("|---|---|---|")
    for workers in (1, 2):
        rates, cpus = rows[(workers, "req/s")], rows[(workers, "cpu")]
        print(
            f"| {workers} | {statistics.median(rates):,.0f}; {', '.join(f'{r:,.0f}' for r in rates)} "
            f"| {statistics.median(cpus):.2f}; {', '.join(f'{c:.2f}' for c in cpus)} |"
        )
    ratios = [two / one for one, two in zip(rows[(1, "req/s")], rows[(2, "req/s")], strict=True)]
    print(f"\nreq/s ratio --workers 2 / --workers 1, per rep: {', '.join(f'{r:.2f}' for r in ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
