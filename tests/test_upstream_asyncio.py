"""CPython's own asyncio tests on pollserve's loop, on every backend, compared with tests/upstream/expected.txt.

The harness is tests/upstream (``python -m tests.upstream --help``); this runs it for the running
Python.  kqueue and devpoll run through their test emulations where this OS lacks them.  asyncio's
own loop on the real epoll selector is the reference: every test passes there or is skipped by
CPython itself, which shows a difference elsewhere is the loop's and not the harness's.
"""

from __future__ import annotations

import os
import select
import sys

import pytest
from conftest import AVAILABLE, REQUESTED
from serverproc import pollserve_env
from upstream import driver, expectations

from pollserve.backends import BACKENDS

pytestmark = [pytest.mark.upstream, pytest.mark.slow]

EXPECTED = expectations.load(driver.WORKER.parent / "expected.txt")
#: backends a test emulation (tests/emulation) stands in for where the OS lacks them
EMULATIONS = ("kqueue", "devpoll")


def backend_params() -> list:
    params = []
    for name in BACKENDS:
        if REQUESTED and name != REQUESTED:
            continue
        if name in AVAILABLE:
            params.append(pytest.param(name, {}, id=name))
        elif name in EMULATIONS:
            params.append(pytest.param(name, {"POLLSERVE_TEST_EMULATE": name}, id=f"{name}-emulated"))
        else:
            params.append(pytest.param(name, {}, id=name, marks=pytest.mark.skip(reason=f"{name} is not available")))
    return params


def run_upstream(loop: str, extra: dict[str, str]) -> driver.Run:
    run = driver.run(sys.executable, loop, EXPECTED, env=pollserve_env(extra))
    if run.missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"under CI the upstream tests must run: {run.missing}")
        pytest.skip(run.missing)
    print(driver.report(run, verbose=True))
    return run


@pytest.mark.parametrize(("backend", "extra"), backend_params())
def test_upstream_asyncio_suite_on_pollserve(backend: str, extra: dict[str, str]) -> None:
    run = run_upstream(f"pollserve.loops:{backend}", extra)
    assert run.results, "no test ran"
    assert not run.differences, driver.report(run, verbose=True)


@pytest.mark.skipif(not hasattr(select, "epoll"), reason="the reference is asyncio's loop on the real epoll")
def test_upstream_asyncio_suite_on_the_reference_loop() -> None:
    run = run_upstream("stdloop:epoll", {})
    counts = run.counts()
    assert {outcome for counter in counts.values() for outcome in counter} <= set(expectations.FINE), driver.report(
        run, verbose=True
    )
    assert not run.differences, driver.report(run, verbose=True)
