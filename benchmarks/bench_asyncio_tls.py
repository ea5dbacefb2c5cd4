"""TLS echo on the asyncio face: server CPU per request at a paced rate, against asyncio's loop and uvloop.

    python benchmarks/bench_asyncio_tls.py                                       # both builds built here
    python benchmarks/bench_asyncio_tls.py --compiled-root DIR --pure-root DIR   # builds made earlier
    python benchmarks/bench_asyncio_tls.py --reps 5 --rate 4000 --connections 50

The same server on every asyncio loop: ``loop.create_server(pollserve.peers.AsyncioEcho, ssl=context)``
with the context pollserve builds (pollserve.tls.server_context), so the certificate, ciphers and
versions are the same; on pollserve's loop that is asyncio's own ``sslproto.SSLProtocol`` over
pollserve's stream transport (pollserve/aio/tls.py).  Beside them, for the question whether a TLS
layer of pollserve's own would be cheaper under asyncio code, pollserve's callback server with its
own TLS layer (``pollserve --app echo --tls-cert ...``) on the same traffic.

The same two pollserve servers without TLS, on the same traffic, say how much of each figure is the TLS
layer itself (its figure less the plain one).

The traffic: established TLS connections (the handshakes happen before the window), 1 KiB requests
echoed, one outstanding per connection, sent at a fixed total rate by two client processes (uvloop
when installed, else asyncio).  The figure is the server's CPU microseconds per request answered in
the measured window; every target serves the same rate, so the figures compare what each spends
per request, not how fast a client can go.  Reps are interleaved (every target once per rep) and the
medians reported, with each one's ratio to uvloop paired per rep.  On Linux the server runs on CPU 0
and the clients on CPU 1.  Timings never fail the run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
PAYLOAD = b"x" * 1024


# -- the servers (run in their own process, with the build's folder first on sys.path) ------------------------


async def serve_echo(name: str, cert: str, key: str, tls: bool) -> None:
    import signal

    from pollserve.peers import AsyncioEcho, listening
    from pollserve.tls import TLSOptions, server_context

    loop = asyncio.get_running_loop()
    context = server_context(TLSOptions(cert, key)) if tls else None
    server = await loop.create_server(AsyncioEcho, "127.0.0.1", 0, ssl=context, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    listening(server.sockets[0].getsockname(), name, "echo")
    await stop.wait()
    server.close()
    await server.wait_closed()


def serve(name: str, cert: str, key: str, tls: str = "tls") -> None:
    """One asyncio echo server (TLS unless ``tls`` is "plain") on the loop ``name`` names, until SIGTERM."""
    main = serve_echo(name, cert, key, tls != "plain")
    if name == "uvloop":
        import uvloop

        uvloop.run(main)
    elif name == "asyncio":
        asyncio.run(main)
    else:
        import pollserve

        pollserve.run(main, backend="epoll")


def server_argv(name: str, cert: str, key: str, root: Path | None, tls: bool = True) -> list[str]:
    paths = [str(BENCHMARKS)] if root is None else [str(root), str(BENCHMARKS)]
    bootstrap = (
        f"import sys; sys.path[:] = [*{paths!r}, *(p for p in sys.path if p not in ('', '.'))]; "
        "import bench_asyncio_tls; bench_asyncio_tls.serve(*sys.argv[1:])"
    )
    return [sys.executable, "-c", bootstrap, name, cert, key, "tls" if tls else "plain"]


def callback_server_argv(cert: str, key: str, root: Path, tls: bool = True) -> list[str]:
    from pollserve.compiled import command

    return [
        *command(str(root)), "--backend", "epoll", "--app", "echo", "--port", "0", "--idle-timeout", "0",
        *(["--tls-cert", cert, "--tls-key", key] if tls else []),
    ]  # fmt: skip


# -- the paced clients -------------------------------------------------------------------------------------------


class PacedClient(asyncio.Protocol):
    """One request outstanding at most; ``idle`` when its echo is whole."""

    def __init__(self, answered: list[int], measuring: list[bool]) -> None:
        self.answered = answered
        self.measuring = measuring
        self.idle = True
        self.got = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self) -> None:
        self.idle = False
        self.transport.write(PAYLOAD)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= len(PAYLOAD):
            self.got -= len(PAYLOAD)
            self.idle = True
            if self.measuring[0]:
                self.answered[0] += 1


async def paced(scenario: str, port: int, connections: int, start: float, warmup: float, seconds: float) -> int:
    """Requests answered in the window; ``scenario`` is "tls RATE" or "plain RATE" (this process's rate)."""
    import bench_tls

    kind, rate_text = scenario.split()
    rate = float(rate_text)
    loop = asyncio.get_running_loop()
    context = bench_tls.client_context() if kind == "tls" else None
    answered, measuring = [0], [False]
    clients: list[PacedClient] = []
    for _ in range(connections):
        _, client = await loop.create_connection(
            lambda: PacedClient(answered, measuring), "127.0.0.1", port, ssl=context
        )
        clients.append(client)
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    began = time.monotonic()
    window = (began + warmup, began + warmup + seconds)
    sent = 0
    while (now := time.monotonic()) < window[1]:
        measuring[0] = now >= window[0]
        for _ in range(int((now - began) * rate) - sent):
            client = clients[sent % connections]
            sent += 1
            if client.idle:  # else it is still waiting for its echo: that request is skipped
                client.send()
        await asyncio.sleep(0.002)
    measuring[0] = False
    for client in clients:
        client.transport.abort()
    return answered[0]


def main() -> int:
    from bench_builds import add_root_options, build_roots
    from bench_tls import make_certificate, measure

    from pollserve.bench import uvloop_installed

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default: 5)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default: 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds per run (default: 1)")
    parser.add_argument("--connections", type=int, default=50, help="TLS connections (default: 50)")
    parser.add_argument("--rate", type=float, default=4000.0, help="requests per second in all (default: 4000)")
    parser.add_argument("--client-procs", type=int, default=2, help="client processes (default: 2)")
    add_root_options(parser)
    parser.add_argument("--write", metavar="FILE", help="write the report as Markdown to FILE")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="pollserve-asyncio-tls-bench-"))
    roots = build_roots(args, scratch)
    cert, key = make_certificate(str(scratch))
    targets = {"asyncio": server_argv("asyncio", cert, key, None)}
    if uvloop_installed():
        targets["uvloop"] = server_argv("uvloop", cert, key, None)
    targets["pollserve asyncio (compiled), sslproto"] = server_argv("pollserve", cert, key, roots["compiled"])
    targets["pollserve asyncio (pure), sslproto"] = server_argv("pollserve", cert, key, roots["pure"])
    targets["pollserve callback server (compiled), its TLS layer"] = callback_server_argv(cert, key, roots["compiled"])
    # the same servers without TLS: what is left of each figure above is its TLS layer's cost
    targets["pollserve asyncio (compiled), no TLS"] = server_argv("pollserve", cert, key, roots["compiled"], False)
    targets["pollserve callback server (compiled), no TLS"] = callback_server_argv(cert, key, roots["compiled"], False)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
    for rep in range(args.reps):
        for name, argv in targets.items():
            scenario = f"{'plain' if name.endswith('no TLS') else 'tls'} {args.rate / args.client_procs}"
            runs[name].append(measure(name, argv, scenario, args, paced))
            rate, cpu = runs[name][-1]
            print(f"rep {rep + 1}: {name}: {rate:,.0f} req/s, {cpu:.1f} us CPU/req", file=sys.stderr)
    baseline = "uvloop" if "uvloop" in runs else "asyncio"
    lines = [
        "# TLS echo on the asyncio face",
        "",
        f"{args.connections} connections, 1 KiB echoed, {args.rate:,.0f} req/s paced, {args.seconds:g} s windows, "
        f"{args.reps} interleaved reps (medians; ratios paired per rep to {baseline}); "
        f"Python {sys.version.split()[0]}.",
        "",
        f"| server | req/s | server CPU us/req | x {baseline} |",
        "|---|---:|---:|---:|",
    ]
    for name, results in runs.items():
        ratios = [mine[1] / theirs[1] for mine, theirs in zip(results, runs[baseline], strict=True)]
        lines.append(
            f"| {name} | {statistics.median(r[0] for r in results):,.0f} "
            f"| {statistics.median(r[1] for r in results):.1f} | {statistics.median(ratios):.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.write:
        Path(args.write).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
