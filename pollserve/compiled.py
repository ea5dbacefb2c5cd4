"""Which build runs, and how to start another interpreter on the same one.

The per-request modules in ``MODULES`` are compiled with mypyc from their own source when the
install can (``setup.py`` reads the list from this file, so it is the one place that says what is
compiled); the same package runs as pure Python otherwise.  This module imports nothing of
pollserve's at import time: ``setup.py`` runs it before the package is built.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
from pathlib import Path

#: the modules every request runs through: the loop's pass, the connection's read and write, and the
#: asyncio stream transport's, the counts it keeps, and the asyncio face's call_soon
MODULES = (
    "pollserve.loop",
    "pollserve.server",
    "pollserve.aio.counts",
    "pollserve.aio.streamcore",
    "pollserve.aio.soon",
)


def let_signal_handlers_run() -> None:
    """Nothing, in interpreted code: CPython runs the Python-level signal handlers that are
    pending when bytecode starts to run.  The compiled loop calls it when its wakeup channel
    carried a signal's byte: on CPython 3.10, a compiled loop with no interpreted callback to run
    would otherwise not see the signal until it returned (3.11 and later run the handlers from
    the compiled code's own calls).  This module is never compiled (``MODULES``)."""


def is_compiled(module_name: str) -> bool:
    """Whether the module was loaded from a C extension rather than from its Python source."""
    module = importlib.import_module(module_name)
    return isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)


def build() -> str:
    """``compiled`` when every per-request module is, else ``pure Python`` (setup.py builds all or
    none, so a mix means a tree the build never made)."""
    return "compiled" if all(is_compiled(name) for name in MODULES) else "pure Python"


def package_root() -> str:
    """The folder that holds the pollserve package this process runs (site-packages, or a source tree)."""
    return str(Path(__file__).resolve().parent.parent)


def command(root: str | None = None) -> list[str]:
    """The argv that runs ``pollserve`` from ``root`` (default: the one this process runs) in a new
    interpreter.  ``python -m pollserve`` would put the working directory first on ``sys.path``, so
    from a source checkout a compiled install's workers would run the pure source beside it; this puts
    ``root`` first and leaves the working directory out until pollserve is imported (then the command
    adds it back for a ``MODULE:FACTORY`` app, as the parent does)."""
    root = package_root() if root is None else root
    # The working directory (sys.path[0] of ``-c``) goes: a local pollserve.py, or a file named as a
    # module pollserve imports, must not stand in for it; the command puts the directory back, after
    # pollserve is imported, when the app is a MODULE:FACTORY of the user's.
    bootstrap = (
        "import runpy, sys; "
        f"sys.path[:] = [{root!r}, *(p for p in sys.path if p not in ('', '.'))]; "
        "runpy.run_module('pollserve', run_name='__main__')"
    )
    return [sys.executable, "-c", bootstrap]
