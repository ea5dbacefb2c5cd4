"""``pollserve bench`` end to end: a short real run against real servers, its outputs and its errors."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import AVAILABLE
from serverproc import run_pollserve

from pollserve import bench

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the bench stops its servers with SIGTERM")

SHORT = ["--seconds", "0.5", "--warmup", "0.2", "--rate", "400", "--connections", "4"]


def test_json_has_a_row_per_target_and_idle_count() -> None:
    backends = [name for name in ("epoll", "kqueue", "poll", "select") if name in AVAILABLE][:2]
    result = run_pollserve("bench", "--backends", ",".join(backends), "--idle", "0,50", "--json", *SHORT, timeout=120)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["machine"]["python"] and record["load"]["rate"] == 400
    rows = record["results"]
    assert [(row["target"], row["idle"]) for row in rows] == [(name, idle) for name in backends for idle in (0, 50)]
    for row in rows:
        assert row["errors"] == 0 and row["requests"] > 0, row
        assert 0 < row["cpu_us_per_request"] < 100_000, row
        assert 0 < row["p50_us"] <= row["p99_us"], row
        assert row["rss_mib"] > 1
    # Progress goes to stderr, one line per run when stderr is not a terminal.
    progress = [line for line in result.stderr.splitlines() if line.startswith("pollserve bench: [")]
    assert len(progress) == len(rows) and "s left" in progress[0]


@pytest.mark.skipif("select" not in AVAILABLE, reason="no select backend")
def test_table_and_the_select_cap() -> None:
    result = run_pollserve("bench", "--backends", "select", "--idle", "0,2000,3000", *SHORT, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["select", "0"] for line in lines), result.stdout
    capped = [line for line in lines if line.startswith("select") and "*" in line]
    assert len(capped) == 1 and int(capped[0].split()[1].rstrip("*")) < 1024, result.stdout
    assert any(line.startswith("* capped at") and "FD_SETSIZE" in line for line in lines), result.stdout
    assert "Least CPU per request" in result.stdout


def test_plot_is_written(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.png"
    backend = AVAILABLE[0]
    result = run_pollserve("bench", "--backends", backend, "--idle", "0,20", "--plot", str(out), *SHORT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backends", "nope"], "--backends: 'nope' is not available here"),
        (["--idle", "0,x"], "--idle needs comma-separated numbers"),
        (["--idle", "-1"], "--idle needs counts of 0 or more"),
        (["--rate", "0"], "--rate needs a positive number"),
        (["--seconds", "nan"], "--seconds needs a positive number"),
        (["--connections", "0"], "--connections needs a positive number"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(args: list[str], message: str) -> None:
    result = run_pollserve("bench", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.skipif("select" not in AVAILABLE, reason="no select backend")
def test_every_row_capped_still_prints_the_table_and_a_verdict() -> None:
    result = run_pollserve("bench", "--backends", "select", "--idle", "2000", *SHORT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    capped = [line for line in result.stdout.splitlines() if line.startswith("select")]
    assert len(capped) == 1 and capped[0].split()[1].endswith("*"), result.stdout
    assert "Least CPU per request with " in result.stdout
    assert "\nlate: requests that fell due while every load connection" in result.stdout


def test_a_rate_beyond_the_client_is_reported_as_achieved() -> None:
    """The pacing caught up one request at a time: at 1e12/s it never finished a wakeup."""
    result = run_pollserve("bench", "--backends", AVAILABLE[0], "--idle", "0", "--json", *SHORT, "--rate", "1e12")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["results"]
    assert row["errors"] == 0 and row["requests"] > 0 and row["late"] > row["requests"], row
    table = run_pollserve("bench", "--backends", AVAILABLE[0], "--idle", "0", *SHORT, "--rate", "1e12")
    assert "1 of 1 runs fell behind 1e+12 requests/s: their req/s is the rate achieved" in table.stdout, table.stdout


@pytest.mark.parametrize("name", ["no-such-folder/bench.png", "bench.docx", "bench"])
def test_a_plot_that_cannot_be_written_is_refused_before_the_run(tmp_path, name: str) -> None:
    if "/" not in name:
        pytest.importorskip("matplotlib")  # the formats are matplotlib's
    path = tmp_path / name
    result = run_pollserve("bench", "--backends", AVAILABLE[0], "--plot", str(path), *SHORT, timeout=30)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pollserve: --plot {path}: "), result.stderr
    assert "no folder" in lines[0] if "/" in name else ".png" in lines[0]
    assert not result.stdout  # nothing ran


def test_the_verdict_names_a_peer_that_did_better() -> None:
    def row(target: str, idle: int, cpu: float) -> bench.Measurement:
        return bench.Measurement(target, 20, idle, "", 6000, 3.0, 0, 0, cpu, 50.0, 200.0, 27.0)

    rows = [row("epoll", 0, 11.5), row("epoll", 5000, 14.9), row("uvloop", 0, 7.7), row("uvloop", 5000, 7.0)]
    lines = bench.verdict(rows)
    assert lines[0] == (
        "Least CPU per request with 5000 idle connections: epoll. uvloop did better: 7.0 us per request against 14.9."
    )
    assert bench.verdict(rows[:2])[0] == "Least CPU per request with 5000 idle connections: epoll."
