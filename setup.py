"""The build: metadata is setup.cfg's; this file only adds the compiled extensions.

The per-request modules (``pollserve.compiled.MODULES``) are compiled with mypyc from their own
Python source when this install can: CPython with the GIL, ``Python.h`` and a C compiler.  Otherwise,
or with ``POLLSERVE_PURE_PYTHON=1``, the same package installs as pure Python; a compile that fails
is one warning and the pure install, never a failed install.
"""

from __future__ import annotations

import os
import runpy
import sys
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
MODULES = runpy.run_path(str(HERE / "pollserve" / "compiled.py"))["MODULES"]


def pure_python_reason() -> str | None:
    """Why this install cannot or must not compile, or None when it can try."""
    if os.environ.get("POLLSERVE_PURE_PYTHON", "") not in ("", "0"):
        return "POLLSERVE_PURE_PYTHON is set"
    if sys.implementation.name != "cpython":
        return f"mypyc compiles for CPython only, this is {sys.implementation.name}"
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return "this is a free-threaded build of Python, which mypyc does not support"
    include = sysconfig.get_paths().get("include")
    if not include or not Path(include, "Python.h").is_file():
        return "Python.h is missing (install the Python development headers)"
    return None


def pure_python_warning(reason: str) -> None:
    print(f"WARNING: pollserve: installing pure Python: {reason}", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """build_ext that falls back to pure Python when compiling fails: the .py files are in the
    package either way, so dropping every extension built so far leaves a working install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            for ext in self.extensions:
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            pure_python_warning(f"compiling failed: {type(exc).__name__}: {first_line[:300]}")


#: the commands that build: the others (egg_info, dist_info, which pip runs first for the metadata)
#: need no extensions, and the compile and its one warning happen once, in the build
BUILDING = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install", "bdist_egg"}


def extensions() -> list:
    if not BUILDING & set(sys.argv[1:]):
        return []
    reason = pure_python_reason()
    if reason is None:
        try:
            from mypyc.build import mypycify

            paths = [str(Path(*name.split("."))) + ".py" for name in MODULES]
            return mypycify(paths, opt_level="3", group_name="pollserve")
        except BaseException as exc:  # mypyc's type check exits with SystemExit on an error
            reason = f"mypyc failed: {type(exc).__name__}: {exc}"
    if reason != "POLLSERVE_PURE_PYTHON is set":
        pure_python_warning(reason)
    return []


os.chdir(HERE)  # mypycify takes paths relative to the project
setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
