"""fd statistics: the snapshot, its views (log line, /stats, /metrics, SIGUSR1) and ``pollserve stats``."""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
from clients import connect, flood_metrics, request_rounds
from serverproc import pollserve_command, pollserve_env, run_pollserve, sigint_as_at_a_terminal
from statsclient import get_stats, http_get, stand_in_server, stats_address, wait_for
from workerprocs import worker_pids

from pollserve.probe import distinct_sockets, retry_after, socket_inode
from pollserve.stats import METRIC_FIELDS, FdUsageWatch, Snapshot

POSIX = sys.platform != "win32"
SNAPSHOT_KEYS = [
    "pid",
    "backend",
    "backend_capacity",
    "registered_fds",
    "process_fds",
    "fd_soft_limit",
    "fd_hard_limit",
    "fd_usage",
    "connections_open",
    "connections_accepted",
    "connections_closed",
    "connections_refused",
    "connections_limit",
    "connections_idle_closed",
    "connections_idle_reset",
    "bytes_in",
    "bytes_out",
    "write_buffer_bytes",
    "loop_iterations",
    "events_total",
    "uptime_s",
    "tls_handshakes",
    "tls_handshake_failures",
    "loop_window_s",
    "loop_utilization",
    "loop_busy_s",
    "loop_lag_p50_s",
    "loop_lag_p99_s",
    "loop_lag_max_s",
    "loop_lag_buckets",
    "loop_lag_sum_s",
    "slow_callbacks",
    "slow_passes",
    "slowest_callback",
    "slowest_callback_s",
    "draining",
]
METRIC_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{[^}]*\})? (?P<value>\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) pollserve_\w+ \S", line), line
            continue
        match = METRIC_LINE.match(line)
        assert match, f"not 'name{{labels}} value': {line!r}"
        assert match["name"].startswith("pollserve_")
        values[match["name"]] = float(match["value"])
    return values


def test_snapshot_fields_are_the_documented_keys() -> None:
    assert [field.name for field in Snapshot.__dataclass_fields__.values()] == SNAPSHOT_KEYS


def test_fd_usage_watch_warns_once_and_rearms_below_70_percent() -> None:
    watch = FdUsageWatch()
    seen = [watch.crossed(value) for value in (0.5, 0.79, 0.8, 0.95, 0.75, 0.81, 0.69, 0.72, 0.85, None)]
    assert seen == [False, False, True, False, False, False, False, False, True, False]


class TestEndpoint:
    def test_stats_follow_connections_and_fds(self, start_server, backend_name: str) -> None:
        server = start_server("--backend", backend_name, "--stats-port", "0")
        address = stats_address(server)
        idle = get_stats(address)
        assert list(idle) == SNAPSHOT_KEYS
        assert idle["pid"] == server.proc.pid and idle["backend"] == backend_name
        assert idle["connections_open"] == 0
        socks = [connect(server.address) for _ in range(50)]
        try:
            wait_for(lambda: get_stats(address)["connections_open"] == 50, what="50 open connections")
            # psutil's figures are counted at most once a second and shared by every view, either
            # inside a stats request (which holds one connection of its own) or by the once-a-second
            # watch (which does not): the idle figure may include that connection, this one not.
            wait_for(lambda: get_stats(address)["process_fds"] >= idle["process_fds"] + 49, what="50 more fds")
            busy = get_stats(address)
            assert busy["registered_fds"] >= 51
            assert busy["process_fds"] >= idle["process_fds"] + 49
            assert busy["connections_accepted"] == 50
            assert 0 < busy["fd_usage"] < 1
            assert busy["fd_usage"] == pytest.approx(busy["process_fds"] / busy["fd_soft_limit"], abs=1e-4)
        finally:
            for sock in socks:
                sock.close()
        # The fd-leak test: every connection's fd must be closed and unregistered.  registered_fds
        # is exact; process_fds is a shared count taken either inside a stats request (which holds
        # one connection of its own) or by the once-a-second watch (which does not): +-1.
        wait_for(
            lambda: (
                abs((after := get_stats(address))["process_fds"] - idle["process_fds"]) <= 1
                and after["registered_fds"] == idle["registered_fds"]
            ),
            what="fd counts back to idle",
        )
        final = get_stats(address)
        assert final["connections_open"] == 0 and final["connections_closed"] == 50

    def test_endpoint_traffic_is_not_counted_as_clients(self, start_server) -> None:
        server = start_server("--stats-port", "0")
        address = stats_address(server)
        for _ in range(5):
            get_stats(address)
        assert request_rounds(server.address, 2, 3, b"hi", b"Hello world\n") == 6
        stats = get_stats(address)
        assert stats["connections_accepted"] == 2
        assert stats["bytes_in"] == 12 and stats["bytes_out"] == 72

    def test_metrics_parse_and_agree_with_stats(self, start_server) -> None:
        server = start_server("--stats-port", "0", "--backend", "select")
        address = stats_address(server)
        assert request_rounds(server.address, 3, 2, b"hi", b"Hello world\n") == 6
        wait_for(lambda: get_stats(address)["connections_closed"] == 3, what="clients closed")
        status, content_type, body = http_get(address, "/metrics")
        assert status == 200 and content_type == "text/plain; version=0.0.4"
        text = body.decode()
        metrics = parse_metrics(text)
        stats = get_stats(address)
        assert f'pollserve_info{{backend="select",pid="{server.proc.pid}"}} 1' in text
        for metric, field in METRIC_FIELDS.items():
            if stats[field] is None:
                assert metric not in metrics  # unknown or unbounded: left out, not faked
            elif field in (
                *("registered_fds", "process_fds", "fd_usage", "loop_iterations", "events_total", "uptime_s"),
                *("loop_utilization", "loop_busy_s"),
            ):
                assert metric in metrics  # these move between two requests
            else:
                assert metrics[metric] == stats[field], metric
        for line in text.splitlines():
            if line.startswith("# TYPE") and line.endswith(" counter"):
                assert line.split()[2].endswith("_total")
        assert "pollserve_received_bytes_total" in metrics and "pollserve_uptime_seconds" in metrics

    def test_promtool_accepts_metrics(self, start_server) -> None:
        promtool = shutil.which("promtool")
        if promtool is None:
            if os.environ.get("CI"):
                pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
            pytest.skip("promtool not installed (apt-get install prometheus)")
        for args in ((), ("--workers", "2")):  # a single server's page, and a supervising parent's
            server = start_server("--stats-port", "0", *args)
            address = stats_address(server)
            if args:
                wait_for(lambda at=address: len(get_stats(at)["workers"]) == 2, timeout=20, what="2 workers reporting")
            _, _, body = http_get(address, "/metrics")
            if args:
                assert b"pollserve_workers_serving 2" in body and b"pollserve_worker_timeouts_total 0" in body
            result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
            assert result.returncode == 0, result.stdout + result.stderr

    def test_other_paths_and_bad_requests(self, start_server) -> None:
        server = start_server("--stats-port", "0")
        address = stats_address(server)
        assert http_get(address, "/nope")[0] == 404
        assert http_get(address, "/stats/extra")[0] == 404
        assert http_get(address, "/stats?pretty=1")[0] == 200
        for raw in (b"garbage\r\n\r\n", b"GET /stats HTTP/9.9\r\n\r\n", b"GET " + b"x" * 20000 + b" HTTP/1.1\r\n"):
            with connect(address) as sock:
                sock.sendall(raw)
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), reply[:100]
        assert server.alive()
        assert "Traceback" not in server.log


class TestLogViews:
    def test_periodic_line_appears_at_the_interval(self, start_server) -> None:
        server = start_server("--stats-interval", "0.3")
        assert request_rounds(server.address, 2, 2, b"hi", b"Hello world\n") == 4
        wait_for(lambda: sum("stats: backend" in line for line in server.lines) >= 3, what="3 stats lines")
        lines = [line for line in server.lines if "stats: backend" in line]
        stamps = [
            time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000 for line in lines
        ]
        gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
        assert all(0.2 < gap < 2.0 for gap in gaps), gaps
        assert re.search(
            r"stats: backend \w+ \| fds \d+/\d+ \(\d+\.\d%\), \d+ registered \| connections \d+ open, \d+ total, "
            r"\d+ refused \| in [\d.]+ \w+, out [\d.]+ \w+ \| [\d.]+ loop iterations/s, [\d.]+ events/iteration",
            lines[-1],
        ), lines[-1]
        assert ", 2 total," in lines[-1]

    @pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this OS")
    def test_sigusr1_logs_one_line(self, start_server) -> None:
        server = start_server()
        assert not any("stats: backend" in line for line in server.lines)
        server.signal(signal.SIGUSR1)
        server.wait_for_log(r"stats: backend \w+ \| fds")
        assert server.alive()

    @pytest.mark.skipif(not POSIX, reason="RLIMIT_NOFILE is POSIX")
    def test_warning_at_80_percent_of_a_low_soft_limit(self, start_server) -> None:
        # The connection limit keeps a reserve (about 45 fds here), so the limit must be large
        # enough for connections alone to pass 80%.
        server = start_server("--stats-port", "0", "--max-fds", "256")
        address = stats_address(server)
        idle = get_stats(address)
        assert idle["fd_soft_limit"] == 256
        need = int(0.8 * 256) - idle["process_fds"] + 2
        assert need < idle["connections_limit"]
        socks = [connect(server.address) for _ in range(need)]
        warning = r"WARNING fd usage at (\d+)% of the soft limit \((\d+) of 256\)"
        found = server.wait_for_log(warning)
        assert int(found[1]) >= 80
        for sock in socks:
            sock.close()
        # Below 70% the warning re-arms, and crossing again warns again -- once.
        wait_for(lambda: get_stats(address)["connections_open"] == 0, what="clients gone")
        time.sleep(1.5)
        socks = [connect(server.address) for _ in range(need)]
        wait_for(lambda: sum("fd usage at" in line for line in server.lines) == 2, what="second warning")
        time.sleep(1.5)
        assert sum("fd usage at" in line for line in server.lines) == 2
        for sock in socks:
            sock.close()
        assert server.alive()


@contextlib.contextmanager
def busy_endpoint(refusals: int, retry_after: str):
    """A stand-in stats endpoint on loopback: 429 with ``Retry-After: retry_after`` to the first
    ``refusals`` requests, then a snapshot; yields its address and the requests it got."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            refuse = len(asked) <= refusals
            body = b"too many requests\n" if refuse else json.dumps({"pid": 1, "connections_open": 3}).encode()
            self.send_response(429 if refuse else 200)
            if refuse:
                self.send_header("Retry-After", retry_after)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    with stand_in_server(Handler) as address:
        yield address, asked


class TestStatsCommand:
    def test_pid_agrees_with_the_server_itself(self, start_server) -> None:
        server = start_server("--stats-port", "0")
        address = stats_address(server)
        socks = [connect(server.address) for _ in range(10)]
        try:
            wait_for(lambda: get_stats(address)["connections_open"] == 10, what="10 clients")
            result = run_pollserve("stats", "--pid", str(server.proc.pid), "--json")
            assert result.returncode == 0, result.stderr
            outside = json.loads(result.stdout)
            # The server counts its fds at most once a second: wait for a count taken after the clients came.
            wait_for(lambda: abs(outside["process_fds"] - get_stats(address)["process_fds"]) <= 2, what="fresh count")
            inside = get_stats(address)
        finally:
            for sock in socks:
                sock.close()
        assert outside["pid"] == server.proc.pid
        assert abs(outside["process_fds"] - inside["process_fds"]) <= 2
        assert outside["fd_soft_limit"] == inside["fd_soft_limit"]
        assert outside["fd_hard_limit"] == inside["fd_hard_limit"]
        assert outside["tcp_states"]["LISTEN"] == 2
        assert outside["tcp_states"]["ESTABLISHED"] >= 10
        assert sorted(outside["listening"]) == sorted([f"127.0.0.1:{server.port}", f"127.0.0.1:{address[1]}"])

    @pytest.mark.parametrize("reuse_port", [False, True])
    def test_pid_counts_each_socket_once_whichever_processes_hold_it(self, start_server, reuse_port: bool) -> None:
        """With --workers 2 the app's listener is one socket held by the parent and both workers:
        one LISTEN, not three (the stats endpoint's is the other).  With --reuse-port each worker
        listens on a socket of its own: two, beside the stats endpoint's."""
        if reuse_port and not hasattr(socket, "SO_REUSEPORT"):
            pytest.skip("no SO_REUSEPORT here")
        server = start_server("--workers", "2", "--stats-port", "0", *(["--reuse-port"] if reuse_port else []))
        stats = stats_address(server)
        worker_pids(stats)
        socks = [connect(server.address) for _ in range(3)]
        try:
            wait_for(lambda: get_stats(stats)["connections_open"] == 3, what="3 clients")
            result = run_pollserve("stats", "--pid", str(server.proc.pid), "--json")
        finally:
            for sock in socks:
                sock.close()
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert data["tcp_states"]["LISTEN"] == (3 if reuse_port else 2), data["tcp_states"]
        assert data["tcp_states"]["ESTABLISHED"] == 3, data["tcp_states"]  # the server's ends, each in one worker
        assert sorted(data["listening"]) == sorted([f"127.0.0.1:{server.port}", f"127.0.0.1:{stats[1]}"])

    def test_a_socket_is_known_by_its_inode_where_proc_says_it(self) -> None:
        """Two processes holding one socket are seen as one fd each, with one inode; where the
        inode cannot be read (no /proc: macOS, BSD) each holder counts."""
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            conn = next(c for c in psutil.Process().net_connections("tcp") if c.laddr.port == port)
            held = [(os.getpid(), conn), (os.getpid(), conn)]
            if not os.path.isdir(f"/proc/{os.getpid()}/fd"):
                assert socket_inode(os.getpid(), conn.fd) is None
                assert len(distinct_sockets(held)) == 2
                return
            assert socket_inode(os.getpid(), conn.fd) == os.fstat(listener.fileno()).st_ino
            assert distinct_sockets(held) == [conn]
            assert distinct_sockets([(os.getpid(), conn._replace(fd=-1))] * 2) == [conn._replace(fd=-1)] * 2

    def test_pid_table(self, start_server) -> None:
        server = start_server()
        result = run_pollserve("stats", "--pid", str(server.proc.pid))
        assert result.returncode == 0, result.stderr
        rows = dict(line.split(None, 1) for line in result.stdout.strip().splitlines())
        assert rows["pid"] == str(server.proc.pid)
        assert re.fullmatch(r"\d+\.\d%", rows["fd_usage"])
        assert rows["listening"] == f"127.0.0.1:{server.port}"

    def test_url_reads_the_endpoint(self, start_server) -> None:
        server = start_server("--stats-port", "0")
        host, port = stats_address(server)
        for url in (f"http://{host}:{port}/stats", f"http://{host}:{port}", f"{host}:{port}"):
            result = run_pollserve("stats", "--url", url, "--json")
            assert result.returncode == 0, result.stderr
            assert list(json.loads(result.stdout)) == SNAPSHOT_KEYS
        result = run_pollserve("stats", "--url", f"http://{host}:{port}")
        assert re.search(r"^connections_open\s+0$", result.stdout, re.MULTILINE), result.stdout

    @pytest.mark.parametrize("flooded", ["/metrics", "/stats"])
    def test_url_answers_every_run_during_a_flood(self, start_server, flooded: str) -> None:
        """The operator's command is one request among the flood's hundreds a second, on a
        connection of its own like each of theirs: every run gets the snapshot (each run is
        bounded, so a hang fails too).  It used to share the flood's budget: most runs exited 1
        with HTTP 429."""
        server = start_server("--stats-port", "0")
        stats = stats_address(server)
        stop = threading.Event()
        outcomes: dict[str, int] = {}
        flooder = threading.Thread(target=flood_metrics, args=(stats, 100, stop, outcomes, flooded), daemon=True)
        flooder.start()
        try:
            wait_for(lambda: sum(outcomes.values()) >= 200, what="the flood under way")
            url = f"http://{stats[0]}:{stats[1]}"
            runs = [run_pollserve("stats", "--url", url, "--json", timeout=20) for _ in range(5)]
            flood_answers = sum(outcomes.values())
        finally:
            stop.set()
            flooder.join(30)
        assert not flooder.is_alive()
        assert [run.stderr.strip() for run in runs if run.returncode] == []
        assert all(list(json.loads(run.stdout)) == SNAPSHOT_KEYS for run in runs)
        assert flood_answers >= 400, outcomes  # it was a flood all along
        assert server.alive() and "Traceback" not in server.log

    def test_url_asks_again_when_the_endpoint_says_when(self) -> None:
        """A 429 (or 503) with Retry-After is an answer to wait for, not a failure: an endpoint
        behind a proxy of its own, or another version of pollserve, may send one."""
        with busy_endpoint(refusals=1, retry_after="1") as ((host, port), asked):
            result = run_pollserve("stats", "--url", f"http://{host}:{port}", "--json", timeout=20)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"pid": 1, "connections_open": 3}
        assert asked == ["/stats", "/stats"]

    def test_retry_after_is_delay_seconds_or_an_http_date(self) -> None:
        assert retry_after("2") == 2.0
        now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
        assert retry_after("Wed, 21 Oct 2015 07:28:03 GMT", now=now) == 3.0
        assert retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now=now) == 0.0  # already past
        assert retry_after(None) is None and retry_after("soon") is None and retry_after("-1") is None

    @pytest.mark.parametrize(
        ("retry_after", "tries", "message"),
        [
            ("3", 2, r"HTTP 429 Too Many Requests, 2 times in \d+ s; giving up"),
            ("60", 1, r"HTTP 429 Too Many Requests; it asks to retry in 60 s"),
        ],
    )
    def test_url_gives_up_on_a_busy_endpoint_in_one_line(self, retry_after: str, tries: int, message: str) -> None:
        with busy_endpoint(refusals=1000, retry_after=retry_after) as ((host, port), asked):
            result = run_pollserve("stats", "--url", f"http://{host}:{port}", timeout=20)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and re.fullmatch(rf"pollserve: http://{host}:{port}/stats: {message}", lines[0]), lines
        assert len(asked) == tries

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--pid", "999999999"], "pollserve: no process with PID 999999999"),
            (["--url", "http://127.0.0.1:1/stats"], "pollserve: cannot reach http://127.0.0.1:1/stats"),
        ],
    )
    def test_unreadable_source_is_one_line_exit_1(self, args: list[str], message: str) -> None:
        result = run_pollserve("stats", *args)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), result.stderr

    @pytest.mark.skipif(not POSIX, reason="sends SIGINT")
    def test_watch_refreshes_until_ctrl_c(self, start_server) -> None:
        server = start_server()
        watcher = subprocess.Popen(
            pollserve_command("stats", "--pid", str(server.proc.pid), "--json", "--watch", "0.2"),
            env=pollserve_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=sigint_as_at_a_terminal,
        )
        try:
            lines = [watcher.stdout.readline() for _ in range(3)]
            watcher.send_signal(signal.SIGINT)
            _out, err = watcher.communicate(timeout=10)
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait(10)
        assert watcher.returncode == 0, err
        assert all(json.loads(line)["pid"] == server.proc.pid for line in lines)
        assert "Traceback" not in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="psutil counts fds through /proc only on Linux")
def test_counting_fds_at_the_limit_reports_100_percent_not_unknown() -> None:
    """Listing /proc/self/fd needs an fd: at the limit, counting fails with EMFILE."""
    import resource

    from pollserve.loop import EventLoop
    from pollserve.server import Server
    from pollserve.stats import StatsCollector

    loop = EventLoop()
    collector = StatsCollector(loop, Server(loop, lambda: None))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)  # new fds take the lowest free number: a limit at it fails them all
    os.close(lowest_free)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        fds, soft_now, _ = collector.fd_figures()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        loop.close()
    assert soft_now == lowest_free
    assert fds == soft_now  # at the limit: usage 100%, not unknown
