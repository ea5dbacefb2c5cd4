"""Which pollserve build the suite tests, chosen before anything imports pollserve.

``python -m pytest`` puts the working directory first on ``sys.path``, so from a checkout
``import pollserve`` would find the pure source even when ``pip install .`` compiled the package
into site-packages; so would every ``python -m pollserve`` the tests start.  The rule here: an
installed (non-editable) pollserve is the build under test; without one, the source tree is (pure,
or compiled in place by an editable install).  Its folder goes first on ``sys.path``, and the
session runs in an empty working directory so that no subprocess picks up the tree beside it.

``POLLSERVE_TEST_BUILD=compiled|pure`` says which build the run must test: another one fails the
run at once, so a compile that fell back cannot pass as the compiled build.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: what POLLSERVE_TEST_BUILD may say, and the name ``pollserve --version`` gives that build
BUILDS = {"compiled": "compiled", "pure": "pure Python"}


def installed_root() -> Path | None:
    """The sys.path folder of a pollserve installed apart from this tree, if any."""
    for entry in sys.path:
        if not entry or Path(entry).resolve() == REPO:
            continue
        if (Path(entry) / "pollserve" / "__init__.py").is_file():
            return Path(entry).resolve()
    return None


def stale_extensions(root: Path, modules: tuple[str, ...]) -> list[str]:
    """Extensions built in place that are older than their source: they would shadow the edit."""
    stale = []
    for name in modules:
        source = root.joinpath(*name.split(".")).with_suffix(".py")
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            built = source.with_suffix(suffix)
            if built.exists() and source.exists() and built.stat().st_mtime < source.stat().st_mtime:
                stale.append(str(built))
    return stale


def choose() -> Path:
    """Put the build under test first on sys.path and return its folder."""
    root = installed_root() or REPO
    sys.path.insert(0, str(root))
    return root


def check(root: Path, build: str) -> str | None:
    """Why this run must not go on, or None."""
    from pollserve import compiled

    wanted = os.environ.get("POLLSERVE_TEST_BUILD", "")
    if wanted and wanted not in BUILDS:
        return f"POLLSERVE_TEST_BUILD={wanted!r}: use one of {', '.join(BUILDS)}"
    if wanted and BUILDS[wanted] != build:
        return (
            f"POLLSERVE_TEST_BUILD={wanted} but the pollserve found in {root} is the {build} build "
            "(did the compile fall back? see the install's warning)"
        )
    # In place only: pip installs a build whole, and sets its files' times as it likes.
    stale = stale_extensions(root, compiled.MODULES) if root == REPO else []
    if stale:
        return (
            f"extensions older than their source would be tested instead of it: {', '.join(stale)}; "
            "rebuild them (pip install -e .) or delete them for the pure build"
        )
    return None
