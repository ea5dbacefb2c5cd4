"""A pytest plugin: ``--pollserve-backend NAME|MODULE:CLASS`` says which backend the kit tests.

``python -m pollserve.testing`` loads it.  Load it yourself with
``-p pollserve.testing.plugin`` or ``pytest_plugins = ["pollserve.testing.plugin"]``
in a conftest.py; loaded before the kit is imported, it also gives the kit's
assertions pytest's detailed messages.  A ``backend_class`` fixture of your own
(in a test class or a conftest.py) takes precedence over the option.
"""

from __future__ import annotations

import pytest

from pollserve.backends import Backend, BackendError, get_backend

pytest.register_assert_rewrite("pollserve.testing.contract", "pollserve.testing.end_to_end")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pollserve-backend",
        metavar="NAME|MODULE:CLASS",
        help="the backend pollserve.testing's tests run on: a name `pollserve backends` lists, or MODULE:CLASS",
    )


@pytest.fixture
def backend_class(request: pytest.FixtureRequest) -> type[Backend]:
    spec = request.config.getoption("pollserve_backend")
    if spec is None:
        pytest.fail("no backend to test: give --pollserve-backend NAME|MODULE:CLASS, or define a backend_class fixture")
    try:
        return get_backend(spec)
    except BackendError as exc:
        pytest.fail(str(exc))
