"""uvicorn's, anyio's and aiohttp's own suites on pollserve's loop, compared with asyncio's loop.

The harness is tests/thirdparty (``python -m tests.thirdparty --help``), which runs any suite on any
loop and Python; this runs the set CI gates (``GATED``) for the running Python, on the build under
test, with ``pytest -m thirdparty``.  Each suite's pinned release and test requirements come from the
package index (cached under ``.thirdparty/``): where pip cannot reach the index, the tests skip and
say so.  Outside ``-m thirdparty`` they skip, since each takes minutes.
"""

from __future__ import annotations

import os
import re
import sys

import pytest
from conftest import TESTED_ROOT
from thirdparty import compare, expectations, venvs
from thirdparty.suites import SUITES

pytestmark = [pytest.mark.thirdparty, pytest.mark.slow]

#: suite -> the pollserve loops it is compared on in CI (the whole matrix: python -m tests.thirdparty)
GATED = {
    "uvicorn": ["pollserve.loops:epoll", "pollserve.loops:poll", "pollserve.loops:select"],
    "anyio": ["pollserve.loops:epoll"],
    "aiohttp": ["pollserve.loops:epoll"],
}


@pytest.fixture(autouse=True)
def only_when_asked(request: pytest.FixtureRequest) -> None:
    # Asked for by name (-m thirdparty, -m 'thirdparty and ...'), not as in -m 'not thirdparty'.
    if not re.search(r"(?<!not )\bthirdparty\b", request.config.option.markexpr or ""):
        pytest.skip("the third-party suites run with -m thirdparty (or python -m tests.thirdparty)")


@pytest.mark.parametrize("suite", list(GATED))
def test_suite_on_pollserve_ends_as_on_asyncio(suite: str) -> None:
    try:
        prepared = venvs.prepare(SUITES[suite], sys.executable)
        result = compare.compare_suite(
            prepared,
            GATED[suite],
            expectations.load(expectations.EXPECTED),
            whole=True,
            pollserve=venvs.pollserve_path(TESTED_ROOT),
            jobs=2,
        )
    except venvs.IndexUnreachable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"under CI the third-party suites must run: {exc}")
        pytest.skip(str(exc))
    report = compare.report(result, verbose=True)
    print(report)
    for row in result.loops:
        assert row.counts()["passed"], f"no test passed on {row.run.loop}:\n{report}"
        assert not row.differences, report
