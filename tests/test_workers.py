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
from clients import connect, exchange, recv_exactly, recv_until_eof
from statsclient import get_stats, http_get, stats_address, wait_for
from workerprocs import (
    HELLO,
    ask,
    deaf_pids,
    deploy,
    deploy_answering,
    deploy_deaf,
    deployed_env,
    healthz,
    kill_deaf,
    live_children,
    wait_ended,
    worker_pids,
)

psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="workers are POSIX processes with signals")

TESTS_DIR = str(Path(__file__).resolve().parent)


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


@pytest.mark.skipif(not hasattr(signal, "SIGRTMIN"), reason="no real-time signals here")
def test_a_worker_killed_by_a_signal_without_a_name_is_restarted_with_a_back_off(start_server, tmp_path) -> None:
    """Regression: ``signal.Signals(35)`` raised ValueError in the exit bookkeeping before the
    back-off was set, so a worker that kept dying of a real-time signal was restarted at once."""
    marker = tmp_path / "crash"
    env = {"PYTHONPATH": TESTS_DIR, "CRASH_MARKER": str(marker)}
    server = start_server("--workers", "2", "--stats-port", "0", "--app", "crashing_app:Hello", env=env)
    stats = stats_address(server)
    pids = worker_pids(stats)
    unnamed = signal.SIGRTMIN + 1
    marker.write_text(str(unnamed))  # from now on a new worker kills itself with it at import
    os.kill(pids[1], unnamed)
    server.wait_for_log(rf"worker 1 \(pid {pids[1]}\) stopped \(killed by SIGRTMIN\+1\)", timeout=10)
    server.wait_for_log(r"worker 1: restarting in 1\.0 s \(2 quick exits in a row\)", timeout=30)
    starts = sum(bool(re.search(r"worker 1 \(pid \d+\) stopped", line)) for line in server.lines)
    assert starts <= 4, server.log  # a back-off, not a fork loop
    assert not any("Traceback" in line or "ValueError" in line for line in server.lines), server.log
    marker.unlink()
    wait_for(lambda: worker_pids(stats).get(1) not in (None, pids[1]), timeout=30, what="worker 1 back")
    assert server.alive()


@pytest.mark.skipif(not hasattr(psutil.Process, "rlimit"), reason="psutil cannot set another process's limits here")
def test_a_worker_that_cannot_be_started_for_want_of_fds_is_retried_once_there_are_some(start_server) -> None:
    """Regression: the socket pair made for a new worker was outside the error handling, so EMFILE
    escaped with no back-off and no wake-up, and the index stayed empty for good.  The parent's
    soft fd limit is lowered from outside (prlimit(2)) to 3, below every fd it holds, so that it can
    open none, then a worker is killed, then the limit is restored."""
    import resource

    server = start_server("--workers", "2", "--stats-port", "0")
    stats = stats_address(server)
    pids = settled(server, stats, 2, generation=1)
    parent = psutil.Process(server.proc.pid)
    limits = parent.rlimit(resource.RLIMIT_NOFILE)
    parent.rlimit(resource.RLIMIT_NOFILE, (3, limits[1]))
    try:
        os.kill(pids[0], signal.SIGKILL)
        server.wait_for_log(r"WARNING cannot start a worker process: worker 0: .*Too many open files", timeout=10)
        time.sleep(2)  # a few retries, with back-off, all failing
    finally:
        parent.rlimit(resource.RLIMIT_NOFILE, limits)
    new = settled(server, stats, 2, generation=1)
    assert new[0] != pids[0] and new[1] == pids[1]
    episodes = [line for line in server.lines if "cannot start a worker process" in line and "WARNING" in line]
    assert len(episodes) == 1, server.log  # once per episode, not once per attempt
    assert not any("Traceback" in line for line in server.lines), server.log


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


# -- the supervisor's lifecycle under operator actions and worker failures ----------------------------


def start_deployed(start_server, folder: Path, *args: str):
    """Two workers of ``deployed_app:Hello`` from folder (workerprocs.deploy and the like)."""
    return start_server(
        "--workers", "2", "--stats-port", "0", "--app", "deployed_app:Hello", *args, env=deployed_env(folder)
    )


def settled(server, stats: tuple[str, int], count: int, generation: int) -> dict[int, int]:
    """Wait for the supervisor's invariant: count workers serving, all of generation, and no other
    worker process alive; index -> pid."""
    found: dict[int, int] = {}

    def holds() -> bool:
        snapshot = get_stats(stats)
        rows = snapshot["workers"]
        found.clear()
        found.update({row["index"]: row["pid"] for row in rows})
        children = {child.pid for child in live_children(server.proc.pid)}
        # What a process list and the clients see first; then what the parent says of its workers.
        return (
            len(rows) == count
            and children == set(found.values())
            and snapshot.get("workers_serving") == count
            and all(row.get("state") == "serving" and row.get("generation") == generation for row in rows)
        )

    wait_for(holds, timeout=40, what=f"{count} workers of generation {generation} and no other")
    return dict(found)


def test_sighups_faster_than_a_start_end_on_one_fresh_generation(start_server) -> None:
    """Regression: two SIGHUPs closer than a worker's start-up, or one while the first workers still
    start, left no worker at all while /healthz said 200."""
    server = start_server("--workers", "2", "--stats-port", "0")
    stats = stats_address(server)
    server.signal(signal.SIGHUP)  # "listening on" comes at the first ready: the second may still start
    time.sleep(0.05)
    server.signal(signal.SIGHUP)
    for _ in range(3):
        time.sleep(0.1)
        server.signal(signal.SIGHUP)
    time.sleep(0.5)
    # Five, unless two reached the parent before it handled the first: signals do not queue.
    reloads = sum("SIGHUP: reload: rolling restart" in line for line in server.lines)
    assert 3 <= reloads <= 5, server.log
    pids = settled(server, stats, 2, generation=1 + reloads)
    assert healthz(stats) == (200, "ok 2/2 workers\n")
    for _ in range(20):
        ask(server.address)
    time.sleep(1.5)  # nothing more starts or stops once settled
    assert {child.pid for child in live_children(server.proc.pid)} == set(pids.values())
    assert any("superseded before it was ready" in line for line in server.lines), server.log


def test_a_successor_that_dies_while_its_predecessor_drains_is_restarted(start_server) -> None:
    """Regression: the index stayed empty once the draining predecessor exited."""
    server = start_server("--workers", "2", "--stats-port", "0", "--shutdown-timeout", "60")
    stats = stats_address(server)
    old = settled(server, stats, 2, generation=1)
    held = []
    try:
        for _ in range(200):  # connections on both old workers keep them draining after the reload
            sock = connect(server.address)
            sock.sendall(b"hi")
            assert recv_exactly(sock, len(HELLO)) == HELLO
            held.append(sock)
            rows = get_stats(stats)["workers"] if len(held) % 10 == 0 else []
            if len(rows) == 2 and all(row["connections_open"] > 0 for row in rows):
                break
        server.signal(signal.SIGHUP)
        new: dict[int, int] = {}
        settled_new = new

        def successors_serving() -> bool:
            rows = get_stats(stats)["workers"]
            settled_new.clear()
            settled_new.update({row["index"]: row["pid"] for row in rows if row["pid"] not in old.values()})
            return len(settled_new) == 2

        wait_for(successors_serving, timeout=30, what="two successors serving")
        assert all(psutil.pid_exists(pid) for pid in old.values()), "the predecessors drain their clients"
        os.kill(new[0], signal.SIGKILL)
        known = {*old.values(), *new.values()}
        wait_for(
            lambda: any(child.pid not in known for child in live_children(server.proc.pid)),
            timeout=30,
            what="worker 0 restarted",
        )
        assert psutil.pid_exists(old[0]), "the predecessor still drains its client"
        for sock in held:  # and the draining predecessors still serve the clients they hold
            sock.sendall(b"hi")
            assert recv_exactly(sock, len(HELLO)) == HELLO
    finally:
        for sock in held:
            sock.close()
    settled(server, stats, 2, generation=2)


def big_reply_in_flight(server) -> tuple[socket.socket, bytes]:
    """A client whose 8 MiB reply (sample_apps.BigReply) has started to arrive: most of it still
    waits in the worker's buffers, since the client does not read on."""
    sock = connect(server.address, timeout=30)
    sock.sendall(b"go")
    return sock, sock.recv(65536)


@pytest.mark.parametrize("kill_mode", ["mixed", "control-group", "worker-first"])
def test_a_stop_as_systemd_sends_it_lets_a_large_reply_finish(start_server, kill_mode: str) -> None:
    """KillMode=mixed: SIGTERM to the parent only.  control-group: to every process at once, so a
    worker gets it straight and relayed by the parent.  Regression: the second cut the reply.  Two
    SIGTERMs that arrive together merge into one pending signal, so the cut happened only when the
    relay came after the worker had handled the first; worker-first makes that order certain: each
    worker gets SIGTERM and handles it, then the whole group gets one."""
    from sample_apps import BIG_REPLY_SIZE, big_reply

    env = {"PYTHONPATH": TESTS_DIR}
    # The server leads a process group of its own (start_new_session): killpg reaches it and its
    # workers, never this test runner.
    server = start_server(
        "--workers", "2", "--stats-port", "0", "--app", "sample_apps:BigReply", env=env, start_new_session=True
    )
    pids = worker_pids(stats_address(server))
    sock, first = big_reply_in_flight(server)
    with sock:
        if kill_mode == "mixed":
            server.signal(signal.SIGTERM)
        elif kill_mode == "control-group":
            os.killpg(server.proc.pid, signal.SIGTERM)
        else:
            for pid in pids.values():
                os.kill(pid, signal.SIGTERM)
            for index in pids:
                server.wait_for_log(rf"worker {index}: SIGTERM: no longer accepting")
            os.killpg(server.proc.pid, signal.SIGTERM)
        time.sleep(1.0)  # every signal delivered and handled before the client reads on
        reply = first + recv_until_eof(sock)
    assert len(reply) == BIG_REPLY_SIZE and reply == big_reply()
    assert server.wait(30) == 0
    assert not any("closing now" in line for line in server.lines), server.log


def test_a_group_sigterm_that_reaches_a_worker_on_its_way_out_changes_nothing(start_server) -> None:
    """Regression: ``kill -TERM -PGID`` reaches the workers straight, and again through the parent;
    an idle worker had drained, closed its loop and restored SIGTERM's default action by the time the
    parent's came, and died of it ("killed by SIGTERM").  Made certain here: the parent is held
    stopped while the workers drain, then goes on while they are on their way out (the app's
    atexit handler takes 1.5 s)."""
    env = {"PYTHONPATH": TESTS_DIR}
    server = start_server(
        "--workers", "2", "--stats-port", "0", "--app", "slow_exit_app:Echo", env=env, start_new_session=True
    )
    pids = settled(server, stats_address(server), 2, generation=1)
    sent = 0
    for size in range(1, 21):
        payload = bytes([size]) * (size * 500)
        assert exchange(server.address, payload, len(payload)) == payload
        sent += len(payload)
    parent = psutil.Process(server.proc.pid)
    parent.suspend()
    try:
        os.killpg(server.proc.pid, signal.SIGTERM)  # the workers get it now, the parent once it goes on
        for index in pids:
            server.wait_for_log(rf"worker {index}: finished: ")
    finally:
        parent.resume()
    assert server.wait(30) == 0
    for index, pid in pids.items():
        server.wait_for_log(rf"worker {index} \(pid {pid}\) stopped \(exit 0\)")
    assert not any("killed by" in line for line in server.lines), server.log
    assert stopped_totals(server) == (sent, sent)


def test_a_second_stop_signal_to_the_parent_closes_the_workers_now(start_server) -> None:
    from sample_apps import BIG_REPLY_SIZE

    env = {"PYTHONPATH": TESTS_DIR}
    server = start_server("--workers", "2", "--stats-port", "0", "--app", "sample_apps:BigReply", env=env)
    worker_pids(stats_address(server))
    sock, first = big_reply_in_flight(server)
    with sock:
        server.signal(signal.SIGTERM)
        server.wait_for_log(r"SIGTERM: stopping 2 workers")
        server.signal(signal.SIGINT)
        server.wait_for_log(r"SIGINT again: telling the workers to close now")
        try:
            rest = recv_until_eof(sock)
        except ConnectionResetError:
            rest = b""
    assert len(first) + len(rest) < BIG_REPLY_SIZE
    assert server.wait(30) == 0
    server.wait_for_log(r"worker \d: the parent's order: closing now")


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT here")
def test_a_retiring_reuse_port_worker_serves_its_queue(start_server) -> None:
    """Regression: a retiring worker closed its own listener with clients still queued on it.  The
    worker is held stopped (a busy loop, as far as its queue is concerned) while its successor
    gets ready and its retire order arrives, then clients queue on it, then it goes on."""
    server = start_server("--workers", "2", "--reuse-port", "--stats-port", "0", "--worker-timeout", "0")
    stats = stats_address(server)
    old = settled(server, stats, 2, generation=1)
    busy = psutil.Process(old[0])
    busy.suspend()
    try:
        server.signal(signal.SIGHUP)
        server.wait_for_log(rf"worker 0 \(pid {old[0]}\) of generation 1: retiring", timeout=30)
        # Connections now: the kernel hashes about half into the stopped worker's queue.
        clients = [connect(server.address) for _ in range(40)]
        for sock in clients:
            sock.sendall(b"hi")
    finally:
        busy.resume()
    failures = []
    for sock in clients:
        with sock:
            try:
                assert recv_exactly(sock, len(HELLO)) == HELLO
            except (OSError, AssertionError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
    assert not failures, f"{len(failures)} of {len(clients)} failed: {failures[:3]}"
    settled(server, stats, 2, generation=2)


def test_a_hung_worker_is_marked_stale_then_killed_and_replaced(start_server) -> None:
    """Regression: a stopped (hung) worker was never noticed and /stats kept its frozen snapshot."""
    server = start_server("--workers", "2", "--stats-port", "0", "--worker-timeout", "5")
    stats = stats_address(server)
    old = settled(server, stats, 2, generation=1)
    os.kill(old[1], signal.SIGSTOP)
    try:

        def stale_shown() -> bool:
            rows = {row["index"]: row for row in get_stats(stats)["workers"]}
            return rows[1]["stale"] and rows[1]["snapshot_age_s"] > 3 and not rows[0]["stale"]

        wait_for(stale_shown, timeout=10, what="worker 1 shown stale")
        _, _, body = http_get(stats, "/metrics")
        assert 'pollserve_worker_stale{worker="1"} 1' in body.decode()
        assert 'pollserve_worker_stale{worker="0"} 0' in body.decode()
        found = server.wait_for_log(
            rf"WARNING worker 1 \(pid {old[1]}\) has not reported for (\d+\.\d) s \(--worker-timeout 5\): killing it",
            timeout=15,
        )
        assert float(found[1]) >= 5
    finally:
        if psutil.pid_exists(old[1]):
            os.kill(old[1], signal.SIGCONT)
    # The log line comes just before the kill: a continued worker may still report for a moment.
    wait_ended(server.proc.pid, old[1])
    new = settled(server, stats, 2, generation=1)
    assert new[1] != old[1] and new[0] == old[0]
    _, _, body = http_get(stats, "/metrics")
    assert "pollserve_worker_timeouts_total 1" in body.decode()
    assert get_stats(stats)["worker_timeouts_total"] == 1


@pytest.mark.slow
def test_a_stopped_parent_blames_only_the_worker_that_hung_meanwhile(start_server) -> None:
    """Regression: after ``kill -STOP`` of the parent longer than --worker-timeout, then ``kill
    -CONT``, every worker was killed as silent, though they had served every client and reported
    throughout: the parent judged silence before reading its channels (on resuming, its wait
    returned no event, signal(7)).  A worker that hung while the parent was stopped is still found
    within --worker-timeout (and a report) of the parent's resuming."""
    server = start_server("--workers", "2", "--stats-port", "0", "--worker-timeout", "2")
    stats = stats_address(server)
    pids = settled(server, stats, 2, generation=1)
    parent = psutil.Process(server.proc.pid)
    time.sleep(0.3)  # the parent idle in its backend's wait, where a kill -STOP usually finds it
    parent.suspend()
    try:
        os.kill(pids[1], signal.SIGSTOP)  # worker 1 hangs; worker 0 serves every client meanwhile
        served, deadline = 0, time.monotonic() + 3.5
        while time.monotonic() < deadline:
            ask(server.address)
            served += 1
            time.sleep(0.05)
    finally:
        parent.resume()
    try:
        server.wait_for_log(rf"worker 1 \(pid {pids[1]}\) has not reported for [\d.]+ s", timeout=2 + 1 + 5)
    finally:
        if psutil.pid_exists(pids[1]):
            os.kill(pids[1], signal.SIGCONT)
    assert served > 10
    assert not any(f"(pid {pids[0]}) has not reported" in line for line in server.lines), server.log
    wait_ended(server.proc.pid, pids[1])
    new = settled(server, stats, 2, generation=1)
    assert new[0] == pids[0] and new[1] != pids[1]


@pytest.mark.slow
def test_a_worker_hung_when_the_server_stops_is_killed_at_its_stop_deadline(start_server) -> None:
    """A retiring worker's deadline is the stop timeout (--drain-delay + --shutdown-timeout + 10 s)
    after it was told to go: one stopped while the server stops is killed then, and the parent
    still exits 0."""
    server = start_server("--workers", "2", "--stats-port", "0", "--shutdown-timeout", "0", "--worker-timeout", "0")
    pids = settled(server, stats_address(server), 2, generation=1)
    os.kill(pids[1], signal.SIGSTOP)
    try:
        server.signal(signal.SIGTERM)
        server.wait_for_log(
            rf"WARNING worker 1 \(pid {pids[1]}\) has not exited (\d+\.\d) s after it was told to stop "
            r"\(10 s: --drain-delay \+ --shutdown-timeout \+ 10\): killing it",
            timeout=10 + 10,
        )
        assert server.wait(10) == 0
    finally:
        if psutil.pid_exists(pids[1]):
            os.kill(pids[1], signal.SIGCONT)
    assert server.wait_for_log(rf"worker 0 \(pid {pids[0]}\) stopped \(exit 0\)")


def test_a_slow_import_is_not_a_hang(start_server, tmp_path) -> None:
    """The silence is counted from ready: an app that takes longer than --worker-timeout to
    import is not killed for it."""
    (tmp_path / "slow_app.py").write_text("import time\ntime.sleep(3.5)\nfrom pollserve.apps import Hello\n")
    env = {"PYTHONPATH": str(tmp_path)}
    server = start_server(
        "--workers", "2", "--stats-port", "0", "--worker-timeout", "2", "--app", "slow_app:Hello", env=env
    )
    stats = stats_address(server)
    settled(server, stats, 2, generation=1)
    time.sleep(3)
    assert not any("has not reported" in line for line in server.lines), server.log
    settled(server, stats, 2, generation=1)


def test_a_worker_stuck_before_ready_is_killed_and_restarted(start_server, tmp_path) -> None:
    """Regression: a worker whose start never ends (an import waiting on a lock or a network) was
    never timed out, and its index stayed empty.  The parent imports the app first (to check it),
    then each worker: the second import of this app, a worker's, blocks for good;
    --worker-start-timeout kills that worker, and its replacement (a later import) serves."""
    (tmp_path / "stuck_app.py").write_text(
        "import os, time\n"
        "for turn in (1, 2):\n"
        "    try:\n"
        f"        os.close(os.open(os.path.join({str(tmp_path)!r}, f'import-{{turn}}'), os.O_CREAT | os.O_EXCL))\n"
        "        break\n"
        "    except FileExistsError:\n"
        "        continue\n"
        "else:\n"
        "    turn = 0\n"
        "if turn == 2:\n"
        "    time.sleep(3600)\n"
        "from pollserve.apps import Hello\n"
    )
    server = start_server(
        "--workers",
        "2",
        "--stats-port",
        "0",
        "--worker-start-timeout",
        "2",
        "--app",
        "stuck_app:Hello",
        env={"PYTHONPATH": str(tmp_path)},
    )
    stats = stats_address(server)
    found = server.wait_for_log(
        r"WARNING worker (\d) \(pid (\d+)\) is not ready (\d+\.\d) s after it started "
        r"\(--worker-start-timeout 2\): killing it",
        timeout=20,
    )
    assert float(found[3]) >= 2
    settled(server, stats, 2, generation=1)
    assert not psutil.pid_exists(int(found[2])) or psutil.Process(int(found[2])).status() == psutil.STATUS_ZOMBIE
    assert get_stats(stats)["worker_timeouts_total"] == 1
    assert not any("has not reported" in line for line in server.lines), server.log


def test_a_slow_reload_overtaken_by_a_fast_one_ends_on_the_fast_one(start_server, tmp_path) -> None:
    """The workers of a reload whose import is slow, still starting when a second reload comes, are
    stopped: the server settles on the newest code alone, and the slow code never serves."""
    deploy_answering(tmp_path, b"v1\n")
    server = start_deployed(start_server, tmp_path)
    stats = stats_address(server)
    old = settled(server, stats, 2, generation=1)
    deploy_answering(tmp_path, b"v2\n", import_seconds=2.0)
    server.signal(signal.SIGHUP)
    wait_for(lambda: len(live_children(server.proc.pid)) == 4, timeout=10, what="generation 2 starting")
    deploy_answering(tmp_path, b"v3\n")
    server.signal(signal.SIGHUP)
    server.wait_for_log(r"rolling restart of 2 workers \(generation 3\)")
    settled(server, stats, 2, generation=3)
    assert sum("superseded before it was ready" in line for line in server.lines) == 2, server.log
    time.sleep(2.5)  # past the slow import: nothing of generation 2 is left to come up
    new = settled(server, stats, 2, generation=3)
    assert set(new.values()).isdisjoint(old.values())
    answers = {exchange(server.address, b"hi", 3) for _ in range(20)}
    assert answers == {b"v3\n"}, answers


def test_a_superseded_worker_that_ignores_sigterm_is_killed_at_its_start_deadline(start_server, tmp_path) -> None:
    """Regression: a worker superseded while it was still starting got SIGTERM and nothing more, so
    one that ignored it (an import that installs its own handler, then hangs) stayed for the
    parent's whole life: --worker-start-timeout applied to starting workers only."""
    deploy(tmp_path)
    server = start_deployed(start_server, tmp_path, "--worker-start-timeout", "3")
    stats = stats_address(server)
    settled(server, stats, 2, generation=1)
    deploy_deaf(tmp_path)
    server.signal(signal.SIGHUP)
    try:
        wait_for(lambda: len(deaf_pids(tmp_path)) == 2, timeout=10, what="generation 2 ignoring SIGTERM")
        deploy(tmp_path)
        server.signal(signal.SIGHUP)
        server.wait_for_log(r"rolling restart of 2 workers \(generation 3\)")
        for pid in deaf_pids(tmp_path):
            server.wait_for_log(
                rf"worker \d \(pid {pid}\) is not ready \d+\.\d s after it started "
                r"\(--worker-start-timeout 3\): killing it",
                timeout=10,
            )
        settled(server, stats, 2, generation=3)
    finally:
        kill_deaf(tmp_path)  # whatever the outcome: they would outlive the test
    assert get_stats(stats)["worker_timeouts_total"] == 2


def test_workers_that_cannot_start_at_all_stop_the_server_with_their_reason() -> None:
    """Regression: with a configuration error each worker meets (--max-fds 1 leaves no fd for a
    connection), the workers were restarted with back-off forever while nothing served.  A single
    server exits 2 with one line for it; so do the workers' parent, with the worker's reason."""
    from serverproc import run_pollserve

    result = run_pollserve("--workers", "2", "--port", "0", "--max-fds", "1", timeout=30)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"pollserve: worker \d cannot start: no fds left for connections: .*", last), last
    assert "restarting in" not in result.stderr, "a configuration error is not retried"


def test_a_stop_during_start_up_starts_nothing_more(tmp_path) -> None:
    """Regression: every worker was started before the parent's loop ran, so a SIGTERM that came
    at the first waited for all of them."""
    from serverproc import ServerProcess

    server = ServerProcess("--workers", "12", "--stats-port", "0")
    try:
        deadline = time.monotonic() + 20
        while not psutil.Process(server.proc.pid).children():
            assert time.monotonic() < deadline and server.alive(), server.log
            time.sleep(0.005)
        server.signal(signal.SIGTERM)
        assert server.wait(20) == 0
    finally:
        server.kill()
    started = [line for line in server.lines if re.search(r"worker \d+ \(pid \d+\) stopped", line)]
    assert 1 <= len(started) <= 4, server.log
    assert not any("listening on" in line for line in server.lines) or len(started) <= 4


def test_a_count_the_machine_cannot_hold_is_refused(start_server) -> None:
    from serverproc import run_pollserve

    result = run_pollserve("--port", "0", "--workers", "100000", timeout=30)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert re.search(r"--workers 100000 needs about \d+ MiB at \d+ MiB per worker, but \d+ MiB is", lines[0]), lines
    assert re.search(r"at most \d+ workers fit", lines[0])


@pytest.mark.skipif(not hasattr(os, "setuid") or os.geteuid() != 0, reason="needs root to run the server as nobody")
def test_a_count_above_rlimit_nproc_is_refused(tmp_path) -> None:
    """RLIMIT_NPROC applies to users other than root: the server runs as nobody with a limit of 6
    (so this runs where the interpreter is readable by nobody, as in a system-wide install)."""
    import resource
    import subprocess

    from serverproc import pollserve_command, pollserve_env

    def as_nobody_with_a_process_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NPROC, (6, 6))
        os.setgid(65534)
        os.setuid(65534)

    try:
        result = subprocess.run(
            pollserve_command("--port", "0", "--workers", "8"),
            env=pollserve_env(),
            capture_output=True,
            text=True,
            timeout=30,
            preexec_fn=as_nobody_with_a_process_limit,
            cwd=tmp_path,
        )
    except PermissionError as exc:
        pytest.skip(f"nobody may not run this interpreter: {exc}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert re.search(r"--workers 8 needs 8 more processes, but RLIMIT_NPROC is 6 and this user runs \d+", lines[0])


def test_a_reload_whose_app_does_not_import_keeps_the_old_workers(start_server, tmp_path) -> None:
    """Regression: said only as INFO "stopped (exit 2)", and the worker's line had no time and index."""
    deploy(tmp_path)
    server = start_deployed(start_server, tmp_path)
    stats = stats_address(server)
    old = settled(server, stats, 2, generation=1)
    deploy(tmp_path, broken=True)
    server.signal(signal.SIGHUP)
    server.wait_for_log(r"restarting in 1\.0 s", timeout=30)  # a second attempt failed too
    errors = [line for line in server.lines if " ERROR " in line and "reload failed" in line]
    assert len(errors) == 1, server.log
    assert re.search(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ERROR reload failed: worker \d of generation 2 exited before it was "
        r"ready \(exit 2\): cannot import module 'deployed_app'.*this deploy is broken on purpose.*; the previous "
        r"workers keep serving",
        errors[0],
    ), errors[0]
    own = [line for line in server.lines if "ERROR worker" in line and "cannot import module" in line]
    assert own and all(
        re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ERROR worker \d: cannot import", line) for line in own
    )
    assert not any(line.startswith("pollserve: ") for line in server.lines), server.log
    assert healthz(stats) == (200, "ok 2/2 workers\n")
    assert worker_pids(stats) == old
    for _ in range(20):
        ask(server.address)
    deploy(tmp_path)  # fixed: the retries with back-off bring generation 2 up
    new = settled(server, stats, 2, generation=2)
    assert set(new.values()).isdisjoint(old.values())
    assert len([line for line in server.lines if "reload failed" in line]) == 1


def test_healthz_tells_how_many_workers_serve(start_server, tmp_path) -> None:
    marker = tmp_path / "crash"
    env = {"PYTHONPATH": TESTS_DIR, "CRASH_MARKER": str(marker)}
    # --drain-delay keeps the stats endpoint answering "draining" for a second after SIGTERM.
    server = start_server(
        "--workers", "2", "--stats-port", "0", "--app", "crashing_app:Hello", "--drain-delay", "1", env=env
    )
    stats = stats_address(server)
    pids = settled(server, stats, 2, generation=1)
    assert healthz(stats) == (200, "ok 2/2 workers\n")
    snapshot = get_stats(stats)
    assert (snapshot["workers_serving"], snapshot["workers_wanted"]) == (2, 2)
    _, _, body = http_get(stats, "/metrics")
    assert "pollserve_workers_serving 2" in body.decode() and "pollserve_workers_wanted 2" in body.decode()
    marker.write_text("crash")  # from now on no worker starts
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: healthz(stats) == (200, "ok 1/2 workers\n"), timeout=10, what="ok 1/2")
    os.kill(pids[1], signal.SIGKILL)
    wait_for(lambda: healthz(stats) == (503, "no worker serving\n"), timeout=10, what="no worker serving")
    assert get_stats(stats)["workers_serving"] == 0
    marker.unlink()
    settled(server, stats, 2, generation=1)
    assert healthz(stats) == (200, "ok 2/2 workers\n")
    server.signal(signal.SIGTERM)
    # The signal's handler runs at the end of the loop pass that saw it, after that pass's I/O: a
    # /healthz read in the same pass is still answered "ok".  The next ones must say "draining".
    wait_for(lambda: healthz(stats) == (503, "draining\n"), timeout=10, what="draining")
    assert server.wait(30) == 0


def stopped_totals(server) -> tuple[int, int]:
    found = server.wait_for_log(r" stopped: .* (\d+) bytes in, (\d+) bytes out")
    return int(found[1]), int(found[2])


def test_the_stopped_totals_are_what_the_workers_served(start_server) -> None:
    """Counted bytes: a worker that exits delivers its last snapshot, a killed one counts up to
    its last report.  Regression: a last snapshot read after SIGCHLD was lost with the channel."""
    server = start_server("--workers", "2", "--stats-port", "0", "--app", "echo")
    stats = stats_address(server)
    pids = settled(server, stats, 2, generation=1)
    sent = 0
    for size in range(1, 41):
        payload = bytes([size]) * (size * 1000)
        assert exchange(server.address, payload, len(payload)) == payload
        sent += len(payload)
    # Every byte so far reported; then worker 0 is killed and counts as reported.
    wait_for(lambda: get_stats(stats)["bytes_in"] == sent, timeout=10, what="the workers' reports")
    os.kill(pids[0], signal.SIGKILL)
    settled(server, stats, 2, generation=1)
    for size in range(1, 41):
        payload = bytes([size]) * 777
        assert exchange(server.address, payload, len(payload)) == payload
        sent += len(payload)
    server.signal(signal.SIGTERM)  # at once: the last bytes are in no periodic report yet
    assert server.wait(30) == 0
    assert stopped_totals(server) == (sent, sent)


def test_the_lag_histogram_keeps_an_exited_workers_ticks(start_server) -> None:
    """The whole server's loop_lag_buckets and loop_lag_sum_s are counters, as the other totals:
    regression, a worker killed and replaced took its ticks (up to its last report) out of them."""
    server = start_server("--workers", "2", "--stats-port", "0")
    stats = stats_address(server)
    pids = settled(server, stats, 2, generation=1)

    def ticks(snapshot: dict) -> int:
        return (snapshot.get("loop_lag_buckets") or [0])[-1]

    wait_for(
        lambda: all(ticks(row) >= 10 for row in get_stats(stats)["workers"]), timeout=20, what="probe ticks reported"
    )
    before = get_stats(stats)
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: worker_pids(stats).get(0) not in (None, pids[0]), timeout=20, what="a new worker 0")
    after = get_stats(stats)
    assert len(after["loop_lag_buckets"]) == len(before["loop_lag_buckets"])
    assert all(now >= then for now, then in zip(after["loop_lag_buckets"], before["loop_lag_buckets"], strict=True)), (
        before["loop_lag_buckets"],
        after["loop_lag_buckets"],
    )
    assert after["loop_lag_sum_s"] >= before["loop_lag_sum_s"]


def test_worker_timeout_is_checked(start_server) -> None:
    from serverproc import run_pollserve

    for args, message in (
        (["--worker-timeout", "5"], "--worker-timeout needs --workers 2 or more"),
        (["--workers", "1", "--worker-timeout", "0"], "--worker-timeout needs --workers 2 or more"),
        (["--workers", "2", "--worker-timeout", "-1"], "--worker-timeout needs a non-negative number of seconds"),
        (["--workers", "2", "--worker-timeout", "1"], "--worker-timeout 1 is shorter than two of the workers' reports"),
        (["--worker-start-timeout", "5"], "--worker-start-timeout needs --workers 2 or more"),
        (["--workers", "2", "--worker-start-timeout", "-1"], "--worker-start-timeout needs a non-negative number"),
        (["--workers", "2", "--worker-start-timeout", "nan"], "--worker-start-timeout needs a non-negative number"),
    ):
        result = run_pollserve("--port", "0", *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
