"""``pollserve bench``: which backend should I use here, and why?  Measured on this machine.

For every backend available (or those asked for), optionally asyncio and uvloop as peers, and every
count of idle connections asked for, a fresh server and a paced load from a child process.  Reported
are the figures that stay meaningful when the client is slower than the server: the server's CPU time
per request, the latency's median and 99th percentile, and the server's RSS.  Idle connections cost a
select or poll server on every wakeup, since the whole interest set is handed to the kernel each time,
and cost epoll or kqueue nothing: the CPU per request across the idle counts is that difference.

The same machinery (ServerProcess, measure(), pollserve.load) runs the maintainers' comparisons in
``benchmarks/``: one load client, not two that drift.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import psutil

from . import __version__, compiled
from .backends import BACKENDS
from .backends.select import FD_SETSIZE
from .load import LoadError, LoadProcess, LoadSpec

#: the line a server logs once it listens: pollserve's and its peers', or uvicorn's
LISTENING = re.compile(r"(?:listening on |Uvicorn running on http://)127\.0\.0\.1:(\d+)\b")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
#: select watches fds below FD_SETSIZE only: its idle connections stay this far below it
SELECT_HEADROOM = 124


class BenchError(Exception):
    """A run that could not be measured; the message is for the user as it is."""


# -- the server under test ---------------------------------------------------------------------------


class ServerProcess:
    """A server subprocess on port 0 whose stderr a thread drains, so the pipe never fills."""

    def __init__(self, name: str, argv: Sequence[str], **popen_kwargs: Any) -> None:
        self.name = name
        self.argv = list(argv)
        self.popen_kwargs = popen_kwargs  # preexec_fn, env
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.tail: deque[str] = deque(maxlen=20)
        self._reader: threading.Thread | None = None

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with self.proc.stderr:
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                self.tail.append(line)
                self.lines.put(line)
        self.lines.put(None)

    def describe_tail(self) -> str:
        return "\n".join(f"    | {line}" for line in self.tail) or "    (no output)"

    def start(self) -> int:
        """Start it and return its port, once it logged its 'listening on' line."""
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **self.popen_kwargs
        )
        self._reader = threading.Thread(target=self._drain, name=f"stderr-{self.name}", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise BenchError(f"{self.name}: no 'listening on' line in {START_TIMEOUT:g} s") from None
            if line is None:
                self.kill()
                raise BenchError(f"{self.name}: exited before listening:\n{self.describe_tail()}")
            found = LISTENING.search(line)
            if found:
                return int(found.group(1))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """CPU time of the server's threads and of its worker processes (--workers), alive now."""
        pids = [self.pid]
        with contextlib.suppress(psutil.Error):  # gone: its own figure is 0 below
            pids += [child.pid for child in psutil.Process(self.pid).children(recursive=True)]
        return sum(process_cpu_seconds(pid) for pid in pids)

    def rss_mib(self) -> float:
        return psutil.Process(self.pid).memory_info().rss / 2**20

    def kill(self) -> None:
        """SIGKILL this server's own PID, if it still runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)

    def stop(self) -> None:
        """SIGTERM, then wait; BenchError unless it exited 0 in time."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            self.kill()
            status = self.proc.returncode
            raise BenchError(f"{self.name}: died during the run (status {status}):\n{self.describe_tail()}")
        self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"{self.name}: still running {STOP_TIMEOUT:g} s after SIGTERM; killed it") from None
        if self._reader is not None:
            self._reader.join(timeout=5)
        if status != 0:
            raise BenchError(f"{self.name}: exited with status {status} after SIGTERM:\n{self.describe_tail()}")


def process_cpu_seconds(pid: int) -> float:
    """CPU time of one process's threads: from /proc/PID/task/*/schedstat in nanoseconds where
    Linux has it, since psutil's figure moves in clock ticks (10 ms), too coarse for a few
    thousand requests; psutil elsewhere.  0 for a process that has gone."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as stats:
                total += int(stats.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            return 0.0
        return times.user + times.system


# -- targets --------------------------------------------------------------------------------------------


def pollserve_argv(backend: str, app: str = "hello") -> list[str]:
    """pollserve on one backend, idle timeout off (idle connections are the point here): the build
    this process runs, even from a folder holding another pollserve (compiled.command)."""
    return [*compiled.command(), "--backend", backend, "--app", app, "--port", "0", "--idle-timeout", "0"]


def peer_argv(peer: str, app: str = "hello") -> list[str]:
    return [sys.executable, "-m", "pollserve.peers", peer, "--app", app, "--port", "0"]


def uvloop_installed() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    argv: Callable[[str], list[str]]  # app -> command line
    #: the fds it can watch are below this (select), or None
    fd_bound: int | None = None


def targets(backends: Sequence[str], peers: bool) -> list[Target]:
    chosen = [
        Target(name, functools.partial(pollserve_argv, name), FD_SETSIZE if name == "select" else None)
        for name in backends
    ]
    if peers:
        chosen.append(Target("asyncio", functools.partial(peer_argv, "asyncio")))
        if uvloop_installed():
            chosen.append(Target("uvloop", functools.partial(peer_argv, "uvloop")))
    return chosen


# -- one measurement ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Measurement:
    target: str
    connections: int
    idle: int
    #: why idle is lower than asked for (select's FD_SETSIZE), or ""
    note: str
    requests: int
    seconds: float
    late: int
    errors: int
    cpu_us_per_request: float | None
    p50_us: float | None
    p99_us: float | None
    rss_mib: float
    #: what went wrong on some connections, if anything (the first few)
    messages: list[str] = dataclasses.field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def split(total: int, parts: int) -> list[int]:
    """``total`` connections over ``parts`` processes, as evenly as possible."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def drive(server: ServerProcess, spec: LoadSpec, processes: int = 1) -> Measurement:
    """Run a load against a started server and sample the server's CPU over the load's window.

    With several processes the connections (and the rate) are shared out, the idle ones go to
    the first, and all start together.
    """
    loads: list[LoadProcess] = []
    try:
        for index, connections in enumerate(split(spec.connections, processes)):
            part = dataclasses.replace(
                spec,
                connections=connections,
                idle=spec.idle if index == 0 else 0,
                rate=None if spec.rate is None else spec.rate * connections / spec.connections,
            )
            loads.append(LoadProcess(part))
        for load in loads:
            load.wait_ready()
        for load in loads:
            load.go()
        time.sleep(spec.warmup)
        cpu_before = server.cpu_seconds()
        time.sleep(spec.seconds)
        cpu = server.cpu_seconds() - cpu_before
        rss = server.rss_mib()
        results = [load.result() for load in loads]
    except (LoadError, psutil.Error) as exc:
        raise BenchError(f"{server.name}: {exc}") from None
    finally:
        for load in loads:
            load.close()
    requests = sum(result.requests for result in results)
    # Several processes: the worst of their percentiles (an upper bound, not a merge).
    p50s = [result.p50_us for result in results if result.p50_us is not None]
    p99s = [result.p99_us for result in results if result.p99_us is not None]
    return Measurement(
        target=server.name,
        connections=spec.connections,
        idle=spec.idle,
        note="",
        requests=requests,
        seconds=spec.seconds,
        late=sum(result.late for result in results),
        errors=sum(result.errors for result in results),
        cpu_us_per_request=cpu / requests * 1e6 if requests else None,
        p50_us=max(p50s, default=None),
        p99_us=max(p99s, default=None),
        rss_mib=round(rss, 1),
        messages=[message for result in results for message in result.messages],
    )


def measure(server: ServerProcess, spec: LoadSpec, processes: int = 1) -> Measurement:
    """Start the server, drive the load, stop the server: one fresh server per measurement."""
    spec = dataclasses.replace(spec, port=server.start())
    try:
        row = drive(server, spec, processes)
    except BaseException:
        server.kill()
        raise
    server.stop()
    return row


# -- the command -------------------------------------------------------------------------------------------


def idle_for(target: Target, idle: int, connections: int) -> tuple[int, str]:
    if target.fd_bound is None:
        return idle, ""
    ceiling = target.fd_bound - connections - SELECT_HEADROOM
    if idle <= ceiling:
        return idle, ""
    return ceiling, f"capped at {ceiling}: select watches fds below FD_SETSIZE ({target.fd_bound})"


class Progress:
    """What is running and how long is left, on stderr (one line, rewritten on a terminal)."""

    def __init__(self, total: int, per_run: float) -> None:
        self.total = total
        self.per_run = per_run
        self.done = 0
        self.tty = sys.stderr.isatty()

    def show(self, what: str) -> None:
        left = (self.total - self.done) * self.per_run
        line = f"pollserve bench: [{self.done + 1}/{self.total}] {what} (about {left:.0f} s left)"
        if self.tty:
            print(f"\r{line}\033[K", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
        self.done += 1

    def finish(self) -> None:
        if self.tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


def run(
    targets: Sequence[Target],
    idle_counts: Sequence[int],
    spec: LoadSpec,
    progress: Progress | None = None,
) -> list[Measurement]:
    rows = []
    for target in targets:
        measured: set[int] = set()
        for asked in idle_counts:
            idle, note = idle_for(target, asked, spec.connections)
            if idle in measured:  # select: two counts capped to the same figure are one run
                if progress is not None:
                    progress.done += 1
                continue
            measured.add(idle)
            if progress is not None:
                progress.show(f"{target.name}, {idle} idle connections, {spec.rate:g} requests/s")
            row = measure(ServerProcess(target.name, target.argv(spec.app)), dataclasses.replace(spec, idle=idle))
            row.note = note
            rows.append(row)
    return rows


def machine() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "pollserve": f"{__version__} ({compiled.build()})",
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value / 1000:.2f}"


def aligned(cells: Sequence[str], widths: Sequence[int]) -> str:
    """The first column left-aligned, the figures right-aligned."""
    pairs = list(zip(cells, widths, strict=True))
    first, rest = pairs[0], pairs[1:]
    return "  ".join([first[0].ljust(first[1]), *(cell.rjust(width) for cell, width in rest)])


def table(rows: Sequence[Measurement], spec: LoadSpec, about: dict[str, Any]) -> str:
    head = ["target", "idle", "cpu us/req", "p50 ms", "p99 ms", "rss MiB", "req/s", "late"]
    body = [
        [
            row.target,
            f"{row.idle}{'*' if row.note else ''}",
            "-" if row.cpu_us_per_request is None else f"{row.cpu_us_per_request:.1f}",
            _ms(row.p50_us),
            _ms(row.p99_us),
            f"{row.rss_mib:.1f}",
            f"{row.rate:,.0f}",
            str(row.late),
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    lines = [
        f"pollserve {about['pollserve']} on {about['platform']}, {about['cpus']} CPUs, {about['python']}",
        f"paced load: {spec.rate:g} requests/s over {spec.connections} connections ({spec.app}), "
        f"{spec.seconds:g} s measured after {spec.warmup:g} s",
        "",
        aligned(head, widths),
        "  ".join("-" * width for width in widths),
    ]
    lines += [aligned(line, widths) for line in body]
    for note in sorted({row.note for row in rows if row.note}):
        lines.append(f"* {note}")
    lines.append(LATE_NOTE)
    behind = [row for row in rows if row.late]
    if behind:
        lines.append(
            f"  {len(behind)} of {len(rows)} runs fell behind {spec.rate:g} requests/s: their req/s is the rate "
            "achieved, and CPU per request at a different rate ranks nothing"
        )
    lines += ["", *verdict(rows)]
    return "\n".join(lines)


#: what the ``late`` column counts, under every table
LATE_NOTE = (
    "late: requests that fell due while every load connection still waited for a reply (the server, "
    "or the load client, could not keep the pace)"
)


def verdict(rows: Sequence[Measurement]) -> list[str]:
    """The answer in a sentence: which backend costs least with the most idle connections, and how each grows."""
    backends = [row for row in rows if row.target in BACKENDS and row.cpu_us_per_request is not None]
    if not backends:
        return []
    # A capped row (select) was measured with fewer idle connections than asked: it competes
    # only when every row is capped.
    full = [row for row in backends if not row.note] or backends
    most_idle = max(row.idle for row in full)
    at_most = [row for row in full if row.idle == most_idle]
    best = min(at_most, key=lambda row: row.cpu_us_per_request or 0.0)
    lines = [f"Least CPU per request with {most_idle} idle connections: {best.target}."]
    best_cpu = best.cpu_us_per_request or 0.0
    better = sorted(
        (row for row in rows if row.target not in BACKENDS and row.idle == most_idle and row.cpu_us_per_request),
        key=lambda row: row.cpu_us_per_request or 0.0,
    )
    for row in better:
        peer_cpu = row.cpu_us_per_request or 0.0
        if peer_cpu < best_cpu:
            lines[0] += f" {row.target} did better: {peer_cpu:.1f} us per request against {best_cpu:.1f}."
    for name in dict.fromkeys(row.target for row in backends):
        own = sorted((row for row in backends if row.target == name), key=lambda row: row.idle)
        if len(own) > 1 and own[0].cpu_us_per_request and own[-1].cpu_us_per_request:
            growth = own[-1].cpu_us_per_request / own[0].cpu_us_per_request
            lines.append(
                f"  {name}: {own[0].cpu_us_per_request:.1f} us per request with {own[0].idle} idle, "
                f"{own[-1].cpu_us_per_request:.1f} with {own[-1].idle} ({growth:.1f}x)"
            )
    return lines


def plot(rows: Sequence[Measurement], spec: LoadSpec, about: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    styles = ["o-", "s-", "^-", "D-", "v-", "P--", "X--"]
    names = list(dict.fromkeys(row.target for row in rows))
    for style, name in zip(styles * len(names), names, strict=False):
        own = sorted((row for row in rows if row.target == name and row.cpu_us_per_request), key=lambda r: r.idle)
        axes.plot([row.idle for row in own], [row.cpu_us_per_request or 0.0 for row in own], style, label=name)
    axes.set_xlabel("idle connections")
    axes.set_ylabel("server CPU per request (µs)")
    axes.set_ylim(bottom=0)
    axes.set_title(f"CPU per request at {spec.rate:g} requests/s, by backend")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.text(0.01, 0.01, f"{about['platform']}, {about['python']}", fontsize=7, alpha=0.7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_problem(path: str) -> str | None:
    """Why ``--plot PATH`` could not be written after the run, found before it: the folder,
    matplotlib, the format its extension names."""
    folder = os.path.dirname(path) or os.curdir
    if not os.path.isdir(folder):
        return f"--plot {path}: there is no folder {folder}"
    if not os.access(folder, os.W_OK):
        return f"--plot {path}: cannot write in {folder}"
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return "--plot needs matplotlib (pip install 'pollserve[plot]')"
    formats = FigureCanvasAgg.get_supported_filetypes()
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension not in formats:
        known = ", ".join("." + name for name in sorted(formats))
        return f"--plot {path}: the name must end in a format matplotlib writes: {known}"
    return None


def main(args: Any) -> int:
    """The ``pollserve bench`` command; ``args`` come checked from cli.py."""
    problem = plot_problem(args.plot) if args.plot else None
    if problem:
        print(f"pollserve: {problem}", file=sys.stderr)
        return 2
    spec = LoadSpec(
        port=0,
        app=args.app,
        connections=args.connections,
        rate=args.rate,
        warmup=args.warmup,
        seconds=args.seconds,
    )
    chosen = targets(args.backends, args.peers)
    per_run = args.warmup + args.seconds + 1.5
    progress = Progress(len(chosen) * len(args.idle), per_run)
    about = machine()
    try:
        rows = run(chosen, args.idle, spec, progress)
    except BenchError as exc:
        progress.finish()
        print(f"pollserve: bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.finish()
        return 130
    progress.finish()
    if args.json:
        results = [{**dataclasses.asdict(row), "rate": round(row.rate, 1)} for row in rows]
        print(json.dumps({"machine": about, "load": dataclasses.asdict(spec), "results": results}))
    else:
        print(table(rows, spec, about))
    if args.plot:
        plot(rows, spec, about, args.plot)
        print(f"pollserve bench: plot written to {args.plot}", file=sys.stderr)
    return 0
