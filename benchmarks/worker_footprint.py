"""What one ``--workers`` worker takes in memory: the figure behind workers.WORKER_FOOTPRINT.

Starts ``pollserve --workers 2`` on the built-in app, holds CONNECTIONS connections open on it (each
with a request answered, so every one has its buffers and protocol objects), and prints each
worker's resident size (RSS), proportional share (PSS: shared pages divided among their users) and
unique size (USS: what killing it would free), idle and loaded.  WORKER_FOOTPRINT should stay above
the loaded RSS: it is what the parent plans with when it refuses a count the machine cannot hold.

    python benchmarks/worker_footprint.py [--connections 500] [--app hello]
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Sequence

import psutil
from bench_backends import header

from pollserve.bench import ServerProcess, pollserve_argv
from pollserve.workers import WORKER_FOOTPRINT

MIB = 2**20


def measure(pids: list[int]) -> list[tuple[float, float, float]]:
    """(RSS, PSS, USS) in MiB of each process; PSS and USS need /proc/PID/smaps (Linux)."""
    rows = []
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        rows.append((info.rss / MIB, getattr(info, "pss", 0) / MIB, getattr(info, "uss", 0) / MIB))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--app", default="hello")
    args = parser.parse_args(argv)
    server = ServerProcess("workers 2", [*pollserve_argv("epoll", args.app), "--workers", "2"])
    port = server.start()
    held: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while len(psutil.Process(server.pid).children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        pids = [child.pid for child in psutil.Process(server.pid).children()]
        idle = measure(pids)
        for _ in range(args.connections):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"hi\n")
            sock.recv(4096)
            held.append(sock)
        time.sleep(1.0)
        loaded = measure(pids)
        parent = measure([server.pid])[0]
    finally:
        for sock in held:
            sock.close()
        server.stop()
    lines = header("pollserve worker footprint", f"--workers 2, app {args.app}, {args.connections} connections held")
    lines.append(f"{'process':<22}{'RSS MiB':>10}{'PSS MiB':>10}{'USS MiB':>10}")
    lines.append(f"{'parent':<22}{parent[0]:>10.1f}{parent[1]:>10.1f}{parent[2]:>10.1f}")
    for number, (before, after) in enumerate(zip(idle, loaded, strict=True)):
        lines.append(f"{f'worker {number} idle':<22}{before[0]:>10.1f}{before[1]:>10.1f}{before[2]:>10.1f}")
        lines.append(f"{f'worker {number} loaded':<22}{after[0]:>10.1f}{after[1]:>10.1f}{after[2]:>10.1f}")
    lines.append(f"WORKER_FOOTPRINT (planned per worker): {WORKER_FOOTPRINT / MIB:.0f} MiB")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
