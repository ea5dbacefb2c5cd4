"""The peers the benchmarks measure pollserve against (pollserve.peers) serve what they claim to."""

from __future__ import annotations

import sys

import pytest
from clients import connect, recv_exactly
from serverproc import pollserve_env

from pollserve.bench import ServerProcess, uvloop_installed

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
