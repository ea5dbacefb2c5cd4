"""The compiled build against the pure one and uvloop, side by side in one interleaved run.

    python benchmarks/bench_builds.py                                # paced figure only, 5 reps: ~5 minutes
    python benchmarks/bench_builds.py --scenarios paced,hello,echo1k,echo64k,idle --tls --instructions
    python benchmarks/bench_builds.py --compiled-root DIR --pure-root DIR   # builds made earlier

Both builds of this checkout are installed into temporary folders (``pip install --target``, the pure
one with POLLSERVE_PURE_PYTHON=1) and each server is started on one of them by
``pollserve.compiled.command`` (``--version`` is checked, so a compile that fell back cannot pass as
compiled).  The targets:

- ``compiled/pure, peers' class``: pollserve serving ``pollserve.peers:AsyncioHello`` (or
  ``AsyncioEcho``), the plain-Python ``asyncio.Protocol`` class that uvloop serves too: a user's app is
  not compiled, so this is the fair comparison;
- ``compiled/pure, built-in``: pollserve's own ``hello`` and ``echo``, as shipped;
- ``uvloop`` (the same class), and the minimal C epoll server, the floor.

The scenarios are bench_peers.py's (the paced figure, server CPU per request at 30,000 req/s, ranks
servers; closed-loop rates; 5,000 idle connections), ratios paired per rep against uvloop.
``--backends epoll,poll`` adds the other backends for both builds; ``--tls`` adds bench_tls.py's echo
over TLS; ``--instructions`` callgrind's instructions per request.  Timings never fail the run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from bench_peers import SCENARIOS, Target, compile_fixtures, instructions_per_request, report, run_interleaved

from pollserve.bench import BenchError, peer_argv, uvloop_installed
from pollserve.compiled import command
from pollserve.load import raise_fd_limit

REPO = Path(__file__).resolve().parent.parent
BUILDS = {"compiled": "compiled", "pure": "pure Python"}
PEER_CLASS = {"hello": "pollserve.peers:AsyncioHello", "echo": "pollserve.peers:AsyncioEcho"}


def install(build: str, folder: Path) -> Path:
    """This checkout installed into folder as the given build; its --version is checked."""
    env = dict(os.environ)
    env.pop("POLLSERVE_PURE_PYTHON", None)
    if build == "pure":
        env["POLLSERVE_PURE_PYTHON"] = "1"
    print(f"bench_builds: installing the {build} build into {folder}", file=sys.stderr)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder), str(REPO)],
        env=env,
        check=True,
    )
    check(build, folder)
    return folder


def add_root_options(parser: argparse.ArgumentParser) -> None:
    """``--compiled-root`` and ``--pure-root``, which build_roots() reads."""
    parser.add_argument("--compiled-root", type=Path, help="a folder holding the compiled build (else built)")
    parser.add_argument("--pure-root", type=Path, help="a folder holding the pure build (else built)")


def build_roots(args: argparse.Namespace, scratch: Path) -> dict[str, Path]:
    """Each build's folder: ``--compiled-root``/``--pure-root`` when given (checked), else installed in scratch."""
    roots: dict[str, Path] = {}
    for build in BUILDS:
        given = getattr(args, f"{build}_root")
        if given is not None:
            check(build, given)
            roots[build] = given
        else:
            roots[build] = install(build, scratch / build)
    return roots


def check(build: str, root: Path) -> None:
    version = subprocess.run([*command(str(root)), "--version"], capture_output=True, text=True, check=True).stdout
    if f"({BUILDS[build]})" not in version:
        sys.exit(f"bench_builds: {root} holds {version.strip()!r}, not the {BUILDS[build]} build")


def pollserve_target(name: str, root: Path, backend: str, peers_class: bool) -> Target:
    def argv(app: str) -> list[str]:
        spec = PEER_CLASS[app] if peers_class else app
        return [*command(str(root)), "--backend", backend, "--app", spec, "--port", "0", "--idle-timeout", "0"]

    return Target(name, argv)


def tls_echo(target: Target, root: Path | None, cert: str, key: str, args: argparse.Namespace) -> str:
    """bench_tls.py's echo of 1 KiB over established TLS connections: req/s and CPU us per request."""
    import bench_tls

    if root is None:
        argv = bench_tls.target_argv("uvloop", cert, key)
    else:
        argv = [*target.argv("echo"), "--tls-cert", cert, "--tls-key", key]
    tls_args = argparse.Namespace(seconds=args.seconds, warmup=args.warmup, connections=50, client_procs=1)
    rate, cpu = bench_tls.measure(target.name, argv, "echo", tls_args)
    return f"{rate:,.0f} req/s, {cpu:.1f} us CPU per request"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default: 5)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default: 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds per run (default: 1)")
    parser.add_argument("--connections", type=int, default=100, help="active connections (default: 100)")
    parser.add_argument("--scenarios", default="paced", help="bench_peers.py's scenarios (default: paced)")
    parser.add_argument("--backends", default="epoll", help="pollserve backends, comma-separated (default: epoll)")
    parser.add_argument("--tls", action="store_true", help="also echo over TLS (bench_tls.py), one run each")
    parser.add_argument("--instructions", action="store_true", help="also instructions per request (callgrind)")
    add_root_options(parser)
    parser.add_argument("--write", metavar="FILE", help="write the report as Markdown to FILE")
    args = parser.parse_args(argv)
    raise_fd_limit(20_000)
    scratch = Path(tempfile.mkdtemp(prefix="pollserve-builds-"))
    roots = build_roots(args, scratch)
    fixtures = compile_fixtures(scratch)
    targets: list[Target] = []
    root_of: dict[str, Path | None] = {}
    for backend in args.backends.split(","):
        suffix = "" if backend == "epoll" else f", {backend}"
        for peers_class, kind in ((True, "peers' class"), (False, "built-in")):
            for build in BUILDS:
                target = pollserve_target(f"{build}, {kind}{suffix}", roots[build], backend, peers_class)
                targets.append(target)
                root_of[target.name] = roots[build]
    if uvloop_installed():
        targets.append(Target("uvloop", lambda app: peer_argv("uvloop", app)))
        root_of["uvloop"] = None
    if "c_server" in fixtures:
        targets.append(Target("minimal C epoll server", lambda app: [str(fixtures["c_server"]), "0", app]))
    wanted = [s for s in SCENARIOS if s.key in args.scenarios.split(",")] if args.reps else []
    runs = run_interleaved(targets, wanted, fixtures, args, "bench_builds")
    extras: dict[str, dict[str, str]] = {}

    def each(title: str, names: list[str], compute: Callable[[Target], str]) -> None:
        extras[title] = {}
        by_name = {t.name: t for t in targets}
        for name in names:
            print(f"bench_builds: {title}: {name}", file=sys.stderr)
            try:
                extras[title][name] = compute(by_name[name])
            except BenchError as exc:  # one target's failure must not lose the whole run's tables
                extras[title][name] = f"failed: {exc}"
            print(f"bench_builds: {title}: {name}: {extras[title][name]}", file=sys.stderr)

    if args.tls:
        from bench_tls import make_certificate

        cert, key = make_certificate(str(scratch))
        names = [t.name for t in targets if t.name in root_of]
        each(
            "echo 1 KiB over TLS, 50 connections (bench_tls.py)",
            names,
            lambda t: tls_echo(t, root_of[t.name], cert, key, args),
        )
    if args.instructions and shutil.which("valgrind") and fixtures:
        names = [t.name for t in targets]
        each(
            "User-space instructions per request (callgrind, one connection, hello)",
            names,
            lambda t: f"{instructions_per_request(t, fixtures):,.0f}",
        )
    text = report(wanted, targets, runs, extras, args, fixtures).replace(
        "# pollserve against its peers", "# pollserve: the compiled build, the pure one and uvloop", 1
    )
    if args.write:
        Path(args.write).write_text(text + "\n")
    print(text)
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
