"""Loop health: utilization, lag and the slow callback, from a real loop and a real server.

End to end: an app that blocks the loop 300 ms on every chunk under steady input is named in one
warning and drives the lag p99 above 250 ms; a saturated loop reports utilization near 1 and an
idle one near 0; every view carries the figures.  In process: the loop names the handler that
held it, whichever way it was called.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import connect, recv_exactly, request_rounds
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from serverproc import run_pollserve
from statsclient import get_stats, http_get, stats_address, wait_for

from pollserve.apps import HELLO_REPLY
from pollserve.health import LAG_BUCKETS, LoopHealth, percentile
from pollserve.loop import EventLoop, describe_callback
from pollserve.stats import health_fields, prometheus_page, table

SLOW_WARNING = "loop held by a slow callback"
#: where sample_apps is, for the servers to import
TESTS_DIR = str(Path(__file__).resolve().parent)
APPS = {"PYTHONPATH": TESTS_DIR}


@contextlib.contextmanager
def steady_input(address: tuple[str, int], every: float = 0.05, seconds: float = 20) -> Iterator[socket.socket]:
    """One client sending a chunk every ``every`` seconds (and reading what comes back) until the
    block ends or ``seconds`` have passed."""
    stop = threading.Event()
    with connect(address) as sock:
        sock.settimeout(0.01)

        def run() -> None:
            deadline = time.monotonic() + seconds
            while not stop.wait(every) and time.monotonic() < deadline:
                try:
                    sock.sendall(b"tick\n")
                    sock.recv(65536)
                except (TimeoutError, BlockingIOError):
                    continue
                except OSError:
                    return

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield sock
        finally:
            stop.set()
            thread.join(10)


def slow_warnings(server) -> list[str]:
    return [line for line in server.lines if "WARNING" in line and SLOW_WARNING in line]


def stats_clients(pid: int, stats_port: int) -> list:
    """The server's connections to clients of its stats endpoint (lingering ones included)."""
    import psutil

    return [
        conn
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.laddr and conn.laddr.port == stats_port and conn.status != psutil.CONN_LISTEN
    ]


class TestSlowApp:
    def test_named_once_and_lag_above_250_ms(self, start_server) -> None:
        server = start_server("--app", "sample_apps:Sleepy", "--stats-port", "0", env=APPS)
        address = stats_address(server)
        with steady_input(server.address) as sock:
            client = f"127.0.0.1:{sock.getsockname()[1]}"
            found = server.wait_for_log(rf"WARNING {SLOW_WARNING} .*: (\S+) on (\S+) took ([\d.]+) s")
            assert found[1] == "sample_apps:Sleepy.data_received"
            assert found[2] == client
            assert 0.29 <= float(found[3]) < 5
            wait_for(
                lambda: (
                    (get_stats(address)["loop_lag_p99_s"] or 0) > 0.25 and get_stats(address)["slow_callbacks"] >= 5
                ),
                timeout=20,
                what="lag p99 above 250 ms and 5 slow callbacks",
            )
            stats = get_stats(address)
        assert stats["loop_lag_p99_s"] > 0.25
        assert stats["loop_lag_max_s"] >= stats["loop_lag_p99_s"] >= stats["loop_lag_p50_s"] >= 0
        assert stats["slowest_callback"].endswith(f"sample_apps:Sleepy.data_received on {client}")
        assert 0.29 <= stats["slowest_callback_s"] < 5
        assert stats["loop_utilization"] > 0.5
        # One warning for the whole episode, however many slow chunks: the rest are counted.
        assert len(slow_warnings(server)) == 1, slow_warnings(server)
        assert stats["slow_callbacks"] >= 5
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        assert "Traceback" not in server.log

    def test_a_slow_pass_of_two_clients_is_counted_apart(self, start_server) -> None:
        """Two clients whose chunks are read in one pass hold the loop 0.6 s together: that is one
        slow pass, logged with both names, never one callback of 0.6 s; the loop then times each
        handler, so the next time each is named with its own 0.3 s."""
        server = start_server("--app", "sample_apps:Sleepy", "--stats-port", "0", env=APPS)
        address = stats_address(server)
        with connect(server.address) as holder, connect(server.address) as a, connect(server.address) as b:
            peers = [f"127.0.0.1:{sock.getsockname()[1]}" for sock in (a, b)]
            # All three accepted first: a late accept in the holder's pass makes that pass one of two
            # handlers (the listener's and the holder's), 0.3 s, reported instead of the 0.6 s one.
            wait_for(lambda: get_stats(address)["connections_open"] == 3, what="3 connections open")
            # And the last stats request's connection closed at the server: its client's EOF, read in
            # the holder's pass, makes that pass one handler and an event, not two handlers.
            wait_for(lambda: not stats_clients(server.proc.pid, address[1]), what="the stats client gone")
            # The first round's two chunks make a slow pass; the second round's are timed one by one.
            for _ in range(2):
                holder.sendall(b"h")  # holds the loop 0.3 s, while the other two send
                time.sleep(0.1)
                a.sendall(b"a")
                b.sendall(b"b")
                assert [recv_exactly(sock, 1) for sock in (holder, a, b)] == [b"h", b"a", b"b"]
            stats = get_stats(address)
            _, _, metrics = http_get(address, "/metrics")
        found = server.wait_for_log(r"WARNING loop held by a slow pass .*: ([\d.]+) s over (\d) handlers \((.*)\)")
        assert float(found[1]) >= 0.59 and int(found[2]) >= 2
        assert all(peer in found[3] for peer in peers), found[0]
        assert stats["slow_passes"] == 1, "the second round's handlers were timed one by one"
        assert re.search(r"^pollserve_slow_passes_total 1$", metrics.decode(), re.M)
        assert stats["slow_callbacks"] >= 3
        assert re.fullmatch(r"sample_apps:Sleepy\.data_received on 127\.0\.0\.1:\d+", stats["slowest_callback"])
        assert 0.29 <= stats["slowest_callback_s"] < 0.59, "one handler's time, never the pass's"

    def test_zero_disables_the_warning_not_the_figures(self, start_server) -> None:
        server = start_server("--app", "sample_apps:Sleepy", "--stats-port", "0", "--slow-callback", "0", env=APPS)
        address = stats_address(server)
        with steady_input(server.address):
            wait_for(lambda: (get_stats(address)["loop_lag_p99_s"] or 0) > 0.25, timeout=20, what="lag above 250 ms")
            stats = get_stats(address)
        assert stats["slow_callbacks"] == 0 and stats["slowest_callback"] is None
        assert not slow_warnings(server)

    def test_a_higher_threshold_lets_300_ms_pass(self, start_server) -> None:
        server = start_server("--app", "sample_apps:Sleepy", "--stats-port", "0", "--slow-callback", "2", env=APPS)
        address = stats_address(server)
        with steady_input(server.address):
            wait_for(lambda: get_stats(address)["loop_utilization"] > 0.5, timeout=20, what="a busy loop")
            stats = get_stats(address)
        assert stats["slow_callbacks"] == 0
        assert not slow_warnings(server)

    @pytest.mark.parametrize("value", ["1e-9", "0.00002"])
    def test_no_threshold_ends_the_server(self, start_server, value: str) -> None:
        """With a threshold below what the loop's own bookkeeping takes, passes with no event and
        passes of several handlers are slow too: the server reports them and goes on serving."""
        server = start_server("--stats-port", "0", "--slow-callback", value)
        address = stats_address(server)
        time.sleep(1.5)  # idle: probe ticks and the fd check, passes with no event
        assert server.alive(), server.log
        for _ in range(5):  # a little traffic: several clients at once, and the stats endpoint
            assert request_rounds(server.address, 4, 20, b"hi", HELLO_REPLY, timeout=20) == 80
            assert http_get(address, "/metrics")[0] == 200
        stats = get_stats(address)
        assert stats["slow_callbacks"] > 0
        assert server.alive(), server.log
        server.signal(signal.SIGTERM)
        assert server.wait() == 0, server.log
        assert "Traceback" not in server.log
        # Each slow one is logged with the time it held the loop, however small, never as none.
        took = re.findall(r"took ([\d.]+) s", server.log)
        assert took and all(float(seconds) > 0 for seconds in took), server.log

    @pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
    def test_bad_threshold_is_one_line(self, value: str) -> None:
        result = run_pollserve("--slow-callback", value, "--port", "0")
        assert result.returncode == 2
        assert "--slow-callback" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) <= 2  # argparse's usage line, then the message


class TestUtilization:
    def test_idle_near_zero(self, start_server) -> None:
        server = start_server("--stats-port", "0")
        address = stats_address(server)
        time.sleep(1.5)  # a window with some probe ticks in it
        stats = get_stats(address)
        assert stats["loop_utilization"] < 0.1, stats["loop_utilization"]
        assert stats["loop_busy_s"] < 1.0
        # An idle server still reports a true lag: its wakeups are late by a little, never by 0.
        assert stats["loop_lag_p99_s"] is not None and 0 <= stats["loop_lag_p99_s"] < 0.1
        assert stats["loop_lag_buckets"][-1] >= 5, "probe ticks counted"
        assert stats["slow_callbacks"] == 0 and stats["slowest_callback"] is None

    def test_saturated_near_one(self, start_server) -> None:
        server = start_server("--app", "sample_apps:Spin", "--stats-port", "0", "--slow-callback", "0", env=APPS)
        address = stats_address(server)
        with steady_input(server.address, every=0.005):
            time.sleep(1.5)
            wait_for(lambda: get_stats(address)["loop_utilization"] > 0.9, timeout=20, what="utilization above 90%")
            before = get_stats(address)
            time.sleep(2.0)
            after = get_stats(address)
        assert after["loop_utilization"] > 0.9
        # The running total moves with wall time, as Prometheus' rate() wants it (each reading is
        # that of the last probe tick: up to a tenth of a second and a pass old).
        busy = (after["loop_busy_s"] - before["loop_busy_s"]) / (after["uptime_s"] - before["uptime_s"])
        assert 0.75 < busy <= 1.1, busy

    @staticmethod
    def busy_workers(start_server, key: str, above: float) -> tuple[str, dict]:
        """Two Spin workers, one kept busy by steady input until its ``key`` passes ``above``:
        the stats address, and /stats read before the input stops."""
        server = start_server("--workers", "2", "--stats-port", "0", "--app", "sample_apps:Spin", env=APPS)
        address = stats_address(server)
        wait_for(lambda: len(get_stats(address)["workers"]) == 2, timeout=20, what="2 workers reporting")
        with steady_input(server.address, every=0.005):
            wait_for(
                lambda: max(w[key] for w in get_stats(address)["workers"]) > above,
                timeout=20,
                what=f"a worker's {key} above {above}",
            )
            return address, get_stats(address)

    def test_workers_top_level_is_the_busiest(self, start_server) -> None:
        address, stats = self.busy_workers(start_server, "loop_utilization", 0.8)
        by_worker = [worker["loop_utilization"] for worker in stats["workers"]]
        assert stats["loop_utilization"] == max(by_worker)
        assert min(by_worker) < 0.5, "one connection keeps one worker busy, not both"
        assert stats["loop_busy_s"] == pytest.approx(sum(w["loop_busy_s"] for w in stats["workers"]), abs=1e-5)
        # A worker whose probe has not ticked since its last report has no lag figure yet (None):
        # the top level is the worst of those that have one.
        lags = [w["loop_lag_p99_s"] for w in stats["workers"] if w["loop_lag_p99_s"] is not None]
        assert lags and stats["loop_lag_p99_s"] == max(lags)
        _, _, body = http_get(address, "/metrics")
        text = body.decode()
        assert len(re.findall(r'^pollserve_loop_utilization_ratio\{worker="\d"\} [\d.]+$', text, re.M)) == 2
        assert len(re.findall(r'^pollserve_loop_lag_seconds_count\{worker="\d"\} \d+$', text, re.M)) == 2

    def test_workers_busy_total_keeps_a_killed_workers_time(self, start_server) -> None:
        """loop_busy_s is a counter for rate(): a worker killed and replaced must not take its busy
        seconds (up to its last report) out of the whole server's total."""
        address, before = self.busy_workers(start_server, "loop_busy_s", 1.0)
        busiest = max(before["workers"], key=lambda worker: worker["loop_busy_s"])
        os.kill(busiest["pid"], signal.SIGKILL)
        wait_for(
            lambda: (
                busiest["pid"] not in {w["pid"] for w in get_stats(address)["workers"]}
                and len(get_stats(address)["workers"]) == 2
            ),
            timeout=20,
            what="the killed worker replaced",
        )
        assert get_stats(address)["loop_busy_s"] >= before["loop_busy_s"]


class TestViews:
    def test_metrics_histogram_and_promtool(self, start_server) -> None:
        server = start_server("--app", "sample_apps:Sleepy", "--stats-port", "0", env=APPS)
        address = stats_address(server)
        with steady_input(server.address):
            server.wait_for_log(SLOW_WARNING, timeout=20)
            _, _, body = http_get(address, "/metrics")
        text = body.decode()
        buckets = re.findall(r'^pollserve_loop_lag_seconds_bucket\{le="([^"]+)"\} (\d+)$', text, re.M)
        assert [bound for bound, _ in buckets] == [*map(str, LAG_BUCKETS), "+Inf"]
        counts = [int(count) for _, count in buckets]
        assert counts == sorted(counts) and counts[-1] > counts[LAG_BUCKETS.index(0.25)], "some ticks over 250 ms"
        assert re.search(rf"^pollserve_loop_lag_seconds_count {counts[-1]}$", text, re.M)
        assert float(re.search(r"^pollserve_loop_lag_seconds_sum ([\d.]+)$", text, re.M)[1]) > 0.25
        assert int(re.search(r"^pollserve_slow_callbacks_total (\d+)$", text, re.M)[1]) >= 1
        assert re.search(r"^# TYPE pollserve_loop_utilization_ratio gauge$", text, re.M)
        assert re.search(r"^# TYPE pollserve_loop_busy_seconds_total counter$", text, re.M)
        promtool = shutil.which("promtool")
        if promtool is not None:
            result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
            assert result.returncode == 0, result.stdout + result.stderr

    def test_log_line_and_stats_command(self, start_server) -> None:
        server = start_server("--app", "sample_apps:Sleepy", "--stats-port", "0", "--stats-interval", "0.5", env=APPS)
        address = stats_address(server)
        with steady_input(server.address):
            line = server.wait_for_log(
                r"stats: .* \| loop busy (\d+)% \(last 10 s\), lag p50 .* p99 ([\d.]+) ms .*"
                r"(\d+) slow callbacks \(slowest .*Sleepy\.data_received",
                timeout=20,
            )
            result = run_pollserve("stats", "--url", f"http://{address[0]}:{address[1]}/stats")
        assert int(line[1]) > 0 and float(line[2]) > 0
        assert result.returncode == 0, result.stderr
        shown = dict(re.split(r"\s{2,}", row, maxsplit=1) for row in result.stdout.splitlines() if "  " in row)
        assert shown["loop_utilization"].endswith("%")
        assert "Sleepy.data_received" in shown["slowest_callback"]
        assert "loop_lag_buckets" not in shown  # for /metrics, not people

    def test_draining_from_the_first_signal(self, start_server) -> None:
        server = start_server("--stats-port", "0", "--drain-delay", "10")
        address = stats_address(server)
        assert get_stats(address)["draining"] is False
        server.signal(signal.SIGTERM)
        wait_for(lambda: get_stats(address)["draining"] is True, what="draining in /stats")
        _, _, body = http_get(address, "/metrics")
        assert re.search(r"^pollserve_draining 1$", body.decode(), re.M)
        server.signal(signal.SIGTERM)  # a second one: now
        assert server.wait() == 0

    def test_table_shows_utilization_as_percent(self) -> None:
        text = table({"loop_utilization": 0.5, "loop_lag_buckets": [1, 2], "slow_callbacks": 3})
        assert "50.0%" in text and "loop_lag_buckets" not in text and "3" in text


# -- in process: the loop names what held it ----------------------------------------------


def hold(seconds: float) -> None:
    time.sleep(seconds)


class Holder:
    """A handler bound to an object that says how it wants to be named."""

    def __init__(self, sock: socket.socket, seconds: float, name: str = "holder.on_readable of test") -> None:
        self.sock = sock
        self.seconds = seconds
        self.name = name

    def _describe_handler(self, handler: object) -> str:
        return self.name

    def on_readable(self) -> None:
        self.sock.recv(100)
        time.sleep(self.seconds)


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    with EventLoop() as loop:
        yield loop


def record_slow(loop: EventLoop) -> list[tuple[str, float]]:
    seen: list[tuple[str, float]] = []
    loop.on_slow_callback = lambda name, seconds: seen.append((name, seconds))
    return seen


def record_passes(loop: EventLoop) -> list[tuple[str, float]]:
    seen: list[tuple[str, float]] = []
    loop.on_slow_pass = lambda what, seconds: seen.append((what, seconds))
    return seen


class TestLoopNamesTheHolder:
    def test_a_timer_callback(self, loop: EventLoop) -> None:
        seen = record_slow(loop)
        loop.slow_callback = 0.05
        loop.call_later(0.01, hold, 0.12)
        loop.call_later(0.2, loop.stop)
        loop.run_forever()
        assert [name for name, _ in seen] == [f"{__name__}:hold"]
        assert 0.12 <= seen[0][1] < 2
        assert loop.busy_time >= 0.12

    def test_the_one_handler_of_a_pass(self, loop: EventLoop, pair) -> None:
        seen = record_slow(loop)
        loop.slow_callback = 0.05
        ours, theirs = pair
        loop.add_reader(ours.fileno(), Holder(ours, 0.12).on_readable)
        theirs.send(b"x")
        loop.call_later(0.3, loop.stop)
        loop.run_forever()
        assert [name for name, _ in seen] == ["holder.on_readable of test"]

    def test_several_handlers_are_a_slow_pass_then_each_is_timed(self, loop: EventLoop) -> None:
        """A slow pass that ran two handlers cannot say which held it, or whether both did: it is
        reported as a pass, with its time and both names, and no callback is named with the pass's
        time.  From then on each handler is timed, so the next slow ones are named, each with its own."""
        seen = record_slow(loop)
        passes = record_passes(loop)
        loop.slow_callback = 0.05
        pairs = [socket.socketpair() for _ in range(2)]
        try:
            short = Holder(pairs[0][0], 0.1, "short holder")
            long = Holder(pairs[1][0], 0.4, "long holder")
            loop.add_reader(pairs[0][0].fileno(), short.on_readable)
            loop.add_reader(pairs[1][0].fileno(), long.on_readable)

            def both() -> None:
                pairs[0][1].send(b"x")
                pairs[1][1].send(b"x")

            both()  # readable before the first wait: one pass, two handlers
            loop.call_later(0.7, both)
            loop.call_later(1.4, loop.stop)
            loop.run_forever()
        finally:
            for a, b in pairs:
                a.close()
                b.close()
        assert [what for what, _ in passes] == ["2 handlers (long holder, short holder)"]
        assert passes[0][1] >= 0.5, "the pass's time: both handlers"
        assert sorted(name for name, _ in seen) == ["long holder", "short holder"], seen
        own = dict(seen)
        assert 0.1 <= own["short holder"] < 0.4, "its own time, not the pass's"
        assert 0.4 <= own["long holder"] < 5

    def test_a_handler_gone_by_the_end_of_its_pass_is_a_pass(self, loop: EventLoop, pair) -> None:
        """A slow handler that removed itself (a connection that closed) cannot be named after its
        pass: the pass is reported as such, never as a callback."""
        seen = record_slow(loop)
        passes = record_passes(loop)
        loop.slow_callback = 0.05
        ours, theirs = pair

        def read_and_leave() -> None:
            ours.recv(100)
            time.sleep(0.12)
            loop.remove_reader(ours.fileno())

        loop.add_reader(ours.fileno(), read_and_leave)
        theirs.send(b"x")
        loop.call_later(0.3, loop.stop)
        loop.run_forever()
        assert seen == []
        assert [what for what, _ in passes] == ["1 event whose handler has since been removed"]
        assert passes[0][1] >= 0.12

    def test_zero_disables(self, loop: EventLoop) -> None:
        seen = record_slow(loop)
        loop.slow_callback = 0
        loop.call_later(0.01, hold, 0.12)
        loop.call_later(0.2, loop.stop)
        loop.run_forever()
        assert seen == [] and loop.busy_time >= 0.12

    def test_idle_loop_is_not_busy(self, loop: EventLoop) -> None:
        loop.call_later(0.3, loop.stop)
        started = time.monotonic()
        loop.run_forever()
        assert time.monotonic() - started >= 0.3
        assert loop.busy_time < 0.1

    def test_describe_callback(self) -> None:
        assert describe_callback(hold) == f"{__name__}:hold"
        assert describe_callback(Holder.on_readable) == f"{__name__}:Holder.on_readable"
        import functools

        assert describe_callback(functools.partial(hold, 1)) == f"{__name__}:hold"


def probe(loop: EventLoop, **options: float) -> LoopHealth:
    """The lag probe and figures of ``loop``, without the slow-callback check."""
    return LoopHealth(loop, logging.getLogger("test"), slow_callback=0, **options)


def held_once(loop: EventLoop, at: float, seconds: float, until: float, **options: float) -> LoopHealth:
    """The figures of a probe over ``loop`` run until ``until``, held ``seconds`` once ``at`` seconds in."""
    health = probe(loop, **options)
    health.start()
    loop.call_later(at, hold, seconds)
    loop.call_later(until, loop.stop)
    loop.run_forever()
    health.close()
    return health


class TestProbe:
    def test_missed_ticks_count_as_late_as_they_were(self, loop: EventLoop) -> None:
        """A loop held 350 ms misses the ticks due inside that time: each is as late as it was,
        so the lag is that of a timer due at any moment (0.35, 0.25, 0.15, 0.05 s)."""
        health = held_once(loop, at=0.25, seconds=0.35, until=0.9)
        lag = health.lag()
        assert lag is not None
        p50, p99, worst = lag
        assert 0 <= p50 <= p99 <= worst
        assert 0.3 <= worst < 1.5
        late = sorted(value for _, value in health._lags)
        assert sum(value > 0.04 for value in late) >= 3, late
        assert health.lag_histogram()[-1] == len(late)

    def test_a_stall_longer_than_the_window_counts_whole_since_start(self, loop: EventLoop) -> None:
        """The histogram since start counts every tick a stall missed, each as late as it was: a
        loop held 1.5 s with a 0.5 s window and a 50 ms probe missed 30 ticks, 10 of them more
        than a second late, 22.5 s of lag in all.  Only the window's figures stop at the window."""
        health = held_once(loop, at=0.2, seconds=1.5, until=1.8, window=0.5, period=0.05)
        histogram = health.lag_histogram()
        over_a_second = histogram[-1] - histogram[LAG_BUCKETS.index(1.0)]
        assert over_a_second >= 9, histogram
        assert histogram[-1] - histogram[LAG_BUCKETS.index(0.5)] >= 19, histogram
        assert health.lag_sum >= 0.9 * 1.5 * 30 / 2, health.lag_sum
        assert histogram[-1] >= 30
        assert len(health._lags) <= 2 * (0.5 / 0.05 + 1), "the window's ticks stay bounded"

    @given(
        period=st.sampled_from([0.1, 0.05, 0.01, 0.003, 0.0625]),
        start=st.one_of(st.floats(0, 30), st.sampled_from(LAG_BUCKETS)),
        steps=st.integers(0, 300),
        count=st.integers(1, 3000),
    )
    @settings(max_examples=200, deadline=None)
    def test_a_stall_is_counted_as_its_ticks_one_by_one(
        self, period: float, start: float, steps: int, count: int
    ) -> None:
        """The histogram since start gets a stall's ticks in one step per bucket: the same counts as
        its ticks put one by one where ``le`` says (a lag equal to a bound in that bucket)."""
        first = start + steps * period  # some ticks land on a bucket's bound, or within a rounding of it
        with EventLoop() as loop:
            health = probe(loop, window=1.0, period=period)
            health._record_lags(0.0, first, count)
        one_by_one = [0] * (len(LAG_BUCKETS) + 1)
        for k in range(count):
            one_by_one[bisect.bisect_left(LAG_BUCKETS, first - k * period)] += 1
        assert health.lag_counts == one_by_one
        assert health.lag_sum == pytest.approx(sum(first - k * period for k in range(count)), rel=1e-9, abs=1e-9)
        assert len(health._lags) == min(count, int(1.0 / period) + 1), "the window keeps its own ticks only"

    def test_a_stall_of_any_length_costs_the_same(self) -> None:
        """A trillion ticks missed (a process stopped for three years, at 0.1 s a tick): counted by
        division, not one by one, which would not end here."""
        count, period = 10**12, 0.1
        with EventLoop() as loop:
            health = probe(loop, period=period)
            counting = threading.Thread(
                target=health._record_lags, args=(0.0, (count - 1) * period + 0.05, count), daemon=True
            )
            counting.start()
            counting.join(30)
        assert not counting.is_alive(), "the ticks of a stall counted one by one"
        histogram = health.lag_histogram()
        assert histogram[-1] == count
        # The lags are 0.05, 0.15, 0.25 ... s: at or below each bound, (bound - 0.05) / 0.1 + 1 of them,
        # within a rounding of the lags near a bound.
        for bound, at_or_below in zip(LAG_BUCKETS, histogram, strict=False):
            assert abs(at_or_below - max(0, math.floor((bound - 0.05) / period) + 1)) <= 1, (bound, at_or_below)
        assert health.lag_sum == pytest.approx(count * count * period / 2, rel=1e-6)

    def test_every_bucket_holds_what_was_recorded(self) -> None:
        """Known lags, read back from every bucket of the histogram and of /metrics: a lag equal
        to a bound is in that bucket (Prometheus' ``le``), one a hair above it in the next."""
        lags = [0.0, *LAG_BUCKETS, *(math.nextafter(bound, math.inf) for bound in LAG_BUCKETS), 20.0]
        with EventLoop() as loop:
            health = probe(loop)
            for late in lags:
                health._record_lags(time.monotonic(), late, 1)
            page = prometheus_page(1, "test", [({}, health_fields(health))])
        # At or below bound i: the zero, the bounds 0..i and the hairs above bounds 0..i-1.
        expected = [2 * index + 2 for index in range(len(LAG_BUCKETS))] + [len(lags)]
        assert health.lag_histogram() == expected
        buckets = re.findall(r'^pollserve_loop_lag_seconds_bucket\{le="([^"]+)"\} (\d+)$', page, re.M)
        bounds = [*map(str, LAG_BUCKETS), "+Inf"]
        assert buckets == [(bound, str(count)) for bound, count in zip(bounds, expected, strict=True)]
        assert re.search(rf"^pollserve_loop_lag_seconds_count {len(lags)}$", page, re.M)
        total = float(re.search(r"^pollserve_loop_lag_seconds_sum (\S+)$", page, re.M)[1])
        assert total == pytest.approx(sum(lags), abs=1e-5)

    def test_percentile_is_nearest_rank(self) -> None:
        values = [float(v) for v in range(1, 101)]
        assert percentile(values, 0.5) == 50.0 and percentile(values, 0.99) == 99.0
        assert percentile([7.0], 0.99) == 7.0


# -- the loop's two modes, as a model ---------------------------------------------------------

#: the model's threshold and how long its slow handlers hold the loop: far apart, so that a busy
#: machine does not make a quick pass slow
MODEL_SLOW = 0.05
MODEL_HOLD = 0.12


def nap() -> None:
    time.sleep(MODEL_HOLD)


class NamedHandler:
    """Handler ``index`` of the model: drains its socket and holds the loop when told to."""

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.hold = 0.0

    def _describe_handler(self, handler: object) -> str:
        return f"handler {self.index}"

    def on_readable(self) -> None:
        self.sock.recv(100)
        time.sleep(self.hold)


class SlowNamingMachine(RuleBasedStateMachine):
    """Random sequences of passes against a real loop.  Invariants: a quick pass is never
    reported; a slow pass of one handler names it; a slow pass of several, while handlers are not
    timed yet, is reported as a pass naming them all (whether one of them or several held it, or
    none alone did) and starts timing them; once timed, each slow handler is named alone, with its
    own time, not the pass's; a callback timed one by one is named with its own time, and the
    handlers of its pass are judged on what is left."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = EventLoop()
        self.loop.slow_callback = MODEL_SLOW
        self.loop.time_handlers_for = 3600  # the model's runs are short: once timed, timed to the end
        self.seen = record_slow(self.loop)
        self.passes = record_passes(self.loop)
        self.pairs = [socket.socketpair() for _ in range(3)]
        self.handlers = [NamedHandler(index, pair[0]) for index, pair in enumerate(self.pairs)]
        for handler, (ours, _) in zip(self.handlers, self.pairs, strict=True):
            self.loop.add_reader(ours.fileno(), handler.on_readable)
        #: the model: whether the loop times each handler
        self.timed = False

    def one_pass(
        self, readable: list[int], slow: set[int], nap_too: bool = False
    ) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        """Make ``readable`` readable (``slow`` of them holding the loop), queue a slow callback
        if ``nap_too``, run one pass, and return what the loop reported: callbacks, passes."""
        for index, handler in enumerate(self.handlers):
            handler.hold = MODEL_HOLD if index in slow else 0.0
        for index in readable:
            self.pairs[index][1].send(b"x")
        if nap_too:
            self.loop.call_soon(nap)
        self.loop.call_soon(self.loop.stop)
        callbacks, passes = len(self.seen), len(self.passes)
        self.loop.run_forever()
        return self.seen[callbacks:], self.passes[passes:]

    @rule(which=st.sets(st.integers(0, 2), min_size=1))
    def quick(self, which: set[int]) -> None:
        assert self.one_pass(sorted(which), set()) == ([], [])

    @rule(slow=st.sets(st.integers(0, 2), min_size=1), others=st.sets(st.integers(0, 2)))
    def slow_handlers(self, slow: set[int], others: set[int]) -> None:
        readable = sorted(slow | others)
        callbacks, passes = self.one_pass(readable, slow)
        if len(readable) == 1 or self.timed:
            assert passes == []
            assert sorted(name for name, _ in callbacks) == [f"handler {index}" for index in sorted(slow)]
            assert all(MODEL_HOLD <= seconds < MODEL_HOLD * (1 + len(readable)) for _, seconds in callbacks)
            if len(slow) > 1:  # with a pass's time each would be at least two holds
                assert all(seconds < 2 * MODEL_HOLD for _, seconds in callbacks), callbacks
        else:
            assert callbacks == []
            names = ", ".join(f"handler {index}" for index in readable)
            assert [what for what, _ in passes] == [f"{len(readable)} handlers ({names})"]
            assert passes[0][1] >= MODEL_HOLD * len(slow)
            self.timed = True

    @rule(which=st.sets(st.integers(0, 2)))
    def slow_callback(self, which: set[int]) -> None:
        callbacks, passes = self.one_pass(sorted(which), set(), nap_too=True)
        assert [name for name, _ in callbacks] == [f"{__name__}:nap"]
        assert passes == [], "the callback's time is its own, not the handlers'"

    @invariant()
    def busy_time_counts_every_hold(self) -> None:
        holds = sum(seconds for _, seconds in self.seen + self.passes)
        assert self.loop.busy_time >= holds * 0.99

    def teardown(self) -> None:
        self.loop.close()
        for ours, theirs in self.pairs:
            ours.close()
            theirs.close()


TestSlowNaming = SlowNamingMachine.TestCase
TestSlowNaming.settings = settings(max_examples=12, stateful_step_count=6, deadline=None)
