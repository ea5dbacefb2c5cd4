"""TLS: pollserve against asyncio's and uvloop's TLS servers, on the same certificate, in one run.

    python benchmarks/bench_tls.py                   # 5 s windows, 50 echo connections, 2 client processes
    python benchmarks/bench_tls.py --seconds 2 --targets pollserve,uvloop
    git worktree add /tmp/before HEAD~1 && python benchmarks/bench_tls.py --before /tmp/before --targets pollserve
    python benchmarks/bench_tls.py --targets pollserve --before /tmp/before --scenarios none --instructions

Two scenarios, each against a fresh server of every target:
- handshakes: clients connect, complete a full TLS 1.3 handshake (no resumption) and close, in a
  closed loop: handshakes/s, and the server's CPU time per handshake;
- echo: 1 KiB requests echoed over established TLS connections, closed loop: requests/s, and the
  server's CPU time per request.
Ratios are to uvloop (else asyncio; else, with ``--before DIR``, to that other source tree of
pollserve's, run as the target ``before``), from this one run; with ``--reps N`` the targets take
turns N times and each figure is the median of its N.  ``--instructions`` adds the server's user-space
instructions per handshake (callgrind; a full handshake and a 1-byte echo, from one client, as the
slope between 40 and 160 of them), the figure that repeats whatever else the machine does: wall-clock
CPU per handshake drifts by 10-20% between runs on a shared machine.  The clients are Python (asyncio, on
uvloop when it is installed), so on a small machine they may bound the rates: the server's CPU
time per operation is the figure that compares the servers whatever the client manages.  On Linux
the server runs on CPU 0 and the clients on CPU 1.

The asyncio and uvloop servers are ``loop.create_server(ssl=context)`` with pollserve.peers' echo
protocol and the context pollserve builds (pollserve.tls.server_context): the same certificate,
ciphers and versions.  The certificate is an ECDSA P-256 one made by trustme (``pip install trustme``).
Timings never fail the run.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench_peers import callgrind_total

from pollserve.bench import BenchError, ServerProcess, uvloop_installed
from pollserve.compiled import command
from pollserve.peers import AsyncioEcho, listening
from pollserve.tls import TLSOptions, server_context

SERVER_CPU, CLIENT_CPU = 0, 1
PAYLOAD = b"x" * 1024


def pinned(cpu: int) -> Callable[[], None] | None:
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


# -- the peers' TLS servers -----------------------------------------------------------------------------------


async def serve_peer(name: str, cert: str, key: str) -> None:
    loop = asyncio.get_running_loop()
    context = server_context(TLSOptions(cert, key))
    server = await loop.create_server(AsyncioEcho, "127.0.0.1", 0, ssl=context, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    listening(server.sockets[0].getsockname(), name, "echo")
    await stop.wait()
    server.close()
    await server.wait_closed()


def run_peer(name: str, cert: str, key: str) -> None:
    if name == "uvloop":
        import uvloop

        uvloop.run(serve_peer(name, cert, key))
    else:
        asyncio.run(serve_peer(name, cert, key))


def target_argv(name: str, cert: str, key: str, before: str | None = None, *, callgrind: bool = False) -> list[str]:
    """``before`` is pollserve run from another tree (compiled.command puts it first on sys.path).
    Under callgrind every pass of the loop is slow: the first handshakes take seconds, and the
    slow-callback log is turned off, which would count and log every pass."""
    if name in ("pollserve", "before"):
        slow = ["--tls-handshake-timeout", "60", "--slow-callback", "0"] if callgrind else []
        return [
            *command(before if name == "before" else None), "--app", "echo", "--port", "0", "--idle-timeout", "0",
            "--tls-cert", cert, "--tls-key", key, *slow,
        ]  # fmt: skip
    return [sys.executable, __file__, "serve", name, cert, key]


# -- the clients ----------------------------------------------------------------------------------------------------


def client_context() -> ssl.SSLContext:
    """No verification: the client's CPU is not what is measured, and the certificate is ours."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class EchoClient(asyncio.Protocol):
    def __init__(self, counter: list[int], measuring: list[bool]) -> None:
        self.counter = counter
        self.measuring = measuring
        self.got = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(PAYLOAD)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():  # the window is over: aborted, though bytes already read arrive
            return
        self.got += len(data)
        if self.got >= len(PAYLOAD):
            self.got -= len(PAYLOAD)
            if self.measuring[0]:
                self.counter[0] += 1
            self.transport.write(PAYLOAD)


async def drive(scenario: str, port: int, connections: int, start: float, warmup: float, seconds: float) -> int:
    loop = asyncio.get_running_loop()
    context = client_context()
    counter, measuring = [0], [False]
    transports = []
    if scenario == "echo":
        for _ in range(connections):
            transport, _ = await loop.create_connection(
                lambda: EchoClient(counter, measuring), "127.0.0.1", port, ssl=context
            )
            transports.append(transport)
    await asyncio.sleep(max(0.0, start - time.monotonic()))

    async def handshaker() -> None:
        while True:
            transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port, ssl=context)
            transport.abort()
            if measuring[0]:
                counter[0] += 1

    workers = [asyncio.ensure_future(handshaker()) for _ in range(connections)] if scenario == "handshakes" else []
    await asyncio.sleep(warmup)
    measuring[0] = True
    await asyncio.sleep(seconds)
    measuring[0] = False
    for worker in workers:
        worker.cancel()
    for transport in transports:
        transport.abort()
    await asyncio.gather(*workers, return_exceptions=True)
    return counter[0]


def client_process(
    scenario: str, port: int, connections: int, start: float, warmup: float, seconds: float, results, driver=drive
):
    pin = pinned(CLIENT_CPU)
    if pin is not None:
        pin()
    runner = asyncio.run
    if uvloop_installed():
        import uvloop

        runner = uvloop.run
    try:
        results.put(runner(driver(scenario, port, connections, start, warmup, seconds)))
    except Exception as exc:  # reported by the parent
        results.put(f"{type(exc).__name__}: {exc}")


# -- one measurement ---------------------------------------------------------------------------------------------


def measure(
    name: str, argv: list[str], scenario: str, args: argparse.Namespace, driver: Callable[..., Any] | None = None
) -> tuple[float, float]:
    """(operations per second, server CPU microseconds per operation) against a fresh server.
    ``driver``: the clients' coroutine function instead of ``drive`` (bench_asyncio_tls.py's paced one)."""
    server = ServerProcess(name, argv, preexec_fn=pinned(SERVER_CPU))
    port = server.start()
    try:
        results: multiprocessing.Queue = multiprocessing.Queue()
        start = time.monotonic() + 2.0  # every client connected (echo) before the clock starts
        per_process = max(1, args.connections // args.client_procs)
        clients = [
            multiprocessing.Process(
                target=client_process,
                args=(scenario, port, per_process, start, args.warmup, args.seconds, results, driver or drive),
            )
            for _ in range(args.client_procs)
        ]
        for client in clients:
            client.start()
        time.sleep(max(0.0, start - time.monotonic()) + args.warmup)
        cpu_before = server.cpu_seconds()
        time.sleep(args.seconds)
        cpu = server.cpu_seconds() - cpu_before
        counts = [results.get(timeout=60) for _ in clients]
        for client in clients:
            client.join(10)
        errors = [count for count in counts if isinstance(count, str)]
        if errors:
            raise BenchError(f"{name} {scenario}: client failed: {errors[0]}")
        done = sum(counts)
    except BaseException:
        server.kill()
        raise
    server.stop()
    if not done:
        raise BenchError(f"{name} {scenario}: no operation completed")
    return done / args.seconds, 1e6 * cpu / done


#: the handshakes of the two callgrind runs whose difference counts
FEW_HANDSHAKES, MANY_HANDSHAKES = 40, 160


def handshake_in_turn(port: int, count: int) -> None:
    """count full handshakes, one after another, each with a 1-byte echo."""
    context = client_context()
    for _ in range(count):
        raw = socket.create_connection(("127.0.0.1", port), timeout=60)
        with raw, context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise BenchError("no echo")


def instructions_per_handshake(name: str, argv: list[str]) -> float:
    """The server's user-space instructions per handshake (callgrind), as the slope between
    FEW_HANDSHAKES and MANY_HANDSHAKES, so that start-up and shutdown cancel out."""
    points = []
    for count in (FEW_HANDSHAKES, MANY_HANDSHAKES):
        out = Path(tempfile.mkdtemp()) / "callgrind.out"
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
        server = ServerProcess(name, [*valgrind, *argv])
        port = server.start()
        try:
            subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], capture_output=True)
            handshake_in_turn(port, count)
            subprocess.run(["callgrind_control", "-i", "off", str(server.pid)], capture_output=True)
            subprocess.run(["callgrind_control", "-d", str(server.pid)], capture_output=True)  # the counts, now
        finally:
            server.kill()  # a Python exiting under valgrind can take longer than any stop timeout
        total = callgrind_total(out)
        if not total:
            raise BenchError(f"{name}: no callgrind counts")
        points.append(total)
    return (points[1] - points[0]) / (MANY_HANDSHAKES - FEW_HANDSHAKES)


def make_certificate(folder: str) -> tuple[str, str]:
    try:
        import trustme
    except ImportError:
        sys.exit("bench_tls: trustme is needed for the certificate (pip install trustme)")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    Path(cert).write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(key)
    return cert, key


def table(rows: dict[str, dict[str, tuple[float, float]]], baseline: str) -> str:
    """Per scenario: the rate and the server's CPU time per operation, each with its ratio to baseline."""
    lines = [
        "| target | handshakes/s | ratio | CPU us/handshake | ratio "
        "| echo 1 KiB req/s | ratio | CPU us/request | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = rows.get(baseline, {})
    for name, result in rows.items():
        cells = [name]
        for scenario in ("handshakes", "echo"):
            if scenario not in result:
                cells += ["-"] * 4
                continue
            rate, cpu = result[scenario]
            base_rate, base_cpu = base.get(scenario, (0.0, 0.0))
            cells += [
                f"{rate:,.0f}",
                f"{rate / base_rate:.2f}" if base_rate else "-",
                f"{cpu:,.1f}",
                f"{cpu / base_cpu:.2f}" if base_cpu else "-",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="pollserve,asyncio,uvloop", help="comma-separated (default: all)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default: 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds per run (default: 1)")
    parser.add_argument("--connections", type=int, default=50, help="client connections (default: 50)")
    parser.add_argument("--client-procs", type=int, default=2, help="client processes (default: 2)")
    parser.add_argument(
        "--scenarios", default="handshakes,echo", help="comma-separated, or none (default: handshakes,echo)"
    )
    parser.add_argument(
        "--instructions", action="store_true", help="also instructions per handshake (callgrind, valgrind on PATH)"
    )
    parser.add_argument("--reps", type=int, default=1, help="runs of each target, taking turns (default: 1)")
    parser.add_argument(
        "--before", metavar="DIR", help="another pollserve source tree (the folder holding pollserve/): target before"
    )
    args = parser.parse_args(argv)
    names = [name for name in args.targets.split(",") if name]
    if args.before is not None:
        if not os.path.isfile(os.path.join(args.before, "pollserve", "__init__.py")):
            sys.exit(f"bench_tls: --before {args.before}: no pollserve/__init__.py in it")
        names.append("before")
    if "uvloop" in names and not uvloop_installed():
        print("bench_tls: uvloop is not installed: left out (pip install uvloop)", file=sys.stderr)
        names.remove("uvloop")
    baseline = "uvloop" if "uvloop" in names else "before" if "before" in names else names[0]
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    instructions: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        cert, key = make_certificate(folder)
        if args.instructions:
            for name in names:
                print(f"bench_tls: {name} instructions per handshake ...", file=sys.stderr, flush=True)
                try:
                    argv = target_argv(name, cert, key, args.before, callgrind=True)
                    instructions[name] = instructions_per_handshake(name, argv)
                except BenchError as exc:
                    print(f"bench_tls: {exc}", file=sys.stderr)
        for scenario in [name for name in args.scenarios.split(",") if name != "none"]:
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
            for rep in range(args.reps):
                for name in names:
                    print(f"bench_tls: {name} {scenario} {rep + 1}/{args.reps} ...", file=sys.stderr, flush=True)
                    argv = target_argv(name, cert, key, args.before)
                    try:
                        runs[name].append(measure(name, argv, scenario, args))
                    except BenchError as exc:
                        print(f"bench_tls: {exc}", file=sys.stderr)
            for name, results in runs.items():
                if results:
                    rows.setdefault(name, {})[scenario] = (
                        statistics.median(rate for rate, _ in results),
                        statistics.median(cpu for _, cpu in results),
                    )
    print(
        f"TLS 1.3, ECDSA P-256; {ssl.OPENSSL_VERSION}; Python {sys.version.split()[0]}; {args.seconds:g} s windows, "
        f"{args.connections} connections, {args.client_procs} client processes"
        + (f"; medians of {args.reps} runs" if args.reps > 1 else "")
    )
    if rows:
        print(table(rows, baseline))
    if instructions:
        base = instructions.get(baseline)
        print("\nUser-space instructions per handshake (callgrind; a full handshake and a 1-byte echo, one client)\n")
        print("| target | instructions | ratio |\n| --- | ---: | ---: |")
        for name, count in instructions.items():
            print(f"| {name} | {count:,.0f} | {count / base:.3f} |" if base else f"| {name} | {count:,.0f} | - |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "serve":
        run_peer(sys.argv[2], sys.argv[3], sys.argv[4])
        sys.exit(0)
    sys.exit(main())
