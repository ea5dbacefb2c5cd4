"""Run the real ``pollserve`` command in a subprocess and find where it listens."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pollserve

LISTENING = re.compile(
    r"listening on (?:unix:(?P<unix>.+?)|(\[(?P<v6>[^\]]+)\]|(?P<v4>[^:\s]+)):(?P<port>\d+))"
    r" \(backend (?P<backend>\w+), app (?P<app>\S+)\)"
)

#: the folder of the pollserve the tests imported (the build under test, tests/buildchoice.py),
#: first on the subprocesses' path, so they run the same build
SOURCE_ROOT = str(Path(pollserve.__file__).resolve().parent.parent)


#: test EMULATIONS (kqueue, devpoll, windows) install themselves from here via sitecustomize
EMULATION_DIR = str(Path(__file__).resolve().parent / "emulation")


def sigint_as_at_a_terminal() -> None:
    """preexec_fn for a child that a test stops with SIGINT, as Ctrl-C would: a test run started in
    the background by a shell without job control inherits SIGINT ignored, and Python leaves an
    ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def pollserve_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a pollserve subprocess: the build under test, and our POLLSERVE_BACKEND.

    Inheriting POLLSERVE_BACKEND makes every server started without --backend
    run on the backend the tox env asks for.  An EMULATION asked for in
    POLLSERVE_TEST_EMULATE (ours or the ``extra`` one) puts tests/emulation on
    the path, whose sitecustomize installs it.
    """
    env = dict(os.environ)
    paths = [SOURCE_ROOT]
    if extra:
        env.update(extra)
        if "PYTHONPATH" in extra:
            paths.append(extra["PYTHONPATH"])
    if env.get("POLLSERVE_TEST_EMULATE"):
        paths.insert(0, EMULATION_DIR)
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def pollserve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pollserve", *args]


def run_pollserve(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a pollserve command that is expected to exit by itself."""
    return subprocess.run(
        pollserve_command(*args), env=pollserve_env(env), capture_output=True, text=True, timeout=timeout
    )


class ServerProcess:
    """A pollserve server on port 0 (or on --unix alone); ``address`` (or ``unix_path``) is read from
    its one ``listening on`` line.  ``launcher`` replaces ``python -m pollserve`` (systemd's part in
    test_systemd), and ``pass_fds`` are the fds it inherits."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        preexec_fn=None,
        launcher: list[str] | None = None,
        pass_fds: tuple[int, ...] = (),
        start_new_session: bool = False,
    ) -> None:
        if "--port" not in args and "--unix" not in args:
            args = ("--port", "0", *args)
        self.args = args
        self.proc = subprocess.Popen(
            [*launcher, *args] if launcher else pollserve_command(*args),
            env=pollserve_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec_fn,
            pass_fds=pass_fds,
            start_new_session=start_new_session,
        )
        self.lines: list[str] = []
        self._listening = threading.Event()
        self.match: re.Match | None = None
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if self.match is None:
                self.match = LISTENING.search(line)
                if self.match:
                    self._listening.set()
        self._listening.set()  # exited: stop waiting

    def wait_listening(self, timeout: float = 15) -> None:
        if not self._listening.wait(timeout) or self.match is None:
            self.kill()
            raise AssertionError(f"pollserve {' '.join(self.args)} did not start:\n{self.log}")

    @property
    def host(self) -> str:
        assert self.match is not None
        return self.match["v6"] or self.match["v4"]

    @property
    def port(self) -> int:
        assert self.match is not None
        return int(self.match["port"])

    @property
    def unix_path(self) -> str:
        """The path of ``listening on unix:PATH``."""
        assert self.match is not None and self.match["unix"] is not None, self.log
        return self.match["unix"]

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def backend(self) -> str:
        assert self.match is not None
        return self.match["backend"]

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 10) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = regex.search(line)
                if found:
                    return found
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r} within {timeout} s:\n{self.log}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 15) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
