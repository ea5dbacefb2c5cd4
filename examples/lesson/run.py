"""Run the same loads against every step of the lesson and print what each one could do.

    python examples/lesson/run.py            # every load, 2,000 connections included (a minute or two)
    python examples/lesson/run.py --short    # small and fast: 2,000 connections left out
    python examples/lesson/run.py --json     # the results as JSON (what tests/test_lesson.py reads)

Each load starts a fresh server of each step in a subprocess on 127.0.0.1, port 0, and stops it by
its PID when the load ends, also when the load fails.  Every load is bounded in connections and in
time.  Step 4 runs on every backend this OS has, or, when POLLSERVE_BACKEND is set, on that one
only, as every pollserve command would.  POSIX only: the fd limits are set through the resource
module.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import platform
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from shared import HELLO

try:
    import resource
except ImportError:  # Windows has no RLIMIT_NOFILE to set
    sys.exit("run.py: the lesson runs on POSIX systems only: it sets fd limits through the resource module")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if (ROOT / "pollserve").is_dir():  # run from a checkout: the servers and this script use its pollserve
    sys.path.insert(0, str(ROOT))

from pollserve import available_backends  # noqa: E402
from pollserve.backends import BackendError, get_backend  # noqa: E402

REQUEST = b"hi\n"
#: HELLO repeated this many times is a 1 MB reply (1,048,584 bytes)
MEGABYTE = 87_382
#: an 8 MB reply: more than the kernel holds for one socket (4 MB send buffer at most on Linux,
#: net.ipv4.tcp_wmem), so a server that does not buffer has to wait for the client to read
BIG = 8 * MEGABYTE
#: the receive buffer of the clients that read slowly or not at all: set before connect(), it also
#: turns off the kernel's autotuning of that buffer (tcp(7)), so the amount in flight is known
SMALL_RCVBUF = 64 * 1024
#: requests the client that stops reading sends after its first, each asking for BIG more
EXTRA_REQUESTS = 20
#: the server's fd limit in the EMFILE load (soft and hard, so that pollserve cannot raise it)
EMFILE_LIMIT = 64
#: a step's server has this long to say where it listens
START_TIMEOUT = 15.0
#: pollserve's default --shutdown-timeout, and then some: a server stopping longer than this is stuck
STOP_TIMEOUT = 10.0
#: the order in which step 4 is shown on each backend this OS has
BACKEND_ORDER = ("select", "poll", "devpoll", "kqueue", "epoll")


@dataclasses.dataclass(frozen=True)
class Step:
    key: str
    title: str
    command: tuple[str, ...]


def lesson_steps(backend: str | None = None) -> list[Step]:
    """Steps 1-3, then step 4 once for each backend this OS has, or only on ``backend`` (a name
    ``pollserve --backend`` takes: POLLSERVE_BACKEND chooses it here as it does for pollserve)."""
    steps = [
        Step("1", "blocking", ("step1_blocking.py",)),
        Step("2", "two functions", ("step2_functions.py",)),
        Step("3", "select() loop", ("step3_select.py",)),
    ]
    if backend is not None:
        name = get_backend(backend).name  # BackendError: unknown, or missing on this OS
        return [*steps, Step(f"4-{name}", f"pollserve, {name}", ("step4_pollserve.py", "--backend", backend))]
    have = set(available_backends())
    for name in BACKEND_ORDER:
        if name in have:
            steps.append(Step(f"4-{name}", f"pollserve, {name}", ("step4_pollserve.py", "--backend", name)))
    return steps


@dataclasses.dataclass(frozen=True)
class Settings:
    short: bool
    #: clients of the "N clients at once" load
    clients: int
    #: how long a client waits for a reply before it counts as waiting
    wait: float
    #: a load of many connections ends when nothing has happened for this long
    stall: float


SHORT = Settings(short=True, clients=5, wait=0.5, stall=0.5)
FULL = Settings(short=False, clients=50, wait=2.0, stall=2.0)


class ServerProcess:
    """One step's server on 127.0.0.1, port 0, in a subprocess; its output goes to a file.

    A context manager: leaving it stops the server by its PID (SIGTERM, then SIGKILL after
    STOP_TIMEOUT), whatever happened inside.
    """

    def __init__(self, step: Step, workdir: Path, *, repeat: int = 1, fd_limit: int | None = None) -> None:
        self.step = step
        self.log_path = workdir / f"step{step.key}-{time.monotonic_ns()}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        command = [sys.executable, str(HERE / step.command[0]), *step.command[1:]]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*command, "--port", "0", "--repeat", str(repeat)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=None if fd_limit is None else lambda: limit_fds(fd_limit),
            )
        try:
            self.address = self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self) -> tuple[str, int]:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(r"listening on ([0-9.]+):(\d+)", self.output())
            if found:
                return found[1], int(found[2])
            if self.proc.poll() is not None:
                raise RuntimeError(f"step {self.step.key} exited {self.proc.returncode}: {self.last_line()}")
            time.sleep(0.02)
        raise RuntimeError(f"step {self.step.key} did not say where it listens within {START_TIMEOUT} s")

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def wait_exit(self, seconds: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(seconds)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self) -> list[str]:
        # pollserve's log lines start with a time stamp and a level: the message is what matters here
        return [re.sub(r"^\S+ \S+ [A-Z]+ ", "", line) for line in self.output().splitlines() if line.strip()]

    def last_line(self) -> str:
        lines = self.lines()
        return lines[-1] if lines else ""

    def outcome(self, *notable: str) -> dict[str, Any]:
        """Whether the server still runs, how it ended, and what it said: its last line if it
        ended, else its first line containing one of ``notable``."""
        code = self.proc.poll()
        lines = self.lines()
        found = (line for word in notable for line in lines if word in line)
        said = (lines[-1] if lines else "") if code is not None else next(found, "")
        return {"server_running": code is None, "exit_code": code, "server_said": said}


def limit_fds(limit: int) -> None:
    """In the child, before it runs: an fd limit it cannot raise."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def raise_fd_limit(needed: int) -> tuple[int, int, int]:
    """Raise this process's soft fd limit to at least ``needed`` if the hard limit allows: the
    servers started afterwards inherit it.  Returns (soft before, soft now, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed and (hard == resource.RLIM_INFINITY or hard >= needed):
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard


def kernel_send_buffer_max() -> int | None:
    """Linux's largest TCP send buffer: a reply up to about this size leaves send() at once."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return None


def connect(address: tuple[str, int], rcvbuf: int | None = None) -> socket.socket:
    """A client; ``rcvbuf`` makes it one with a small receive buffer, set before connect()."""
    if rcvbuf is None:
        return socket.create_connection(address, timeout=5.0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(5.0)
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def wait_for_replies(socks: list[socket.socket], seconds: float, size: int = len(HELLO)) -> list[str]:
    """Read from every socket at once for up to ``seconds``: each ends "answered" (``size`` bytes
    came), "closed" (EOF or a reset first) or "waiting"."""
    states = ["waiting"] * len(socks)
    received = [0] * len(socks)
    with selectors.DefaultSelector() as selector:
        for index, sock in enumerate(socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        deadline = time.monotonic() + seconds
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                index = key.data
                try:
                    data = socks[index].recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                received[index] += len(data)
                if not data or received[index] >= size:
                    states[index] = "answered" if data else "closed"
                    selector.unregister(socks[index])
    return states


def read_until(sock: socket.socket, size: int, deadline: float, *, chunk: int = 65536, pause: float = 0.0) -> int:
    """Read up to ``size`` bytes in chunks, sleeping ``pause`` after each (a slow reader), until
    ``deadline``, EOF or an error; returns the bytes read."""
    received = 0
    while received < size and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(min(chunk, size - received))
        except OSError:  # a reset, or the deadline
            break
        if not data:
            break
        received += len(data)
        if pause:
            time.sleep(pause)
    return received


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


# -- the loads: each takes a step, starts its server, returns a result with a one-line summary ----


def clients_at_once(step: Step, settings: Settings, workdir: Path) -> dict[str, Any]:
    """N clients connect, each sends one request and stays: how many are answered at once?"""
    n = settings.clients
    with ServerProcess(step, workdir) as server:
        clients: list[socket.socket] = []
        try:
            clients = [connect(server.address) for _ in range(n)]
            for client in clients:
                client.sendall(REQUEST)
            states = wait_for_replies(clients, settings.wait)
            answered = states.count("answered")
            second_waits = states[1] != "answered"
            second_after = None
            if second_waits:
                clients[0].close()  # the first client leaves
                second_after = wait_for_replies([clients[1]], settings.wait)[0] == "answered"
        finally:
            close_all(clients)
        result: dict[str, Any] = {"clients": n, "answered_at_once": answered, "second_waits": second_waits}
        result |= {"second_answered_after_first_left": second_after, **server.outcome()}
    summary = f"{answered} of {n} answered at once"
    if second_waits:
        later = "was answered once the 1st left" if second_after else "was not answered even then"
        summary += f"; the 2nd waited and {later}"
    return result | {"summary": summary}


def stalled_reader(step: Step, settings: Settings, workdir: Path) -> dict[str, Any]:
    """One client asks for an 8 MB reply and reads none of it; is another client still answered?
    Then it asks EXTRA_REQUESTS times more, still reading nothing: a server that went on reading and
    buffering each 8 MB reply would grow by that much every time."""
    with ServerProcess(step, workdir, repeat=BIG) as server:
        memory = psutil.Process(server.proc.pid)
        rss_before = memory.memory_info().rss
        with connect(server.address, rcvbuf=SMALL_RCVBUF) as stalled:
            stalled.sendall(REQUEST)
            time.sleep(0.3)  # the server is sending to it by now
            with connect(server.address) as other:
                other.sendall(REQUEST)
                started = time.monotonic()
                answered = wait_for_replies([other], settings.wait * 2, size=1)[0] == "answered"
                waited = time.monotonic() - started
            for _ in range(EXTRA_REQUESTS):
                stalled.sendall(REQUEST)
                time.sleep(0.02)  # apart, so that a server still reading gets each as a request of its own
            time.sleep(0.2)
            growth = memory.memory_info().rss - rss_before
        result: dict[str, Any] = {"other_answered": answered, "other_wait_s": round(waited, 4) if answered else None}
        result |= {"reply_bytes": len(HELLO) * BIG, "extra_requests": EXTRA_REQUESTS, "server_memory_growth": growth}
        result |= server.outcome("refused")
    if answered:
        summary = f"the other client was answered in {waited:.3f} s"
    else:
        summary = f"the other client got nothing in {settings.wait * 2:g} s: everyone waits for the one not reading"
    summary += f"; {EXTRA_REQUESTS} requests later the server had grown by {growth / 2**20:.1f} MB"
    return result | {"summary": summary + died(result)}


def megabyte_reply(step: Step, settings: Settings, workdir: Path) -> dict[str, Any]:
    """A slow reader gets a 1 MB reply, and 0.1 s later another client asks for one: what happens?"""
    size = len(HELLO) * MEGABYTE
    other: dict[str, Any] = {}
    with ServerProcess(step, workdir, repeat=MEGABYTE) as server:
        deadline = time.monotonic() + 10 * settings.wait + 5

        def other_client() -> None:
            time.sleep(0.1)
            started = time.monotonic()
            with connect(server.address) as sock:
                sock.sendall(REQUEST)
                first = read_until(sock, 1, deadline)
                other["first_byte_at"] = time.monotonic()
                other["first_byte_s"] = round(other["first_byte_at"] - started, 4) if first else None
                other["received"] = first + read_until(sock, size - first, deadline)

        with connect(server.address, rcvbuf=SMALL_RCVBUF) as reader:
            reader.sendall(REQUEST)
            thread = threading.Thread(target=other_client)
            thread.start()
            started = time.monotonic()
            received = read_until(reader, size, deadline, chunk=16384, pause=0.01)
            reader_done = time.monotonic()
        thread.join()
        reader_seconds = reader_done - started
        result: dict[str, Any] = {"reply_bytes": size, "reader_received": received}
        result["reader_s"] = round(reader_seconds, 3)
        result |= {"other_first_byte_s": other.get("first_byte_s"), "other_received": other.get("received", 0)}
        # the order of two events, not a duration: was the other client answered while the reader read?
        answered = other.get("first_byte_s") is not None
        result["other_answered_meanwhile"] = answered and other["first_byte_at"] < reader_done
        result |= server.outcome("refused")
    summary = f"the slow reader got {received:,} of {size:,} B in {reader_seconds:.2f} s; "
    first_byte = result["other_first_byte_s"]
    if first_byte is None:
        summary += "the other client got nothing"
    else:
        when = "while the reader read" if result["other_answered_meanwhile"] else "once the reader was done"
        summary += f"the other's first byte came after {first_byte:.2f} s, {when}"
    return result | {"summary": summary + died(result)}


def sigterm_mid_reply(step: Step, settings: Settings, workdir: Path) -> dict[str, Any]:
    """SIGTERM once a slow reader has 1 MB of its 8 MB reply; it then reads as fast as it can."""
    size = len(HELLO) * BIG
    with ServerProcess(step, workdir, repeat=BIG) as server:
        deadline = time.monotonic() + 10 * settings.wait + 10
        with connect(server.address, rcvbuf=SMALL_RCVBUF) as reader:
            reader.sendall(REQUEST)
            received = read_until(reader, 1 << 20, deadline, chunk=16384, pause=0.005)
            server.proc.send_signal(signal.SIGTERM)
            signalled_after = received
            received += read_until(reader, size - received, deadline)
        server.wait_exit(STOP_TIMEOUT)
        result: dict[str, Any] = {"reply_bytes": size, "signalled_after": signalled_after, "received": received}
        result |= {"complete": received == size, **server.outcome()}
    code = result["exit_code"]
    how = {None: "still running", -signal.SIGTERM: "killed by SIGTERM"}.get(code, f"exited {code}")
    if received == size:
        summary = f"the reader got all {size:,} B; the server {how}: {result['server_said']}"
    else:
        summary = f"the reply was cut at {received:,} of {size:,} B; the server was {how}"
    return result | {"summary": summary}


def hold_connections(address: tuple[str, int], n: int, stall: float, limit: float = 120.0) -> dict[str, int]:
    """Open n connections (64 connecting at a time) and keep them all open; each sends one request.
    Ends when every one is settled, or nothing has happened for ``stall`` seconds, or after ``limit``.
    Counts: answered, closed (EOF, a reset or a refused connect before any reply), waiting."""
    counts = {"answered": 0, "closed": 0}
    held: list[socket.socket] = []
    connecting = 0
    started = 0
    with selectors.DefaultSelector() as selector:
        try:
            end = time.monotonic() + limit
            last_progress = time.monotonic()
            while time.monotonic() < min(end, last_progress + stall):
                while started < n and connecting < 64:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    held.append(sock)
                    sock.setblocking(False)
                    started += 1
                    if sock.connect_ex(address) not in (0, errno.EINPROGRESS):
                        counts["closed"] += 1
                        continue
                    selector.register(sock, selectors.EVENT_WRITE, "connecting")
                    connecting += 1
                if started == n and not selector.get_map():
                    break
                for key, _ in selector.select(0.05):
                    sock = key.fileobj  # type: ignore[assignment]
                    last_progress = time.monotonic()
                    if key.data == "connecting":
                        connecting -= 1
                        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                            try:
                                sock.send(REQUEST)
                                selector.modify(sock, selectors.EVENT_READ, "sent")
                                continue
                            except OSError:
                                pass
                        counts["closed"] += 1
                        selector.unregister(sock)
                        continue
                    try:
                        data = sock.recv(64)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    counts["answered" if data else "closed"] += 1
                    selector.unregister(sock)
        finally:
            close_all(held)
    return counts | {"waiting": n - counts["answered"] - counts["closed"]}


def many_connections(
    step: Step, settings: Settings, workdir: Path, n: int, fd_limit: int | None, notable: tuple[str, ...]
) -> dict[str, Any]:
    with ServerProcess(step, workdir, fd_limit=fd_limit) as server:
        counts = hold_connections(server.address, n, settings.stall)
        if counts["closed"]:  # connections dropped: perhaps the server is dying; let it finish
            server.wait_exit(0.5)
        result = {"connections": n, **counts, **server.outcome(*notable)}
    summary = f"{counts['answered']} answered, {counts['closed']} refused or dropped, {counts['waiting']} left waiting"
    if result["server_running"] and result["server_said"]:
        summary += f"; it said: {result['server_said']}"
    return result | {"summary": summary + died(result)}


def emfile(step: Step, settings: Settings, workdir: Path) -> dict[str, Any]:
    """100 clients at once against a server whose fd limit is 64."""
    return many_connections(step, settings, workdir, 100, EMFILE_LIMIT, ("refused", "accept failed"))


def two_thousand(step: Step, settings: Settings, workdir: Path) -> dict[str, Any]:
    """2,000 clients at once, every fd limit raised well above that."""
    return many_connections(step, settings, workdir, 2000, None, ("refused", "FD_SETSIZE", "accept failed"))


def died(result: dict[str, Any]) -> str:
    if result["server_running"]:
        return ""
    return f"; the server died ({result['exit_code']}): {result['server_said']}"


@dataclasses.dataclass(frozen=True)
class Load:
    name: str
    title: str
    run: Callable[[Step, Settings, Path], dict[str, Any]]
    in_short: bool = True


LOADS = [
    Load("clients", "N clients at once: each sends one request and stays connected", clients_at_once),
    Load("stalled", "a client that stops reading: it asks for 8 MB, reads nothing and asks again", stalled_reader),
    Load("megabyte", "a 1 MB reply to a slow reader, and another client asking meanwhile", megabyte_reply),
    Load("sigterm", "SIGTERM mid-reply: after 1 MB of an 8 MB reply, then the client reads on", sigterm_mid_reply),
    Load("emfile", f"100 clients at once, the server's fd limit set to {EMFILE_LIMIT}", emfile),
    Load("fd2000", "2,000 clients at once (past select()'s FD_SETSIZE of 1024)", two_thousand, in_short=False),
]


def run_load(load: Load, step: Step, settings: Settings, workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    try:
        result = load.run(step, settings, workdir)
    except Exception as exc:  # a broken load is reported in its cell; the other loads still run
        result = {"error": f"{type(exc).__name__}: {exc}", "summary": f"the load failed: {type(exc).__name__}: {exc}"}
    return result | {"elapsed_s": round(time.monotonic() - started, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="small and fast: no 2,000 connections")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document")
    names = ", ".join(load.name for load in LOADS)
    parser.add_argument("--only", metavar="LOADS", help=f"comma-separated loads to run: {names}")
    args = parser.parse_args(argv)
    # SIGTERM ends a run as Ctrl-C does: through the with-blocks that stop every server started
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    settings = SHORT if args.short else FULL
    loads = [load for load in LOADS if load.in_short or not settings.short]
    if args.only:
        wanted = args.only.split(",")
        unknown = [name for name in wanted if name not in {load.name for load in LOADS}]
        if unknown:
            parser.error(f"unknown load {unknown[0]!r}")
        loads = [load for load in LOADS if load.name in wanted]
    chosen = os.environ.get("POLLSERVE_BACKEND") or None
    try:
        steps = lesson_steps(chosen)
    except BackendError as exc:
        parser.exit(2, f"run.py: POLLSERVE_BACKEND={chosen}: {exc}\n")
    # 2,000 client sockets here, and as many in each server: the soft limit of this process (which
    # the servers inherit) is raised so that select()'s FD_SETSIZE, not the fd limit, is what shows.
    soft_before, soft, hard = raise_fd_limit(2200) if any(load.name == "fd2000" for load in loads) else (0, 0, 0)
    report: dict[str, Any] = {
        "short": settings.short,
        "platform": f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        "fd_limit": {"soft_before": soft_before, "soft": soft, "hard": hard},
        "kernel_send_buffer_max": kernel_send_buffer_max(),
        "steps": [{"key": step.key, "title": step.title} for step in steps],
        "loads": {},
    }
    say = (lambda text: None) if args.json else (lambda text: print(text, flush=True))
    say(f"The lesson's steps under the same loads ({report['platform']}), each server on 127.0.0.1")
    if report["kernel_send_buffer_max"]:
        say(f"the kernel here holds up to {report['kernel_send_buffer_max']:,} B unsent per socket (net.ipv4.tcp_wmem)")
    if soft:
        said = "already" if soft == soft_before else f"raised from {soft_before} to"
        say(f"fd soft limit of this runner and of the servers it starts: {said} {soft} (hard limit {hard})")
    with tempfile.TemporaryDirectory(prefix="pollserve-lesson-") as workdir:
        for load in loads:
            say(f"\n{load.title}" + (f" ({settings.clients} clients)" if load.name == "clients" else ""))
            results: dict[str, Any] = {}
            if load.name == "fd2000" and soft < 2200:
                say(f"  skipped: the hard fd limit ({hard}) is below the 2,200 this load needs")
                report["loads"][load.name] = {"title": load.title, "skipped": f"hard fd limit {hard}", "results": {}}
                continue
            for step in steps:
                results[step.key] = run_load(load, step, settings, Path(workdir))
                say(f"  step {step.key:<9} {step.title:<17} {results[step.key]['summary']}")
            report["loads"][load.name] = {"title": load.title, "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
    return 1 if any("error" in r for load in report["loads"].values() for r in load["results"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
