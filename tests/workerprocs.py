"""What the ``--workers`` tests need of a supervising parent: its workers as processes and as its
stats endpoint shows them, a deployable app module, and short client exchanges."""

from __future__ import annotations

from pathlib import Path

import psutil
from clients import connect, recv_exactly
from statsclient import get_stats, http_get, wait_for

HELLO = b"Hello world\n"

#: an app module the tests deploy and break: a different size when broken, so that no stale
#: bytecode can stand in for it (and the servers run with PYTHONDONTWRITEBYTECODE)
GOOD_APP = "from pollserve.apps import Hello\n"
BROKEN_APP = "raise ImportError('this deploy is broken on purpose')\n"
#: an import that never ends (a lock or a network that never answers); only workers import an app
#: on a reload, the parent does not
HANGING_APP = "import time\ntime.sleep(3600)  # this deploy hangs on purpose\n"


def deploy(folder: Path, *, broken: bool = False, hanging: bool = False) -> Path:
    """Write deployed_app.py in folder; the servers load ``--app deployed_app:Hello``."""
    path = folder / "deployed_app.py"
    path.write_text(HANGING_APP if hanging else BROKEN_APP if broken else GOOD_APP)
    return path


def deploy_answering(folder: Path, answer: bytes, *, import_seconds: float = 0.0) -> Path:
    """Write deployed_app.py in folder: ``Hello`` answers every chunk with ``answer``, so a client
    tells which deploy served it; its import takes ``import_seconds`` (a slow deploy)."""
    path = folder / "deployed_app.py"
    path.write_text(
        "import time\n"
        f"time.sleep({import_seconds!r})\n"
        "from pollserve.apps import Protocol\n"
        "class Hello(Protocol):\n"
        "    def data_received(self, data):\n"
        f"        self.transport.write({answer!r})\n"
    )
    return path


def deploy_deaf(folder: Path) -> Path:
    """Write deployed_app.py in folder: an import that ignores SIGTERM and never ends (an app that
    installs its own handler, then waits on a lock or a network); each process importing it
    creates ``deaf-PID`` in folder once SIGTERM is ignored."""
    path = folder / "deployed_app.py"
    path.write_text(
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open(os.path.join({str(folder)!r}, f'deaf-{{os.getpid()}}'), 'w').close()\n"
        "time.sleep(3600)  # this deploy hangs on purpose\n"
    )
    return path


def deaf_pids(folder: Path) -> set[int]:
    """The processes that have imported deploy_deaf's module."""
    return {int(path.name.split("-")[1]) for path in folder.glob("deaf-*")}


def kill_deaf(folder: Path) -> None:
    """SIGKILL what is left of the processes that imported deploy_deaf's module (a worker the
    parent never killed would sleep on for an hour): each pid only while it still runs pollserve."""
    for pid in deaf_pids(folder):
        try:
            process = psutil.Process(pid)
            if any("pollserve" in part for part in process.cmdline()):
                process.kill()
        except psutil.Error:
            pass


def deployed_env(folder: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(folder), "PYTHONDONTWRITEBYTECODE": "1"}


def worker_pids(stats: tuple[str, int], count: int = 2) -> dict[int, int]:
    """index -> pid of the workers, once `count` of them have reported."""
    found: dict[int, int] = {}

    def reported() -> bool:
        found.clear()
        found.update({row["index"]: row["pid"] for row in get_stats(stats)["workers"]})
        return len(found) == count

    wait_for(reported, timeout=20, what=f"{count} workers reporting")
    return dict(found)


def live_children(parent: int) -> list[psutil.Process]:
    """The parent's child processes that have not exited (a zombie has)."""
    alive = []
    for child in psutil.Process(parent).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


def wait_ended(parent: int, pid: int, timeout: float = 10) -> None:
    """Wait until pid is no longer a live child of parent: killed, or exited."""
    wait_for(
        lambda: pid not in {child.pid for child in live_children(parent)},
        timeout=timeout,
        what=f"worker pid {pid} ended",
    )


def healthz(stats: tuple[str, int]) -> tuple[int, str]:
    status, _, body = http_get(stats, "/healthz")
    return status, body.decode()


def ask(address: tuple[str, int]) -> None:
    """One short connection: a request, the whole reply, close."""
    with connect(address) as sock:
        sock.sendall(b"hi")
        assert recv_exactly(sock, len(HELLO)) == HELLO
