"""The supervisor's invariant, tried by a model: hypothesis throws random sequences of operator
actions and worker failures at a real ``pollserve --workers 2`` over loopback and checks, after
each has settled, what the Supervisor docstring promises.

Actions: SIGHUP (one, or two closer than a worker's start-up), ``kill -9`` of a worker, ``kill
-STOP`` of one (a hung loop, found by --worker-timeout), a deploy whose app does not import (then
fixed), a deploy whose import never ends (found by --worker-start-timeout, then fixed), a reload
whose import is slow or ignores SIGTERM and hangs, overtaken by a second reload of fixed code
before it is ready, and bursts of clients, while a background client keeps asking throughout.  After each:
exactly 2 workers serve, both of the newest generation; no other worker process is alive;
/healthz says ``ok 2/2 workers``; no client failed unless a worker was killed in that step; the
parent's fd count is back to its baseline.  Each run ends with SIGTERM to the whole process
group (systemd's KillMode=control-group): exit 0, every worker gone.

Bounded by MODEL_EXAMPLES x MODEL_STEPS (environment variables of those names raise them for a
longer run); the default, 8 sequences of up to 10 actions, takes about four minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
psutil = pytest.importorskip("psutil")

from clients import request_rounds  # noqa: E402
from hypothesis import HealthCheck, event, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402
from serverproc import ServerProcess  # noqa: E402
from statsclient import get_stats, stats_address, wait_for  # noqa: E402
from workerprocs import (  # noqa: E402
    HELLO,
    ask,
    deploy,
    deploy_answering,
    deploy_deaf,
    deployed_env,
    healthz,
    kill_deaf,
    live_children,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="workers are POSIX processes with signals"),
]

WORKERS = 2
#: --worker-timeout of the model's server: short, so a stopped worker is found within the step
WORKER_TIMEOUT = 3
#: --worker-start-timeout of the model's server: short, so a hanging import is found within the
#: step, and still well above a worker's start-up on a loaded machine
START_TIMEOUT = 4
MAX_KILLS = 4
MODEL_EXAMPLES = int(os.environ.get("MODEL_EXAMPLES", "8"))
MODEL_STEPS = int(os.environ.get("MODEL_STEPS", "10"))
#: MODEL_REUSE_PORT=1: the same model over --reuse-port listeners (platform_notes.md: a retiring
#: worker's listener can still take a handshake between its last accept() and its close())
MODEL_REUSE_PORT = os.environ.get("MODEL_REUSE_PORT") == "1"


def still_running(pid: int, created: float) -> bool:
    """The same process (pid and start time: a pid may be reused) is there and has not exited."""
    try:
        process = psutil.Process(pid)
        return process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Load:
    """One client thread asking one short question after another, every failure kept with its time."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.stop = threading.Event()
        self.failures: list[tuple[float, str]] = []
        self.done = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 30 * 60  # bounded whatever happens to the model
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                ask(self.address)
                self.done += 1
            except (OSError, AssertionError) as exc:
                self.failures.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))
            time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


class SupervisorModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="pollserve-model-"))
        deploy(self.folder)
        # The server leads its own process group: the final killpg reaches it and its workers only.
        self.server = ServerProcess(
            "--workers",
            str(WORKERS),
            "--stats-port",
            "0",
            "--app",
            "deployed_app:Hello",
            "--worker-timeout",
            str(WORKER_TIMEOUT),
            "--worker-start-timeout",
            str(START_TIMEOUT),
            "--shutdown-timeout",
            "2",
            *(["--reuse-port"] if MODEL_REUSE_PORT else []),
            env=deployed_env(self.folder),
            start_new_session=True,
        )
        self.load: Load | None = None
        self.server.wait_listening()
        self.stats = stats_address(self.server)
        #: the generation every worker should be in once settled
        self.generation = 1
        self.failed_reloads = 0
        #: every worker pid the model has seen, with its start time
        self.seen: dict[int, float] = {}
        self.killed_in_step = False
        #: workers killed in this run: each quick death lengthens its index's restart back-off
        #: (0.5 s, 1 s, 2 s ...), so a run has at most MAX_KILLS, to stay within its time bound
        self.kills = 0
        self.step_started = time.monotonic()
        self.current = self.settle()
        self.fds = self.quiet_fds()
        self.load = Load(self.server.address)

    # -- what settled means ---------------------------------------------------------------------

    def settle(self) -> dict[int, int]:
        """Wait for the invariant to hold (bounded), and return index -> pid."""
        found: dict[int, int] = {}

        def holds() -> bool:
            snapshot = get_stats(self.stats)
            rows = snapshot["workers"]
            found.clear()
            found.update({row["index"]: row["pid"] for row in rows})
            children = {child.pid for child in live_children(self.server.proc.pid)}
            return (
                snapshot["workers_serving"] == WORKERS
                and sorted(found) == list(range(WORKERS))
                and all(row["state"] == "serving" and row["generation"] == self.generation for row in rows)
                and children == set(found.values())
            )

        wait_for(holds, timeout=60, what=f"{WORKERS} workers of generation {self.generation} and no other")
        for pid in found.values():
            if pid not in self.seen:
                with contextlib.suppress(psutil.NoSuchProcess):  # gone since: the next settle sees why
                    self.seen[pid] = psutil.Process(pid).create_time()
        return dict(found)

    def quiet_fds(self) -> int:
        """The parent's fd count at rest: the fewest over a second, as a stats request that has just
        been answered may still have its connection open in the parent for a moment."""
        process = psutil.Process(self.server.proc.pid)
        counts = []
        for _ in range(10):
            counts.append(process.num_fds())
            time.sleep(0.1)
        return min(counts)

    def begin(self, action: str) -> None:
        event(action)  # --hypothesis-show-statistics counts the actions the model took
        self.killed_in_step = False
        self.step_started = time.monotonic()

    @invariant()
    def workers_settled_and_truthful(self) -> None:
        self.current = self.settle()
        assert healthz(self.stats) == (200, f"ok {WORKERS}/{WORKERS} workers\n")
        for pid, created in self.seen.items():  # no orphan: every replaced worker is gone
            if pid not in self.current.values():
                assert not still_running(pid, created), f"worker {pid} outlived its replacement"
        assert self.server.alive()

    @invariant()
    def no_client_failed_unless_a_worker_was_killed(self) -> None:
        if self.load is None:
            return
        failures = [why for when, why in self.load.failures if when >= self.step_started]
        if self.killed_in_step:
            assert len(failures) <= 20, failures  # the killed worker's own clients, reset with it
        else:
            assert not failures, failures

    @invariant()
    def parent_fds_back_to_baseline(self) -> None:
        process = psutil.Process(self.server.proc.pid)
        wait_for(lambda: process.num_fds() == self.fds, timeout=10, what=f"the parent's fds back to {self.fds}")

    # -- actions -------------------------------------------------------------------------------

    @rule()
    def reload(self) -> None:
        self.begin("reload")
        self.server.signal(signal.SIGHUP)
        self.generation += 1

    @rule(gap=st.floats(min_value=0.0, max_value=0.4))
    def reload_twice_quickly(self, gap: float) -> None:
        """Two SIGHUPs that reach the parent before it has handled the first are one: POSIX
        signals do not queue (signal(7)), so the newest generation is one or two further on, as
        the parent's reload lines say."""
        self.begin("reload_twice_quickly")
        before = self.reloads_logged()
        self.server.signal(signal.SIGHUP)
        time.sleep(gap)
        self.server.signal(signal.SIGHUP)
        wait_for(lambda: self.reloads_logged() > before, timeout=10, what="the reload line")
        time.sleep(0.5)  # a second SIGHUP not merged with the first is handled by now
        reloads = self.reloads_logged() - before
        assert reloads in (1, 2), reloads
        event(f"two SIGHUPs counted as {reloads}")
        self.generation += reloads

    def reloads_logged(self) -> int:
        return sum("SIGHUP: reload: rolling restart" in line for line in self.server.lines)

    @precondition(lambda self: self.kills < MAX_KILLS)
    @rule(index=st.integers(min_value=0, max_value=WORKERS - 1))
    def kill_a_worker(self, index: int) -> None:
        self.begin("kill_a_worker")
        self.killed_in_step = True
        self.kills += 1
        pid = self.current[index]
        os.kill(pid, signal.SIGKILL)
        self.wait_gone(pid)

    @precondition(lambda self: self.kills < MAX_KILLS)
    @rule(index=st.integers(min_value=0, max_value=WORKERS - 1))
    def hang_a_worker(self, index: int) -> None:
        """kill -STOP: its loop stops reporting; --worker-timeout kills and replaces it."""
        self.begin("hang_a_worker")
        self.killed_in_step = True
        self.kills += 1
        pid = self.current[index]
        os.kill(pid, signal.SIGSTOP)
        self.server.wait_for_log(rf"worker {index} \(pid {pid}\) has not reported", timeout=WORKER_TIMEOUT + 10)
        self.wait_gone(pid)

    def wait_gone(self, pid: int) -> None:
        """Until the kernel has ended it: a settle check before that would still count it."""
        created = self.seen[pid]
        wait_for(lambda: not still_running(pid, created), timeout=10, what=f"worker {pid} gone")

    @rule()
    def deploy_that_does_not_import(self) -> None:
        """The previous workers keep serving with one ERROR line; fixed, the new generation comes up."""
        self.begin("deploy_that_does_not_import")
        deploy(self.folder, broken=True)
        self.server.signal(signal.SIGHUP)
        self.generation += 1
        self.failed_reloads += 1
        wait_for(
            lambda: sum("reload failed" in line for line in self.server.lines) == self.failed_reloads,
            timeout=30,
            what="the failed reload's ERROR line",
        )
        snapshot = get_stats(self.stats)
        assert snapshot["workers_serving"] == WORKERS
        assert {row["pid"] for row in snapshot["workers"]} == set(self.current.values())
        assert healthz(self.stats) == (200, f"ok {WORKERS}/{WORKERS} workers\n")
        ask(self.server.address)
        deploy(self.folder)

    @rule()
    def deploy_that_hangs_while_importing(self) -> None:
        """The new workers never get ready: --worker-start-timeout kills them, the reload fails with
        one ERROR line while the previous workers keep serving; fixed, the new generation comes up."""
        self.begin("deploy_that_hangs_while_importing")
        deploy(self.folder, hanging=True)
        killed_before = sum("--worker-start-timeout" in line for line in self.server.lines)
        self.server.signal(signal.SIGHUP)
        self.generation += 1
        self.failed_reloads += 1
        wait_for(
            lambda: sum("reload failed" in line for line in self.server.lines) == self.failed_reloads,
            timeout=START_TIMEOUT + 30,
            what="the hanging reload's ERROR line",
        )
        assert sum("--worker-start-timeout" in line for line in self.server.lines) > killed_before
        snapshot = get_stats(self.stats)
        assert snapshot["workers_serving"] == WORKERS
        assert {row["pid"] for row in snapshot["workers"]} == set(self.current.values())
        assert healthz(self.stats) == (200, f"ok {WORKERS}/{WORKERS} workers\n")
        ask(self.server.address)
        deploy(self.folder)

    @rule(deaf=st.booleans())
    def reload_overtaken_before_it_is_ready(self, deaf: bool) -> None:
        """A reload whose workers are still starting -- a slow import, or one that ignores SIGTERM
        and never ends -- overtaken by a second reload of fixed code: the superseded workers are
        stopped (SIGTERM, then SIGKILL at their start deadline), and the server settles on the
        newest generation alone; the slow code never serves."""
        self.begin("reload_overtaken_before_it_is_ready")
        if deaf:
            deploy_deaf(self.folder)
        else:
            deploy_answering(self.folder, HELLO, import_seconds=START_TIMEOUT / 2)
        before = self.reloads_logged()
        self.server.signal(signal.SIGHUP)
        wait_for(lambda: self.reloads_logged() > before, timeout=10, what="the first reload line")
        wait_for(
            lambda: len(live_children(self.server.proc.pid)) >= 2 * WORKERS,
            timeout=10,
            what="the first reload's workers starting",
        )
        deploy(self.folder)
        self.server.signal(signal.SIGHUP)
        wait_for(lambda: self.reloads_logged() > before + 1, timeout=10, what="the second reload line")
        self.generation += 2

    @rule(clients=st.integers(min_value=1, max_value=30), rounds=st.integers(min_value=1, max_value=20))
    def clients_burst(self, clients: int, rounds: int) -> None:
        self.begin("clients_burst")
        assert request_rounds(self.server.address, clients, rounds, b"hi", HELLO) == clients * rounds

    # -- the end of a run -----------------------------------------------------------------------

    def teardown(self) -> None:
        # Shown by pytest only when the test fails: what the server said during this sequence.
        print("\n".join(self.server.lines[-60:]))
        try:
            if self.load is not None:
                self.load.close()
            if self.server.alive():
                os.killpg(self.server.proc.pid, signal.SIGTERM)  # every process at once
                assert self.server.wait(30) == 0, self.server.log
                assert not any("closing now" in line for line in self.server.lines), self.server.log
                for pid, created in self.seen.items():
                    assert not still_running(pid, created), f"worker {pid} outlived the parent"
        finally:
            self.server.kill()
            kill_deaf(self.folder)  # a worker that ignored SIGTERM and was never killed
            shutil.rmtree(self.folder, ignore_errors=True)


SupervisorModel.TestCase.settings = settings(
    max_examples=MODEL_EXAMPLES,
    stateful_step_count=MODEL_STEPS,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
TestSupervisorModel = SupervisorModel.TestCase
