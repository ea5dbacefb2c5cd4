"""What pollserve holds and what it costs at its limits: one table of resource figures.

- idle: N idle clients held at once, started from a soft fd limit of 1024 (the server raises its
  own); the server's RSS per connection.
- saturated: a server with a small fd budget offered 3x its connection limit, clients
  reconnecting as fast as they are refused for T seconds; the server's CPU share meanwhile.
- churn: 20,000 short connections, half of them reset; process fds after, against before.
- slow readers: 20 clients each asking for a 20 MB reply and reading none of it; RSS growth.

Figures are measured, never judged: the exit status is 1 only if a server does not start.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import resource
import socket
import struct
import sys
import time

import psutil
from bench_backends import cpu_model, package_version

from pollserve.bench import BenchError, ServerProcess
from pollserve.load import raise_fd_limit

HOST = "127.0.0.1"


def start(*args: str, soft_limit: int | None = None) -> tuple[ServerProcess, int]:
    """A pollserve server on port 0, optionally started at a given soft fd limit."""

    def lower_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft_limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    command = [sys.executable, "-m", "pollserve", "--host", HOST, "--port", "0", *args]
    server = ServerProcess("pollserve", command, preexec_fn=lower_soft_limit if soft_limit else None)
    return server, server.start()


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def fds(pid: int) -> int:
    return psutil.Process(pid).num_fds()


def cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def idle(count: int) -> list[str]:
    server, port = start("--idle-timeout", "0", soft_limit=1024)
    assert server.proc is not None
    pid = server.proc.pid
    time.sleep(0.5)
    rss_before = rss_mib(pid)
    socks = [socket.create_connection((HOST, port), timeout=10) for _ in range(count)]
    for sock in socks[:: max(1, count // 100)]:  # a sample answers: they are served, not just queued
        sock.sendall(b"hi")
        assert sock.recv(100) == b"Hello world\n"
    time.sleep(1.0)
    rss_after = rss_mib(pid)
    held = fds(pid)
    for sock in socks:
        sock.close()
    server.stop()
    per = (rss_after - rss_before) * 1024 / count
    return [
        f"idle clients held      {count:,} at once (server started at soft limit 1024, {held:,} fds open)",
        f"RSS for them           {rss_before:.1f} -> {rss_after:.1f} MiB, {per:.2f} KiB per connection",
    ]


def saturated(seconds: float) -> list[str]:
    server, port = start("--max-fds", "128", "--idle-timeout", "0")
    assert server.proc is not None
    pid = server.proc.pid
    budget = next(line for line in server.tail if "at most" in line)
    limit = int(re.search(r"at most (\d+) connections", budget).group(1))
    held = [socket.create_connection((HOST, port), timeout=10) for _ in range(limit)]
    refused = 0
    cpu_before, started = cpu(pid), time.monotonic()
    while time.monotonic() - started < seconds:
        for _ in range(2 * limit):
            with socket.create_connection((HOST, port), timeout=10) as sock:
                try:
                    if sock.recv(10) == b"":
                        refused += 1
                except ConnectionResetError:
                    refused += 1
    share = (cpu(pid) - cpu_before) / (time.monotonic() - started)
    for sock in held:
        sock.sendall(b"hi")
    answered = sum(sock.recv(100) == b"Hello world\n" for sock in held)
    for sock in held:
        sock.close()
    server.stop()
    return [
        f"saturated              limit {limit}, {refused:,} refused in {seconds:g} s ({refused / seconds:,.0f}/s), "
        f"server CPU {share:.0%} of a core, {answered}/{limit} held clients answered after",
    ]


def churn(count: int) -> list[str]:
    server, port = start()
    assert server.proc is not None
    pid = server.proc.pid
    time.sleep(1.0)
    before = fds(pid)
    for index in range(count):
        sock = socket.create_connection((HOST, port), timeout=10)
        if index % 2:
            reset(sock)
        else:
            sock.sendall(b"bye")
            sock.close()
    time.sleep(2.0)
    after = fds(pid)
    server.stop()
    return [f"churn                  {count:,} connections (half reset): process fds {before} before, {after} after"]


def slow_readers(clients: int, megabytes: int) -> list[str]:
    """Echo clients that send up to `megabytes` and read nothing: the server stops reading from each
    once its write buffer passes the high-water mark, so its memory stays bounded."""
    server, port = start("--app", "echo")
    assert server.proc is not None
    pid = server.proc.pid
    time.sleep(0.5)
    before = rss_mib(pid)
    chunk = b"x" * 65536
    socks, sent = [], 0
    for _ in range(clients):
        sock = socket.create_connection((HOST, port), timeout=10)
        sock.setblocking(False)
        for _ in range(megabytes * 16):
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                break
        socks.append(sock)
    time.sleep(2.0)
    after = rss_mib(pid)
    for sock in socks:
        sock.close()
    server.stop()
    return [
        f"slow readers           {clients} clients sending up to {megabytes} MB each, reading none: "
        f"{sent / 2**20:.1f} MiB taken in all, RSS {before:.1f} -> {after:.1f} MiB (+{after - before:.1f})"
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=10_000, help="idle clients held (default: 10000)")
    parser.add_argument("--churn", type=int, default=20_000, help="short connections (default: 20000)")
    parser.add_argument("--seconds", type=float, default=5.0, help="saturation time (default: 5)")
    args = parser.parse_args(argv)
    raise_fd_limit(args.idle + 512)
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = idle(args.idle) + saturated(args.seconds) + churn(args.churn) + slow_readers(20, 20)
    print("pollserve at its limits")
    print(f"date:       {started:%Y-%m-%d %H:%M:%S} UTC (start)")
    print(f"machine:    {platform.platform()}; cpu {cpu_model()}, {os.cpu_count()} logical CPUs")
    print(f"python:     {platform.python_implementation()} {platform.python_version()}")
    print(f"pollserve:  {package_version('pollserve')}; psutil {package_version('psutil')}")
    print()
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench_limits: {exc}", file=sys.stderr)
        sys.exit(1)
