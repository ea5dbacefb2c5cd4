"""System tools some tests drive for real (sslscan, ...): where one is missing the test is skipped
with the reason, except under CI on Linux, where .ci/run and the workflow install it and a missing
one is a failure, so a broken install cannot pass unnoticed."""

from __future__ import annotations

import os
import shutil
import sys

import pytest


def system_tool(name: str, package: str) -> str:
    """The path of ``name``; skips (or under CI fails) the calling test when it is not on PATH."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") and sys.platform.startswith("linux"):
            pytest.fail(f"{name} is missing: .ci/run installs Debian's {package} package")
        pytest.skip(f"{name} is not on PATH (Debian: apt-get install {package})")
    return path
