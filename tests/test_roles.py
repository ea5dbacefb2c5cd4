"""Every signal in every process role, as pollserve/roles.py declares it and the README documents it:
each (role, signal) pair of the table is sent to a live process, and its documented effect checked
(a log line and still serving, a drained exit 0, a rolling restart, a replaced worker, ignored)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from clients import connect
from statsclient import get_stats, stats_address, wait_for
from workerprocs import ask, live_children

from pollserve.roles import SIGNALS, Action, Role, markdown_table

psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

README = Path(__file__).resolve().parent.parent / "README.md"
TESTS_DIR = str(Path(__file__).resolve().parent)


class Target:
    """A live server in a role, and the process that plays it."""

    def __init__(self, start_server, role: Role) -> None:
        self.role = role
        if role is Role.SINGLE:
            self.server = start_server("--stats-port", "0")
        else:
            self.server = start_server("--workers", "2", "--stats-port", "0")
        self.stats = stats_address(self.server)
        self.workers = self.settled(generation=1) if role is not Role.SINGLE else {}
        self.pid = self.workers[0] if role is Role.WORKER else self.server.proc.pid

    def settled(self, generation: int) -> dict[int, int]:
        """index -> pid, once two workers of generation serve and no other runs."""
        found: dict[int, int] = {}

        def holds() -> bool:
            snapshot = get_stats(self.stats)
            found.clear()
            found.update({row["index"]: row["pid"] for row in snapshot["workers"]})
            return (
                snapshot["workers_serving"] == 2
                and all(row["generation"] == generation for row in snapshot["workers"])
                and {child.pid for child in live_children(self.server.proc.pid)} == set(found.values())
            )

        wait_for(holds, timeout=30, what=f"2 workers of generation {generation} and no other")
        return dict(found)

    def lines_since(self, mark: int) -> list[str]:
        return self.server.lines[mark:]

    def still_serving(self) -> None:
        for _ in range(5):
            ask(self.server.address)
        assert self.server.alive(), self.server.log


def single_stops(target: Target, name: str) -> None:
    assert target.server.wait(20) == 0, target.server.log
    target.server.wait_for_log(rf"INFO {name}: no longer accepting; flushing \d+ connections")
    target.server.wait_for_log(r"INFO stopped: \d+ connections accepted")


def parent_stops(target: Target, name: str) -> None:
    assert target.server.wait(30) == 0, target.server.log
    target.server.wait_for_log(rf"INFO {name}: stopping 2 workers")
    target.server.wait_for_log(r"INFO stopped: .* \(2 workers\)")
    for index, pid in target.workers.items():
        target.server.wait_for_log(rf"worker {index} \(pid {pid}\) stopped \(exit 0\)")
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def worker_stops(target: Target, name: str) -> None:
    target.server.wait_for_log(rf"INFO worker 0: {name}: no longer accepting")
    target.server.wait_for_log(r"INFO worker 0: finished: \d+ connections accepted")
    target.server.wait_for_log(rf"worker 0 \(pid {target.pid}\) stopped \(exit 0\)")
    replaced = target.settled(generation=1)  # the parent starts another in its place
    assert replaced[0] != target.pid and replaced[1] == target.workers[1]
    target.still_serving()


def single_reloads(target: Target, name: str) -> None:
    target.server.wait_for_log(rf"INFO {name}: reload: nothing to reload; still serving")
    target.still_serving()


def parent_reloads(target: Target, name: str) -> None:
    target.server.wait_for_log(rf"INFO {name}: reload: rolling restart of 2 workers \(generation 2\)")
    new = target.settled(generation=2)
    assert set(new.values()).isdisjoint(target.workers.values())
    target.still_serving()


def logs_stats(prefix: str, suffix: str = "") -> Callable[[Target, str], None]:
    def check(target: Target, name: str) -> None:
        target.server.wait_for_log(rf"INFO {prefix}stats: backend \w+ \| fds .*{suffix}$")
        target.still_serving()
        if target.role is not Role.SINGLE:
            assert target.settled(generation=1) == target.workers

    return check


def parent_reaps(target: Target, name: str) -> None:
    # A SIGCHLD with no child gone changes nothing ...
    time.sleep(0.5)
    assert target.settled(generation=1) == target.workers
    # ... and a worker that ends is collected and replaced.
    os.kill(target.workers[1], signal.SIGKILL)
    target.server.wait_for_log(rf"worker 1 \(pid {target.workers[1]}\) stopped \(killed by SIGKILL\)")
    assert target.settled(generation=1)[1] != target.workers[1]
    target.still_serving()


def worker_ignores(target: Target, name: str) -> None:
    time.sleep(0.5)
    assert psutil.Process(target.pid).status() != psutil.STATUS_ZOMBIE
    assert target.settled(generation=1) == target.workers
    assert not any(name in line for line in target.server.lines), target.server.log
    target.still_serving()


#: the documented effect of each (role, action), checked once the signal is sent
CHECKS: dict[tuple[Role, Action], Callable[[Target, str], None]] = {
    (Role.SINGLE, Action.STOP): single_stops,
    (Role.PARENT, Action.STOP): parent_stops,
    (Role.WORKER, Action.STOP): worker_stops,
    (Role.SINGLE, Action.RELOAD): single_reloads,
    (Role.PARENT, Action.RELOAD): parent_reloads,
    (Role.SINGLE, Action.LOG_STATS): logs_stats(""),
    (Role.PARENT, Action.LOG_STATS): logs_stats("", r" \| workers 2/2 serving"),
    (Role.WORKER, Action.LOG_STATS): logs_stats("worker 0: "),
    (Role.PARENT, Action.REAP): parent_reaps,
    (Role.WORKER, Action.IGNORE): worker_ignores,
}

PAIRS = [(role, name) for name, row in SIGNALS.items() for role in row]


@pytest.mark.parametrize(("role", "name"), PAIRS, ids=[f"{role.name.lower()}-{name}" for role, name in PAIRS])
def test_every_signal_does_what_the_table_says_in_every_role(start_server, role: Role, name: str) -> None:
    signum = getattr(signal.Signals, name, None)
    if signum is None:
        pytest.skip(f"no {name} on this OS")
    check = CHECKS[(role, SIGNALS[name][role].action)]
    target = Target(start_server, role)
    os.kill(target.pid, signum)
    check(target, name)


@pytest.mark.parametrize("role", [Role.SINGLE, Role.WORKER], ids=["single", "worker"])
def test_a_program_the_app_runs_inherits_no_listener_and_no_channel(start_server, tmp_path, role: Role) -> None:
    """Regression: a worker passed the listening sockets and the channel it inherited from the parent
    on to whatever the app ran (os.system, subprocess with close_fds=False): after the server
    stopped, clients connected to the helper's copy of the listener and hung, and a server started
    again could not bind the port."""
    pids = tmp_path / "helpers"
    pids.touch()
    env = {"PYTHONPATH": TESTS_DIR, "HELPER_PIDS": str(pids)}
    args = () if role is Role.SINGLE else ("--workers", "2", "--stats-port", "0")
    server = start_server("--app", "sample_apps:RunsHelper", *args, env=env)
    try:
        with connect(server.address) as sock:
            sock.sendall(b"run")
            helper = psutil.Process(int(sock.makefile().readline()))
        wait_for(lambda: helper.name() == "sleep", timeout=10, what="the helper running")  # past the shell's fork
        inherited = helper.net_connections("all")
        assert not inherited, inherited
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
        with pytest.raises(ConnectionRefusedError):  # nobody listens on the port any more
            connect(server.address, timeout=5).close()
        with socket.socket() as again:  # and a server started again can bind it
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(server.address)
            again.listen()
    finally:
        for pid in map(int, pids.read_text().split()):
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                if process.name() == "sleep":
                    process.kill()


def test_the_readme_documents_the_signal_table() -> None:
    """The README's signal table is the declared one, cell for cell."""
    assert markdown_table() in README.read_text(), "README.md's signal table differs from pollserve.roles.SIGNALS"


def test_the_readme_names_no_signal_the_table_lacks() -> None:
    """Every signal the README says pollserve handles is in the table."""
    named = set(re.findall(r"\bSIG[A-Z0-9]+\b", README.read_text()))
    handled = set(SIGNALS)
    # Signals the README names for what pollserve sends or meets, not handles.
    sent = {"SIGKILL", "SIGSTOP", "SIGCONT", "SIGBREAK", "SIGRTMIN"}
    assert named - sent <= handled, named - sent - handled
