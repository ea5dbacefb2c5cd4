"""Install the EMULATIONS named by POLLSERVE_TEST_EMULATE (comma-separated: kqueue, devpoll, windows).

Used by tests/conftest.py for the pytest process and by sitecustomize.py for
every Python subprocess started with this folder on PYTHONPATH.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "POLLSERVE_TEST_EMULATE"
FOLDER = str(Path(__file__).parent)


def requested() -> list[str]:
    return [name.strip() for name in os.environ.get(ENV, "").split(",") if name.strip()]


def install_from_env() -> list[str]:
    names = requested()
    for name in names:
        if name == "kqueue":
            import kqueue_emulation

            kqueue_emulation.install()
        elif name == "devpoll":
            import devpoll_emulation

            devpoll_emulation.install()
        elif name == "windows":
            import windows_emulation

            windows_emulation.install()
        else:
            raise RuntimeError(f"{ENV}: unknown emulation {name!r} (known: kqueue, devpoll, windows)")
    return names
