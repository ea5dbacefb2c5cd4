"""``--workers N`` end to end: the real command, a parent and its worker processes, over loopback.

Which worker accepts a connection is the kernel's choice, so tests that need both workers busy keep
connections open until each has some (bounded), and assert the parent's figures, not a spread.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from clients import connect, recv_exactly
from statsclient import get_stats, http_get, stats_address, wait_for

psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="workers are POSIX processes with signals")

HELLO = b"Hello world\n"
TESTS_DIR = str(Path(__file__).resolve().parent)


def worker_pids(stats: tuple[str, int], count: int = 2) -> dict[int, int]:
    """index -> pid of the workers, once `count` of them have reported."""
    found: dict[int, int] = {}

    def reported() -> bool:
        found.clear()
        found.update({row["index"]: row["pid"] for row in get_stats(stats)["workers"]})
        return len(found) == count

    wait_for(reported, timeout=20, what=f"{count} workers reporting")
    return dict(found)


def ask(address: tuple[str, int]) -> None:
    """One short connection: a request, the whole reply, close."""
    with connect(address) as sock:
        sock.sendall(b"hi")
        assert recv_exactly(sock, len(HELLO)) == HELLO


def load(address: tuple[str, int], stop: threading.Event, errors: list[str], done: list[int]) -> None:
    """Short connections one after another until stop (bounded by the caller's time)."""
    while not stop.is_set():
        try:
            ask(address)
            done.append(1)
        except (OSError, AssertionError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.01)


def test_two_workers_share_one_port_and_one_listening_line(start_server) -> None:
    server = start_server("--workers", "2", "--stats-port", "0")
    stats = stats_address(server)
    pids = worker_pids(stats)
    assert sorted(pids) == [0, 1] and server.proc.pid not in pids.values()
    for pid in pids.values():
        assert psutil.Process(pid).ppid() == server.proc.pid
    # Held open until each worker has some: the kernel decides who accepts.
    held = []
    try:
        for _ in range(400):
            sock = connect(server.address)
            sock.sendall(b"hi")
            assert recv_exactly(sock, len(HELLO)) == HELLO
            held.append(sock)
            if len(held) % 20 == 0:
                rows = get_stats(stats)["workers"]
                if len(rows) == 2 and all(row["connections_open"] > 0 for row in rows):
                    break
        wait_for(lambda: get_stats(stats)["connections_open"] == len(held), timeout=10, what="the open count")
        snapshot = get_stats(stats)
        assert all(row["connections_open"] > 0 for row in snapshot["workers"]), snapshot["workers"]
        assert snapshot["connections_accepted"] == sum(row["connections_accepted"] for row in snapshot["workers"])
        assert snapshot["pid"] == server.proc.pid
    finally:
        for sock in held:
            sock.close()
    assert sum("listening on" in line for line in server.lines) == 1
    started = [line for line in server.lines if re.search(r"worker \d \(pid \d+\) started", line)]
    assert len(started) == 2, server.log
    # /metrics: one series per worker, labelled by index, and no summed duplicate.
    status, _, body = http_get(stats, "/metrics")
    accepted = [line for line in body.decode().splitlines() if line.startswith("pollserve_connections_accepted_total")]
    assert status == 200 and sorted(line.split("{")[1].split("}")[0] for line in accepted) == [
        'worker="0"',
        'worker="1"',
    ], accepted


def test_a_killed_worker_is_replaced_and_the_other_loses_no_client(start_server) -> None:
    server = start_server("--workers", "2", "--stats-port", "0")
    stats = stats_address(server)
    pids = worker_pids(stats)
    # A client held by worker 1, found by asking the workers' figures.
    held = []
    for _ in range(200):
        sock = connect(server.address)
        sock.sendall(b"hi")
        assert recv_exactly(sock, len(HELLO)) == HELLO
        held.append(sock)
        rows = {row["index"]: row for row in get_stats(stats)["workers"]} if len(held) % 10 == 0 else {}
        if rows and all(row["connections_open"] > 0 for row in rows.values()):
            break
    stop, errors, done = threading.Event(), [], []
    client = threading.Thread(target=load, args=(server.address, stop, errors, done), daemon=True)
    client.start()
    try:
        os.kill(pids[0], signal.SIGKILL)
        server.wait_for_log(rf"worker 0 \(pid {pids[0]}\) stopped \(killed by SIGKILL\)", timeout=10)
        wait_for(lambda: worker_pids(stats).get(0) not in (None, pids[0]), timeout=20, what="a new worker 0")
        time.sleep(0.5)
    finally:
        stop.set()
        client.join(30)
    # The port kept answering throughout: the parent holds the listener, so it was never refused.  A
    # short connection that worker 0 had already accepted died with it (a reset, at most a few).
    assert done and all("Refused" not in error for error in errors), errors[:5]
    assert len(errors) <= 5, errors
    for _ in range(50):  # and the pair serves every client again
        ask(server.address)
    # ... and worker 1's clients were not touched.  Worker 0's own were reset with it.
    survivors = 0
    for sock in held:
        try:
            sock.sendall(b"hi")
            survivors += recv_exactly(sock, len(HELLO)) == HELLO
        except OSError:
            pass
        sock.close()
    assert survivors > 0
    assert worker_pids(stats)[1] == pids[1]


def test_sigterm_stops_every_worker_and_the_parent_exits_0(start_server) -> None:
    server = start_server("--workers", "2", "--stats-port", "0")
    pids = worker_pids(stats_address(server))
    ask(server.address)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    for pid in pids.values():
        assert not psutil.pid_exists(pid), f"worker {pid} outlived its parent"
    stopped = [line for line in server.lines if " stopped: " in line]
    assert len(stopped) == 1 and "(2 workers)" in stopped[0], server.log
    assert sum(bool(re.search(r"worker \d \(pid \d+\) stopped \(exit 0\)", line)) for line in server.lines) == 2


def test_ctrl_c_to_the_whole_group_counts_once(start_server) -> None:
    server = start_server("--workers", "2", "--stats-port", "0", preexec_fn=os.setsid)
    worker_pids(stats_address(server))
    os.killpg(server.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert server.proc.wait(30) == 0
    assert not any("again" in line for line in server.lines), server.log
    assert sum(bool(re.search(r"stopped \(exit 0\)", line)) for line in server.lines) == 2


def test_the_parent_killed_leaves_no_orphan(start_server) -> None:
    server = start_server("--workers", "2", "--stats-port", "0")
    pids = worker_pids(stats_address(server))
    server.proc.kill()
    server.proc.wait(10)
    # Each worker sees its channel's EOF and shuts down as on SIGTERM.
    deadline = time.monotonic() + 20
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids.values()):
        assert time.monotonic() < deadline, "a worker outlived its killed parent"
        time.sleep(0.1)


def test_sighup_is_a_rolling_restart_that_loses_no_client(start_server) -> None:
    server = start_server("--workers", "2", "--stats-port", "0")
    stats = stats_address(server)
    old = worker_pids(stats)
    stop, errors, done = threading.Event(), [], []
    clients = [threading.Thread(target=load, args=(server.address, stop, errors, done), daemon=True) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: set(worker_pids(stats).values()).isdisjoint(old.values()), timeout=30, what="two new workers")
        for pid in old.values():
            wait_for(lambda pid=pid: not psutil.pid_exists(pid), timeout=30, what=f"old worker {pid} gone")
        time.sleep(0.5)
    finally:
        stop.set()
        for client in clients:
            client.join(30)
    assert len(done) > 100 and not errors, errors[:5]
    assert server.alive()
    assert sum("listening on" in line for line in server.lines) == 1
    assert any("rolling restart of 2 workers" in line for line in server.lines)


def test_a_worker_that_crashes_at_start_is_restarted_with_a_back_off(start_server, tmp_path) -> None:
    marker = tmp_path / "crash"
    env = {"PYTHONPATH": TESTS_DIR, "CRASH_MARKER": str(marker)}
    server = start_server("--workers", "2", "--stats-port", "0", "--app", "crashing_app:Hello", env=env)
    stats = stats_address(server)
    pids = worker_pids(stats)
    marker.write_text("crash")  # from now on a new worker exits at import
    os.kill(pids[1], signal.SIGTERM)
    server.wait_for_log(r"worker 1: restarting in 1\.0 s \(2 quick exits in a row\)", timeout=30)
    ask(server.address)  # worker 0 serves meanwhile
    marker.unlink()
    wait_for(lambda: worker_pids(stats).get(1) not in (None, pids[1]), timeout=30, what="worker 1 back")
    assert server.alive() and server.proc.pid == psutil.Process(worker_pids(stats)[1]).ppid()


def test_workers_argument_is_checked(start_server) -> None:
    from serverproc import run_pollserve

    for args, message in (
        (["--workers", "0"], "--workers needs a positive number, not 0"),
        (["--workers", "many"], "--workers needs a positive number or auto, not 'many'"),
        (["--reuse-port"], "--reuse-port needs --workers 2 or more"),
    ):
        result = run_pollserve("--port", "0", *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT here")
def test_reuse_port_gives_each_worker_its_own_listener(start_server) -> None:
    server = start_server("--workers", "2", "--reuse-port", "--stats-port", "0")
    pids = worker_pids(stats_address(server))
    for pid in pids.values():
        listening = [c for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        assert [c.laddr.port for c in listening] == [server.port]
    for _ in range(20):
        ask(server.address)


def test_stats_pid_of_the_parent_includes_its_workers(start_server) -> None:
    import json

    from serverproc import run_pollserve

    server = start_server("--workers", "2", "--stats-port", "0")
    pids = worker_pids(stats_address(server))
    result = run_pollserve("stats", "--pid", str(server.proc.pid), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    children = {row["pid"]: row["process_fds"] for row in data["children"]}
    assert set(children) == set(pids.values())
    assert data["fds_with_children"] == data["process_fds"] + sum(children.values())
    # The workers' listening socket is the parent's, inherited: one address, listed once.
    assert data["listening"].count(f"127.0.0.1:{server.port}") == 1
