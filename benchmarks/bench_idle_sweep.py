"""What the idle sweep costs: one sweep over N open connections, when none of them looks idle (the
sweep only reads each one's clock) and when all of them do (then it also asks the kernel for each
one's send queue, one ioctl each, sendqueue.unsent_bytes).  The connections are real loopback
clients of an in-process server; the loop is stopped while the sweeps are timed.  Interleaved reps,
medians, and their ratio from the same run.

    python benchmarks/bench_idle_sweep.py [--connections 2000] [--reps 15]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from collections.abc import Sequence

from bench_backends import header

from pollserve.apps import Echo
from pollserve.loop import EventLoop
from pollserve.sendqueue import unsent_bytes
from pollserve.server import Server

TIMEOUT = 600.0


def open_clients(server: Server, count: int) -> list[socket.socket]:
    loop = server.loop
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    clients = [socket.create_connection(server.address, timeout=10) for _ in range(count)]
    deadline = time.monotonic() + 60
    while len(server.connections) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(server.connections)} of {count} connections accepted in 60 s")
        time.sleep(0.01)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    return clients


def time_sweep(server: Server, looks_idle: bool) -> float:
    """Seconds one sweep takes, every connection last active just now or half a timeout ago."""
    now = server.loop.now = time.monotonic()
    stamp = now - TIMEOUT * 0.6 if looks_idle else now
    for conn in server.connections:
        conn._last_active = stamp
    started = time.perf_counter()
    server._sweep_idle()
    elapsed = time.perf_counter() - started
    assert len(server.connections) > 0  # nothing was closed: the timeout is not reached
    if server._idle_timer is not None:
        server._idle_timer.cancel()
        server._idle_timer = None
    return elapsed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    with socket.socket() as probe:
        measurable = unsent_bytes(probe.fileno()) is not None
    loop = EventLoop()
    server = Server(loop, Echo, "127.0.0.1", 0, idle_timeout=TIMEOUT)
    server.start()
    clients = open_clients(server, args.connections)
    try:
        active, idle = [], []
        for _ in range(args.reps):  # interleaved, so that drift hits both alike
            active.append(time_sweep(server, looks_idle=False))
            idle.append(time_sweep(server, looks_idle=True))
    finally:
        server.close()
        loop.close()
        for sock in clients:
            sock.close()
    lines = header(
        "pollserve idle sweep: one sweep over N connections",
        f"{args.connections} connections, {args.reps} interleaved reps, backend {loop.backend.name}, "
        f"kernel send queue {'read (SIOCOUTQ)' if measurable else 'not readable here'}",
    )
    n = args.connections
    a, i = statistics.median(active), statistics.median(idle)
    lines += [
        "",
        f"{'connections look':<18} {'sweep ms':>9} {'us/conn':>8}",
        f"{'active':<18} {a * 1e3:>9.2f} {a / n * 1e6:>8.2f}",
        f"{'idle (looked at)':<18} {i * 1e3:>9.2f} {i / n * 1e6:>8.2f}",
        f"ratio idle/active: {i / a:.1f}x (medians of the same run)",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
