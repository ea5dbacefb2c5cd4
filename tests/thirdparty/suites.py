"""The third-party suites: which release, where its tests are, and how its pytest is called."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "requirements"


@dataclass(frozen=True)
class Suite:
    name: str
    version: str
    #: what pytest is given after the harness's own options, from the release's source root
    args: tuple[str, ...] = ("tests",)
    #: parameter ids whose tests are not counted
    drop: tuple[str, ...] = ()
    #: markers of tests that need what this machine has not (the Internet), and why they are skipped
    skip: tuple[tuple[str, str], ...] = ()
    #: seconds one test may take, where the suite's own configuration sets no limit
    timeout: float | None = None
    #: pytest options the harness adds (after the suite's own addopts)
    options: tuple[str, ...] = ()
    #: the release's package folder, moved aside once unpacked: the tests import the installed
    #: package (pytest-xdist puts the working directory first on sys.path, where it would shadow it)
    package: str = ""
    #: why the suite runs as it does, for the report
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def requirements(self) -> Path:
        """The pinned packages of its venv: the release itself and its test requirements."""
        return REQUIREMENTS / f"{self.name}.txt"


SUITES = {
    suite.name: suite
    for suite in (
        Suite(
            "uvicorn",
            "0.54.0",
            timeout=60.0,
            package="uvicorn",
            notes=("uvicorn[standard] without uvloop, so that loop='auto' is asyncio's loop on the reference run",),
        ),
        Suite(
            "anyio",
            "4.16.0",
            drop=("trio", "asyncio+uvloop"),
            skip=(("network", "needs the Internet; the machines that run the suites reach the package index only"),),
            notes=("its asyncio half: the trio and uvloop parameters are deselected; neither is installed",),
        ),
        Suite(
            "aiohttp",
            "3.14.5",
            # Its server and client suites; --tests tests runs the whole of it (twice the time, the rest
            # being mostly its parsers' tests, which run no loop).
            args=("tests/test_web_*.py", "tests/test_client_*.py"),
            options=("--no-cov",),
            package="aiohttp",
            notes=("its own addopts, less coverage: the dev_mode, autobahn and internal tests are left out",),
        ),
    )
}
