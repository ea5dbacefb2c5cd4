"""uvicorn on pollserve's loop, beside asyncio's loop and uvloop: what a real ASGI server costs per request.

    python benchmarks/bench_uvicorn.py                                       # both builds built here
    python benchmarks/bench_uvicorn.py --compiled-root DIR --pure-root DIR   # builds made earlier
    python benchmarks/bench_uvicorn.py --reps 1 --seconds 2 --warmup 1       # a quick look
    python benchmarks/bench_uvicorn.py --reps 0 --instructions --target uvloop --target 'pollserve (compiled)'

uvicorn serves the same minimal ASGI app (benchmarks/uvicorn_app.py: a fixed 12-byte body) with
``--http httptools``, one worker and the access log off, once per loop: ``--loop asyncio``, ``--loop
uvloop``, and ``--loop pollserve:new_event_loop`` on pollserve's compiled build and on its pure one
(bench_builds.py's roots; the server's ``sys.path`` starts with the build's folder).  The load is
bench_peers.py's C load generator in its HTTP mode: keep-alive ``GET /`` requests over a few
connections, paced at a rate every loop sustains on a small machine, each reply checked to be a
complete 200 with the app's body.  The figure is the server's CPU us per request at that rate, reps
interleaved, each target's ratio to uvloop paired per rep; the gate is pollserve's compiled build at
most 1.05 times uvloop's.  ``--instructions`` adds callgrind's user-space instructions per request
(one connection, closed loop; bench_peers.py's), a count that repeats whatever else the machine runs.
Timings never fail the run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench_asyncio import GATE, chosen, paired
from bench_backends import package_version
from bench_builds import add_root_options, build_roots
from bench_peers import Run, Scenario, Target, compile_fixtures, instructions_per_request, report, run_interleaved

from pollserve.load import raise_fd_limit

HERE = Path(__file__).resolve().parent
#: the target every ratio is taken against
UVLOOP = "uvloop"
COMPILED = "pollserve (compiled)"


def uvicorn_argv(loop: str, root: Path | None) -> list[str]:
    """uvicorn's own command line, in a new interpreter whose ``sys.path`` starts with ``root`` (the
    pollserve build its loop comes from) and leaves the working directory out, so that a checkout's
    source cannot stand in for the build.  uvicorn raises the SIGTERM it shut down on again once it is
    done, to die of it; the handler it finds then exits 0, as the other servers do."""
    path = [str(root)] if root is not None else []
    bootstrap = (
        "import signal, sys; "
        f"sys.path[:] = [*{path!r}, *(p for p in sys.path if p not in ('', '.'))]; "
        "signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0)); "
        "sys.argv[0] = 'uvicorn'; "
        "from uvicorn.main import main; main()"
    )
    options = ["--app-dir", str(HERE), "--host", "127.0.0.1", "--port", "0", "--http", "httptools"]
    options += ["--loop", loop, "--no-access-log", "--lifespan", "off"]
    return [sys.executable, "-c", bootstrap, "uvicorn_app:app", *options]


def uvicorn_target(name: str, loop: str, root: Path | None = None) -> Target:
    return Target(name, lambda app: uvicorn_argv(loop, root))


def sustained_table(scenario: Scenario, targets: list[Target], runs: dict[tuple[str, str], list[Run]]) -> list[str]:
    """The rate each target answered at: every rep is to be near the offered one, or the CPU figure is
    a figure of a server that fell behind."""
    lines = [f"## Requests answered per second (offered: {scenario.rate:,.0f})", ""]
    lines += ["| target | median | all reps |", "|---|---|---|"]
    for target in targets:
        rates = [run.rate for run in runs.get((target.name, scenario.key), [])]
        if rates:
            shown = ", ".join(f"{rate:,.0f}" for rate in rates)
            lines.append(f"| {target.name} | {statistics.median(rates):,.0f} | {shown} |")
    return [*lines, ""]


def gate_line(runs: dict[tuple[str, str], list[Run]], key: str) -> list[str]:
    if (COMPILED, key) not in runs or (UVLOOP, key) not in runs:
        return []
    ratio = paired(runs[(COMPILED, key)], runs[(UVLOOP, key)])
    if ratio is None:
        return []
    verdict = "met" if ratio <= GATE else "not met"
    return [f"Gate: {COMPILED} at most {GATE} times uvloop's CPU per request: {ratio:.2f}, {verdict}.", ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default: 5)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default: 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds per run (default: 1)")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections (default: 8)")
    parser.add_argument("--rate", type=float, default=5000, help="requests per second, paced (default: 5000)")
    add_root_options(parser)
    parser.add_argument("--write", metavar="FILE", help="write the report as Markdown to FILE")
    parser.add_argument("--instructions", action="store_true", help="also instructions per request (callgrind)")
    parser.add_argument("--target", action="append", help="only this target, by name (repeatable; default: all)")
    args = parser.parse_args()
    raise_fd_limit(1024)
    scratch = Path(tempfile.mkdtemp(prefix="pollserve-uvicorn-bench-"))
    fixtures = compile_fixtures(scratch)
    if "c_load" not in fixtures:
        sys.exit("bench_uvicorn: needs the C load generator (a C compiler, Linux)")
    roots = build_roots(args, scratch)
    targets = [
        uvicorn_target("asyncio", "asyncio"),
        uvicorn_target(UVLOOP, "uvloop"),
        uvicorn_target(COMPILED, "pollserve:new_event_loop", roots["compiled"]),
        uvicorn_target("pollserve (pure)", "pollserve:new_event_loop", roots["pure"]),
    ]
    targets = chosen(parser, targets, args.target)
    title = f"GET / over HTTP/1.1 keep-alive, paced at {args.rate:,.0f} req/s: server CPU us per request"
    scenario = Scenario("paced", title, app="http", rate=args.rate)
    runs = run_interleaved(targets, [scenario], fixtures, args, "bench_uvicorn")
    extras: dict[str, dict[str, str]] = {}
    if args.instructions:
        title = "User-space instructions per request (callgrind, one connection, closed loop)"
        extras[title] = {t.name: f"{instructions_per_request(t, fixtures, 'http'):,.0f}" for t in targets}
    server = (
        f"- server: uvicorn {package_version('uvicorn')} (--http httptools, httptools "
        f"{package_version('httptools')}), one worker, access log off, app benchmarks/uvicorn_app.py"
    )
    text = report([scenario] if args.reps else [], targets, runs, extras, args, fixtures)
    text = text.replace("# pollserve against its peers\n\n", f"# uvicorn on pollserve's loop\n\n{server}\n", 1)
    if args.reps:
        text = "\n".join([text, *sustained_table(scenario, targets, runs), *gate_line(runs, scenario.key)])
    print(text)
    if args.write:
        Path(args.write).write_text(text + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
