"""The peers the benchmarks measure pollserve against (pollserve.peers) serve what they claim to."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from clients import connect, recv_exactly, recv_until
from serverproc import pollserve_env

from pollserve.bench import ServerProcess, uvloop_installed
from pollserve.compiled import package_root

ASYNCIO_PEERS = [
    "asyncio",
    "pollserve-asyncio",
    pytest.param("uvloop", marks=pytest.mark.skipif(not uvloop_installed(), reason="uvloop is not installed")),
]


@pytest.mark.parametrize("streams", [False, True], ids=["protocol", "streams"])
@pytest.mark.parametrize("peer", ASYNCIO_PEERS)
def test_an_asyncio_peer_answers_hello_and_echo(peer: str, streams: bool) -> None:
    for app, sent, expected in (("hello", b"hi", b"Hello world\n"), ("echo", "é✓".encode(), "é✓".encode())):
        argv = [sys.executable, "-m", "pollserve.peers", peer, "--app", app, "--port", "0"]
        server = ServerProcess(peer, argv + (["--streams"] if streams else []), env=pollserve_env())
        port = server.start()
        try:
            with connect(("127.0.0.1", port)) as client:
                for _ in range(3):
                    client.sendall(sent)
                    assert recv_exactly(client, len(expected)) == expected
            if peer == "pollserve-asyncio":
                assert "backend pollserve-asyncio/" in server.describe_tail()
        finally:
            server.stop()


def test_streams_are_refused_for_the_selectors_peer() -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "pollserve.peers", "selectors", "--streams"],
        capture_output=True,
        text=True,
        env=pollserve_env(),
        timeout=30,
    )
    assert done.returncode == 2 and "--streams is for the asyncio loops" in done.stderr


@pytest.mark.parametrize(
    ("spec", "sent", "expected"), [("stream_hello", b"hi", b"Hello world\n"), ("stream_echo", b"hi", b"hi")]
)
def test_the_streams_client_is_an_app_of_the_command(start_server, spec: str, sent: bytes, expected: bytes) -> None:
    """bench_asyncio.py serves the peers' streams client with ``pollserve --app``: it is a handler there."""
    server = start_server("--app", f"pollserve.peers:{spec}")
    with connect(server.address) as client:
        for _ in range(3):
            client.sendall(sent)
            assert recv_exactly(client, len(expected)) == expected
    assert "Traceback" not in server.log


def test_uvicorn_as_bench_uvicorn_starts_it_answers_on_pollserves_loop_and_stops_with_status_0(monkeypatch) -> None:
    """bench_uvicorn.py's server: its start-up line is found, a keep-alive GET is answered by the app on
    pollserve's loop (the build under test), and SIGTERM ends it with status 0, as the other servers."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("httptools")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench_uvicorn import uvicorn_argv

    server = ServerProcess("uvicorn", uvicorn_argv("pollserve:new_event_loop", Path(package_root())))
    port = server.start()
    try:
        with connect(("127.0.0.1", port)) as client:
            for _ in range(2):  # the same connection: keep-alive
                client.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                reply = recv_until(client, b"Hello world\n")
                assert reply.startswith(b"HTTP/1.1 200 ") and b"content-length: 12\r\n" in reply.lower()
    finally:
        server.stop()
    assert "Traceback" not in server.describe_tail()
