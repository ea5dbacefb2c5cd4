"""Shared fixtures: the backends to run over, and real pollserve subprocesses."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from serverproc import ServerProcess

from pollserve.backends import BACKENDS, available_backends

AVAILABLE = available_backends()


def backend_params() -> list:
    """Every backend pollserve knows; the ones this OS lacks are skipped with the reason."""
    return [
        pytest.param(
            name,
            id=name,
            marks=pytest.mark.skipif(name not in AVAILABLE, reason=f"{name} is not available on {sys.platform}"),
        )
        for name in BACKENDS
    ]


@pytest.fixture(params=backend_params())
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def start_server() -> Iterator:
    """Start ``pollserve`` subprocesses; every one still running at teardown is killed by its PID."""
    started: list[ServerProcess] = []

    def start(*args: str, **kwargs) -> ServerProcess:
        server = ServerProcess(*args, **kwargs)
        started.append(server)
        server.wait_listening()
        return server

    yield start
    for server in started:
        server.kill()
