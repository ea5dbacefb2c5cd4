"""pollserve against its peers, side by side in one interleaved run: the maintainers' comparison.

Targets: pollserve on epoll and on poll, uvloop, the stdlib asyncio Protocol server, a plain
``selectors`` loop (pollserve.peers), and a minimal C epoll server (benchmarks/fixtures/c_server.c),
the floor.  The load comes from a C load generator (fixtures/c_load.c), so that the client is not
what is measured; both are compiled on the fly with the system compiler (``$CC``, else ``cc``), and
without one the C server is skipped and pollserve's own Python load client is used instead.  On
Linux the server runs on CPU 0 and the load generator on CPU 1.

Scenarios, each run for every target in every rep, reps interleaved so drift hits all alike:
- paced: hello at a fixed 30,000 requests/s over 100 connections: server CPU microseconds per
  request, the figure that ranks servers stably;
- closed loop: hello, echo 1 KiB and echo 64 KiB over 100 connections: requests/s;
- idle: closed-loop hello with 5,000 more idle connections: requests/s, as a share of the target's
  own 0-idle figure.
Ratios are taken per rep (paired) against uvloop, and their median reported.  Optionally
(--syscalls, --instructions) system calls per request (strace -c) and user-space instructions per
request (valgrind --tool=callgrind), and RSS per idle connection.  ``--write FILE`` writes the
tables as Markdown (benchmarks/RESULTS.md).  Timings never fail the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench_backends import cpu_model, package_version

from pollserve import __version__
from pollserve.bench import BenchError, ServerProcess, drive, peer_argv, pollserve_argv, uvloop_installed
from pollserve.load import LoadSpec, raise_fd_limit

HERE = Path(__file__).resolve().parent
SERVER_CPU, LOAD_CPU = 0, 1


def pinned(cpu: int) -> Callable[[], None] | None:
    """preexec_fn pinning a child to one CPU (Linux, with two CPUs or more), else None."""
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def compile_fixtures(build: Path, names: tuple[str, ...] = ("c_server", "c_load")) -> dict[str, Path]:
    """Compile the C fixtures (the C server and load generator by default); {} when there is no
    compiler."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler or not sys.platform.startswith("linux"):  # the fixtures use epoll and timerfd
        return {}
    built = {}
    for name in names:
        out = build / name
        result = subprocess.run(
            [compiler, "-O2", "-o", str(out), str(HERE / "fixtures" / f"{name}.c")], capture_output=True
        )
        if result.returncode != 0:
            print(f"bench_peers: cannot compile {name}.c: {result.stderr.decode()[:300]}", file=sys.stderr)
            return {}
        built[name] = out
    return built


@dataclasses.dataclass
class Target:
    name: str
    argv: Callable[[str], list[str]]  # app -> command line


def all_targets(fixtures: dict[str, Path]) -> list[Target]:
    chosen = [
        Target("pollserve epoll", lambda app: pollserve_argv("epoll", app)),
        Target("pollserve poll", lambda app: pollserve_argv("poll", app)),
    ]
    if uvloop_installed():
        chosen.append(Target("uvloop", lambda app: peer_argv("uvloop", app)))
    chosen += [
        Target("asyncio Protocol", lambda app: peer_argv("asyncio", app)),
        Target("plain selectors loop", lambda app: peer_argv("selectors", app)),
    ]
    if "c_server" in fixtures:
        chosen.append(Target("minimal C epoll server", lambda app: [str(fixtures["c_server"]), "0", app]))
    return chosen


@dataclasses.dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    app: str = "hello"
    size: int = 64
    rate: float | None = None
    idle: int = 0


SCENARIOS = [
    Scenario("paced", "hello, paced at 30,000 req/s: server CPU us per request", rate=30_000),
    Scenario("hello", "hello, closed loop: req/s"),
    Scenario("echo1k", "echo 1 KiB, closed loop: req/s", app="echo", size=1024),
    Scenario("echo64k", "echo 64 KiB, closed loop: req/s", app="echo", size=65536),
    Scenario("idle", "hello, 100 active + 5,000 idle: req/s", idle=5000),
]


@dataclasses.dataclass
class Run:
    requests: int
    seconds: float
    cpu_us: float | None
    p50_us: float | None = None
    p99_us: float | None = None

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def run_c_load(fixtures: dict[str, Path], server: ServerProcess, spec: LoadSpec, load_cpu: int = LOAD_CPU) -> Run:
    args = [str(fixtures["c_load"]), "--port", str(spec.port), "--connections", str(spec.connections)]
    args += ["--seconds", str(spec.seconds), "--warmup", str(spec.warmup), "--app", spec.app, "--size", str(spec.size)]
    args += ["--idle", str(spec.idle)] + (["--rate", str(spec.rate)] if spec.rate else [])
    load = subprocess.Popen(args, stdout=subprocess.PIPE, preexec_fn=pinned(load_cpu))
    time.sleep(spec.warmup + spec.idle / 20_000)
    cpu_before = server.cpu_seconds()
    time.sleep(spec.seconds)
    cpu = server.cpu_seconds() - cpu_before
    out, _ = load.communicate(timeout=60)
    if load.returncode != 0:
        raise BenchError(f"{server.name}: the C load generator failed")
    result = json.loads(out)
    if result["errors"]:
        raise BenchError(f"{server.name}: {result['errors']} wrong replies")
    requests = result["requests"]
    return Run(requests, spec.seconds, cpu / requests * 1e6 if requests else None, result["p50_us"], result["p99_us"])


def run_once(target: Target, scenario: Scenario, fixtures: dict[str, Path], args: argparse.Namespace) -> Run:
    server = ServerProcess(target.name, target.argv(scenario.app), preexec_fn=pinned(SERVER_CPU))
    spec = LoadSpec(
        port=server.start(),
        app=scenario.app,
        size=scenario.size,
        connections=args.connections,
        idle=scenario.idle,
        rate=scenario.rate,
        warmup=args.warmup,
        seconds=args.seconds,
    )
    try:
        if "c_load" in fixtures:
            run = run_c_load(fixtures, server, spec)
        else:
            row = drive(server, spec)
            run = Run(row.requests, row.seconds, row.cpu_us_per_request, row.p50_us, row.p99_us)
    except BaseException:
        server.kill()
        raise
    server.stop()
    return run


def run_interleaved(
    targets: list[Target], wanted: list[Scenario], fixtures: dict[str, Path], args: argparse.Namespace, label: str
) -> dict[tuple[str, str], list[Run]]:
    """Every scenario for every target in every rep, reps outermost so drift hits all alike."""
    runs: dict[tuple[str, str], list[Run]] = {(t.name, s.key): [] for t in targets for s in wanted}
    total = args.reps * len(wanted) * len(targets)
    done = 0
    for rep in range(args.reps):
        for scenario in wanted:
            for target in targets:
                done += 1
                print(f"{label}: [{done}/{total}] rep {rep + 1}, {scenario.key}, {target.name}", file=sys.stderr)
                runs[(target.name, scenario.key)].append(run_once(target, scenario, fixtures, args))
    return {key: value for key, value in runs.items() if value}


def rss_per_idle(target: Target, count: int) -> float:
    """KiB of server RSS per idle connection, from holding `count` of them."""
    server = ServerProcess(target.name, target.argv("hello"))
    port = server.start()
    try:
        time.sleep(0.5)
        before = server.rss_mib()
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
        time.sleep(1.0)
        after = server.rss_mib()
        for sock in socks:
            sock.close()
    except BaseException:
        server.kill()
        raise
    server.stop()
    return (after - before) * 1024 / count


def syscalls_per_request(target: Target, fixtures: dict[str, Path], seconds: float = 5.0) -> str:
    """strace -c attached for a closed-loop hello run; the ratio of calls to requests."""
    server = ServerProcess(target.name, target.argv("hello"))
    port = server.start()
    out = Path(tempfile.mkdtemp()) / "strace.txt"
    tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(server.pid), "-o", str(out)], stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    load = subprocess.run(
        [
            str(fixtures["c_load"]),
            "--port",
            str(port),
            "--connections",
            "100",
            "--seconds",
            str(seconds),
            "--warmup",
            "0",
        ],
        capture_output=True,
        text=True,
    )
    tracer.send_signal(2)
    tracer.wait(30)
    server.stop()
    requests = json.loads(load.stdout)["requests"]
    calls: dict[str, int] = {}
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            calls[parts[-1]] = int(parts[3])
    top = sorted(calls.items(), key=lambda item: -item[1])[:4]
    detail = ", ".join(f"{name} {count / requests:.3f}" for name, count in top)
    return f"{sum(calls.values()) / requests:.2f} ({detail})"


def callgrind_total(out: Path) -> int:
    """The instructions callgrind counted, from the files of ``--callgrind-out-file=out`` (a dump
    on demand writes ``out.1`` beside it)."""
    total = 0
    for path in glob.glob(f"{out}*"):
        for line in Path(path).read_text(errors="replace").splitlines():
            if line.startswith(("totals:", "summary:")):
                total = max(total, int(line.split()[1]))
    return total


def instructions_per_request(target: Target, fixtures: dict[str, Path], app: str = "hello") -> float:
    """User-space instructions per request (callgrind), one connection closed loop, as the slope
    between a 3 s and a 9 s run, so start-up and shutdown cancel out; ``app`` is the load's
    (hello, or http for an HTTP server)."""
    points = []
    for seconds in (3, 9):
        out = Path(tempfile.mkdtemp()) / "callgrind.out"
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
        server = ServerProcess(target.name, [*argv, *target.argv(app)])
        port = server.start()
        time.sleep(1.0)
        subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], capture_output=True)
        load = subprocess.run(
            # No warmup: its requests would be counted by callgrind and not by the load, and their
            # number varies with the machine's load, the slope would not cancel them.
            [
                str(fixtures["c_load"]),
                "--port",
                str(port),
                "--connections",
                "1",
                "--seconds",
                str(seconds),
                "--warmup",
                "0",
                "--app",
                app,
            ],
            capture_output=True,
            text=True,
        )
        subprocess.run(["callgrind_control", "-i", "off", str(server.pid)], capture_output=True)
        subprocess.run(["callgrind_control", "-d", str(server.pid)], capture_output=True)  # the counts, now
        server.kill()  # a Python exiting under valgrind can take longer than any stop timeout
        total = callgrind_total(out)
        if load.returncode != 0 or not load.stdout.strip():
            tail = " ".join(load.stderr.strip().splitlines()[-2:])
            raise BenchError(f"{target.name}: the load failed under callgrind (exit {load.returncode}): {tail}")
        points.append((total, json.loads(load.stdout)["requests"]))
    (i1, r1), (i2, r2) = points
    return (i2 - i1) / (r2 - r1)


def figure(run: Run, cpu: bool) -> float | None:
    """The figure a scenario ranks by: CPU us per request (paced) or requests/s (closed loop)."""
    return run.cpu_us if cpu else run.rate


def median_ratio(runs: list[Run], peers: list[Run], cpu: bool) -> str:
    """The median over reps of this target's figure divided by the peer's in the same rep."""
    pairs = [(figure(mine, cpu), figure(theirs, cpu)) for mine, theirs in zip(runs, peers, strict=True)]
    ratios = [mine / theirs for mine, theirs in pairs if mine and theirs]
    return f"{statistics.median(ratios):.2f}" if ratios else "-"


def header(args: argparse.Namespace, fixtures: dict[str, Path]) -> list[str]:
    load = "C load generator (fixtures/c_load.c)" if "c_load" in fixtures else "pollserve.load (Python)"
    pinning = "; server pinned to CPU 0, load to CPU 1" if pinned(0) else ""
    return [
        "# pollserve against its peers",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {platform.platform()}; {cpu_model()}, {os.cpu_count()} logical CPUs",
        f"- python: {platform.python_implementation()} {platform.python_version()}; pollserve {__version__}; "
        f"uvloop {package_version('uvloop')}; psutil {package_version('psutil')}",
        f"- load: {load}, {args.connections} connections, {args.seconds:g} s measured after {args.warmup:g} s, "
        f"{args.reps} reps interleaved{pinning}",
        "- each row: the median of the reps, the median of the per-rep ratios to uvloop, and every rep",
        "",
    ]


def scenario_table(
    scenario: Scenario, targets: list[Target], runs: dict[tuple[str, str], list[Run]], floor: str | None
) -> list[str]:
    cpu = scenario.rate is not None
    uvloop = "uvloop" if ("uvloop", scenario.key) in runs else None
    lines = [f"## {scenario.title}", "", "| target | median | ratio to uvloop | all reps |", "|---|---|---|---|"]
    medians: dict[str, float] = {}
    for target in targets:
        own = runs[(target.name, scenario.key)]
        values = [value for run in own if (value := figure(run, cpu)) is not None]
        if not values:
            continue
        medians[target.name] = statistics.median(values)
        cell = f"{medians[target.name]:.2f}" if cpu else f"{medians[target.name]:,.0f}"
        if scenario.key == "idle" and (target.name, "hello") in runs:
            base = [run.rate for run in runs[(target.name, "hello")]]
            share = statistics.median([run.rate / b for run, b in zip(own, base, strict=True) if b])
            cell += f" ({share:.0%} of its 0-idle)"
        ratio = median_ratio(own, runs[(uvloop, scenario.key)], cpu) if uvloop else "-"
        shown = ", ".join(f"{value:.2f}" if cpu else f"{value:,.0f}" for value in values)
        lines.append(f"| {target.name} | {cell} | {ratio} | {shown} |")
    if cpu and floor in medians:
        above = ", ".join(f"{name} {value - medians[floor]:.2f}" for name, value in medians.items() if name != floor)
        lines += ["", f"Python overhead, us per request above the C server (medians): {above}"]
    return [*lines, ""]


def report(
    scenarios: list[Scenario],
    targets: list[Target],
    runs: dict[tuple[str, str], list[Run]],
    extras: dict[str, dict[str, str]],
    args: argparse.Namespace,
    fixtures: dict[str, Path],
) -> str:
    floor = "minimal C epoll server" if "c_server" in fixtures else None
    lines = header(args, fixtures)
    for scenario in scenarios:
        lines += scenario_table(scenario, targets, runs, floor)
    for title, rows in extras.items():
        lines += [f"## {title}", "", "| target | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in rows.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default: 3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default: 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds per run (default: 1)")
    parser.add_argument("--connections", type=int, default=100, help="active connections (default: 100)")
    parser.add_argument("--scenarios", default=",".join(s.key for s in SCENARIOS), help="which scenarios to run")
    parser.add_argument("--rss", action="store_true", help="also RSS per idle connection (10,000 held)")
    parser.add_argument("--syscalls", action="store_true", help="also system calls per request (strace -c)")
    parser.add_argument("--instructions", action="store_true", help="also instructions per request (callgrind)")
    parser.add_argument("--write", metavar="FILE", help="write the report as Markdown to FILE")
    args = parser.parse_args(argv)
    raise_fd_limit(20_000)
    build = Path(tempfile.mkdtemp(prefix="pollserve-fixtures-"))
    fixtures = compile_fixtures(build)
    if not fixtures:
        print("bench_peers: no C compiler: no C server, and the Python load client", file=sys.stderr)
    targets = all_targets(fixtures)
    wanted = [s for s in SCENARIOS if s.key in args.scenarios.split(",")]
    runs = run_interleaved(targets, wanted, fixtures, args, "bench_peers")

    def publish(extras: dict[str, dict[str, str]]) -> None:
        text = report(wanted, targets, runs, extras, args, fixtures)
        if args.write:
            Path(args.write).write_text(text + "\n")
        else:
            print(text)

    publish({})  # the scenarios are safe on disk before the slower extras start
    extras: dict[str, dict[str, str]] = {}
    by_name = {t.name: t for t in targets}
    chosen = [name for name in ("pollserve epoll", "uvloop", "asyncio Protocol") if name in by_name]

    def each(title: str, names: list[str], compute: Callable[[Target], str]) -> None:
        extras[title] = {}
        for name in names:
            print(f"bench_peers: {title}: {name}", file=sys.stderr)
            try:
                extras[title][name] = compute(by_name[name])
            except (BenchError, OSError, ValueError, KeyError) as exc:
                extras[title][name] = f"failed: {exc}"

    if args.rss:
        each("RSS per idle connection (10,000 held), KiB", chosen, lambda t: f"{rss_per_idle(t, 10_000):.2f}")
    if args.syscalls and shutil.which("strace") and fixtures:
        names = [*chosen, "minimal C epoll server"]
        each(
            "System calls per request (strace -c, closed-loop hello, 100 connections)",
            names,
            lambda t: syscalls_per_request(t, fixtures),
        )
    if args.instructions and shutil.which("valgrind") and fixtures:
        names = [*chosen, "plain selectors loop", "minimal C epoll server"]
        each(
            "User-space instructions per request (callgrind, one connection)",
            names,
            lambda t: f"{instructions_per_request(t, fixtures):,.0f}",
        )
    if extras:
        publish(extras)
    if args.write:
        print(Path(args.write).read_text())
    shutil.rmtree(build, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
