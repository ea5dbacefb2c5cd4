"""What a blocking ``epoll_wait`` with a timeout costs the kernel, against one with none.

    python benchmarks/bench_timed_wait.py                 # 11 interleaved reps of 50,000 rounds each
    python benchmarks/bench_timed_wait.py --reps 3 --rounds 20000

pollserve's loop always has a timer while it runs, the loop-health probe's (``health.PROBE_PERIOD``), so
every wait that blocks is a timed one; uvloop serving a plain hello has no timer and waits with none.
fixtures/timed_wait.c ping-pongs a byte over a socketpair so that its parent blocks in ``epoll_wait`` at
every round, once with a 100 ms timeout and once with -1, reps interleaved, and prints the parent's CPU
per round.  The difference is what the probe's timer adds to each blocking wait of a server.  Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_peers import compile_fixtures

TIMEOUTS = (-1, 100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=11, help="interleaved repetitions (default: 11)")
    parser.add_argument("--rounds", type=int, default=50_000, help="rounds per run (default: 50,000)")
    args = parser.parse_args()
    fixtures = compile_fixtures(Path(tempfile.mkdtemp(prefix="pollserve-timed-wait-")), ("timed_wait",))
    if not fixtures:
        print("bench_timed_wait: needs Linux (epoll) and a C compiler", file=sys.stderr)
        return 1
    binary = fixtures["timed_wait"]
    runs: dict[int, list[float]] = {timeout: [] for timeout in TIMEOUTS}
    for rep in range(args.reps):
        for timeout in TIMEOUTS:
            print(f"bench_timed_wait: rep {rep + 1}, timeout {timeout} ms", file=sys.stderr)
            out = subprocess.run([str(binary), str(timeout), str(args.rounds)], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"bench_timed_wait: the fixture failed: {out.stderr.strip()}", file=sys.stderr)
                return 1
            row = json.loads(out.stdout)
            runs[timeout].append(row["user_us"] + row["sys_us"])
    untimed = statistics.median(runs[-1])
    print("# A blocking epoll_wait with a timeout, against one with none\n")
    print(f"- machine: {platform.platform()}, {os.cpu_count()} logical CPUs")
    print(f"- {args.rounds:,} rounds per run, {args.reps} reps interleaved; the waiting process's CPU us per round\n")
    print("| timeout | median | difference | all reps |")
    print("|---|---:|---:|---|")
    for timeout in TIMEOUTS:
        median = statistics.median(runs[timeout])
        every = ", ".join(f"{value:.2f}" for value in runs[timeout])
        name = "none (-1)" if timeout < 0 else f"{timeout} ms"
        print(f"| {name} | {median:.2f} | {median - untimed:+.2f} | {every} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
