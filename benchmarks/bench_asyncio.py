"""The asyncio face on the peers' hello: what layering asyncio over pollserve's core costs per request.

    python benchmarks/bench_asyncio.py                                       # both builds built here
    python benchmarks/bench_asyncio.py --compiled-root DIR --pure-root DIR   # builds made earlier
    python benchmarks/bench_asyncio.py --scenarios paced,hello --reps 5
    python benchmarks/bench_asyncio.py --reps 0 --instructions                 # callgrind's counts only
    python benchmarks/bench_asyncio.py --reps 11 --target uvloop --target 'pollserve asyncio (compiled), Protocol'

The same ``asyncio.Protocol`` class (pollserve.peers:AsyncioHello), and the same streams handler (a
coroutine per client: read, write, drain), served by asyncio's own loop, by uvloop and by pollserve's
loop as an asyncio loop (pollserve.aio) on the compiled and the pure build; the streams handler as
an ``async def`` app of the command's own server (``pollserve --app pollserve.peers:stream_hello``,
pollserve/handlers.py) on both builds; and, for reference, the Protocol class served by pollserve's
own callback server (``pollserve --app pollserve.peers:AsyncioHello``).  bench_peers.py's scenarios
and load generator, reps interleaved; the figure that ranks servers is the paced one, server CPU us
per request at a fixed 30,000 req/s, and the ratios are paired per rep against uvloop's Protocol
server.  The gate's table then pairs each of pollserve's asyncio servers and handler apps with
uvloop's and asyncio's of the same shape (Protocol or streams),
rep by rep: the compiled build is to cost at most 1.05 times uvloop's CPU per request and less than
asyncio's loop.  ``--instructions`` adds callgrind's user-space instructions per request for the
asyncio targets (one connection, closed loop), a count that repeats whatever else the machine
runs.  Timings never fail the run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench_builds import add_root_options, build_roots, pollserve_target
from bench_peers import SCENARIOS, Run, Target, compile_fixtures, instructions_per_request, report, run_interleaved

from pollserve.bench import uvloop_installed
from pollserve.load import raise_fd_limit


def peers_argv(root: Path | None, peer: str, app: str, streams: bool) -> list[str]:
    """``python -m pollserve.peers PEER`` from ``root`` (None: this interpreter's own pollserve)."""
    tail = [peer, "--app", app, "--port", "0", *(["--streams"] if streams else [])]
    if root is None:
        return [sys.executable, "-m", "pollserve.peers", *tail]
    bootstrap = (
        "import runpy, sys; "
        f"sys.path[:] = [{str(root)!r}, *(p for p in sys.path if p not in ('', '.'))]; "
        "runpy.run_module('pollserve.peers', run_name='__main__')"
    )
    return [sys.executable, "-c", bootstrap, *tail]


def peer_target(name: str, peer: str, streams: bool, root: Path | None = None) -> Target:
    return Target(name, lambda app: peers_argv(root, peer, app, streams))


def handler_target(name: str, root: Path) -> Target:
    """``pollserve --app pollserve.peers:stream_hello`` (or ``stream_echo``): the streams handler the
    peers run under ``asyncio.start_server``, served by the command's own server on ``root``'s build."""
    argv = pollserve_target(name, root, "epoll", False).argv
    return Target(name, lambda app: argv(f"pollserve.peers:stream_{app}"))


#: per shape, uvloop's and asyncio's targets, which pollserve's of that shape are measured against
SHAPES = {
    "Protocol": ("uvloop", "asyncio, Protocol"),
    "streams": ("uvloop, streams", "asyncio, streams"),
}

#: the gate: pollserve's compiled asyncio loop at most this many times uvloop's CPU per request
GATE = 1.05


def paired(mine: list[Run], theirs: list[Run]) -> float | None:
    """The median over reps of the ratio of CPU per request to the other target's in the same rep."""
    ratios = [a.cpu_us / b.cpu_us for a, b in zip(mine, theirs, strict=True) if a.cpu_us and b.cpu_us]
    return statistics.median(ratios) if ratios else None


def gate_table(targets: list[Target], runs: dict[tuple[str, str], list[Run]]) -> list[str]:
    """Each pollserve asyncio target against uvloop's and asyncio's of its shape (paced figure)."""
    lines = [
        "## The gate: paced CPU per request against the same shape on uvloop and on asyncio's loop",
        "",
        "| target | ratio to uvloop | ratio to asyncio's loop | compiled gate |",
        "|---|---|---|---|",
    ]
    for target in targets:
        shape = target.name.rsplit(", ", 1)[-1]
        if not target.name.startswith(("pollserve asyncio", "pollserve --app")) or shape not in SHAPES:
            continue
        uvloop, stdloop = SHAPES[shape]
        mine = runs.get((target.name, "paced"), [])
        to_uvloop = paired(mine, runs[(uvloop, "paced")]) if (uvloop, "paced") in runs else None
        to_stdloop = paired(mine, runs[(stdloop, "paced")]) if (stdloop, "paced") in runs else None
        verdict = "-"
        if "(compiled)" in target.name and to_uvloop is not None and to_stdloop is not None:
            verdict = "met" if to_uvloop <= GATE and to_stdloop < 1 else f"not met (<= {GATE} and < 1)"
        cells = [f"{value:.2f}" if value is not None else "-" for value in (to_uvloop, to_stdloop)]
        lines.append(f"| {target.name} | {cells[0]} | {cells[1]} | {verdict} |")
    return [*lines, ""]


def chosen(parser: argparse.ArgumentParser, targets: list[Target], names: list[str] | None) -> list[Target]:
    """The targets ``--target`` names (all without it); a name that is none of them is a usage error."""
    if not names:
        return targets
    unknown = set(names) - {target.name for target in targets}
    if unknown:
        parser.error(f"no target named {', '.join(sorted(unknown))}")
    return [target for target in targets if target.name in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default: 3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default: 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds per run (default: 1)")
    parser.add_argument("--connections", type=int, default=100, help="active connections (default: 100)")
    parser.add_argument("--scenarios", default="paced", help="bench_peers.py's scenarios (default: paced)")
    add_root_options(parser)
    parser.add_argument("--write", metavar="FILE", help="write the report as Markdown to FILE")
    parser.add_argument("--instructions", action="store_true", help="also instructions per request (callgrind)")
    parser.add_argument("--target", action="append", help="only this target, by name (repeatable; default: all)")
    args = parser.parse_args()
    raise_fd_limit(20_000)
    scratch = Path(tempfile.mkdtemp(prefix="pollserve-asyncio-bench-"))
    roots = build_roots(args, scratch)
    targets = [peer_target("asyncio, Protocol", "asyncio", False), peer_target("asyncio, streams", "asyncio", True)]
    if uvloop_installed():
        targets += [peer_target("uvloop", "uvloop", False), peer_target("uvloop, streams", "uvloop", True)]
    targets += [
        peer_target("pollserve asyncio (compiled), Protocol", "pollserve-asyncio", False, roots["compiled"]),
        peer_target("pollserve asyncio (compiled), streams", "pollserve-asyncio", True, roots["compiled"]),
        peer_target("pollserve asyncio (pure), Protocol", "pollserve-asyncio", False, roots["pure"]),
        peer_target("pollserve asyncio (pure), streams", "pollserve-asyncio", True, roots["pure"]),
        pollserve_target("pollserve callback server (compiled), Protocol", roots["compiled"], "epoll", True),
        handler_target("pollserve --app handler (compiled), streams", roots["compiled"]),
        handler_target("pollserve --app handler (pure), streams", roots["pure"]),
    ]
    targets = chosen(parser, targets, args.target)
    fixtures = compile_fixtures(scratch)
    wanted = [scenario for scenario in SCENARIOS if scenario.key in args.scenarios.split(",")]
    runs = run_interleaved(targets, wanted, fixtures, args, "bench_asyncio")
    extras = {}
    if args.instructions and fixtures:
        title = "User-space instructions per request (callgrind, one connection, closed loop)"
        extras[title] = {
            target.name: f"{instructions_per_request(target, fixtures):,.0f}"
            for target in targets
            if not target.name.startswith("pollserve callback")
        }
    text = report(wanted if args.reps else [], targets, runs, extras, args, fixtures).replace(
        "# pollserve against its peers", "# The asyncio face against its peers", 1
    )
    if args.reps and any(scenario.key == "paced" for scenario in wanted):
        text += "\n" + "\n".join(gate_table(targets, runs))
    print(text)
    if args.write:
        Path(args.write).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
