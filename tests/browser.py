"""Headless Chromium for the tests: a page's DOM after its scripts ran, and screenshots.

Nothing is downloaded: the system's Chromium (Debian's ``chromium`` package) runs with a
throwaway profile and without background networking, every run is bounded in time, and a run
that overstays is killed with its process group, by the PID we started.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

#: executable names tried in order; POLLSERVE_TEST_CHROMIUM names another
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

FLAGS = (
    "--headless",
    "--no-sandbox",  # root in a container has no user namespace to sandbox with
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    named = os.environ.get("POLLSERVE_TEST_CHROMIUM")
    if named:
        return shutil.which(named)
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


def require_chromium() -> str:
    """The Chromium to drive; skipped with a reason where there is none, but a failure in CI on
    Linux, where .ci/run installs it."""
    if sys.platform == "win32":
        pytest.skip("the browser tests drive Chromium by process group (POSIX)")
    path = find_chromium()
    if path is None:
        if os.environ.get("CI") and sys.platform.startswith("linux"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("no headless Chromium here (apt-get install chromium)")
    return path


class Chromium:
    """One headless run per call, each with a fresh profile under ``profile_root``."""

    def __init__(self, executable: str, profile_root: Path, timeout: float = 60) -> None:
        self.executable = executable
        self.profile_root = profile_root
        self.timeout = timeout
        self._runs = 0

    def run(self, url: str, *args: str) -> str:
        """Run to completion; stdout.  A run past the timeout is killed and fails the test."""
        self._runs += 1
        profile = self.profile_root / f"profile-{self._runs}"
        command = [self.executable, *FLAGS, f"--user-data-dir={profile}", *args, url]
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: the renderer and helpers go with it
        )
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet, so the group is still ours
            proc.communicate(timeout=10)
            pytest.fail(f"chromium did not finish within {self.timeout} s: {' '.join(command)}")
        assert proc.returncode == 0, f"chromium exited with {proc.returncode}:\n{err[-2000:]}"
        return out

    def dump_dom(self, url: str, budget_ms: int = 4000, window: tuple[int, int] = (1280, 900)) -> str:
        """The DOM once the page has run ``budget_ms`` of virtual time (timers fire, fetches are real)."""
        size = f"--window-size={window[0]},{window[1]}"
        return self.run(url, size, f"--virtual-time-budget={budget_ms}", "--dump-dom")

    def screenshot(self, url: str, path: Path, budget_ms: int = 4000, window: tuple[int, int] = (1280, 900)) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.run(
            url, f"--window-size={window[0]},{window[1]}", f"--virtual-time-budget={budget_ms}", f"--screenshot={path}"
        )
        assert path.exists(), f"chromium wrote no screenshot to {path}"


# A fresh, single-threaded process puts the pipe ends where --remote-debugging-pipe wants them
# (fds 3 and 4) and becomes Chromium, keeping its PID: no preexec_fn in a threaded test process.
_ONTO_FDS_3_AND_4 = """\
import fcntl, os, sys
ends = [fcntl.fcntl(int(fd), fcntl.F_DUPFD_CLOEXEC, 10) for fd in sys.argv[1:3]]
for fd in sys.argv[1:3]:
    os.close(int(fd))
os.dup2(ends[0], 3)
os.dup2(ends[1], 4)
os.execv(sys.argv[3], sys.argv[3:])
"""


class DevTools:
    """A tiny DevTools-protocol client over --remote-debugging-pipe (JSON messages, each ended by
    a NUL byte), for what --dump-dom cannot do: watch a page in real time at a given viewport,
    read values from it, and capture it.  Every wait is bounded; close() ends the browser."""

    def __init__(
        self, executable: str, profile: Path, size: tuple[int, int], mobile: bool = False, timeout: float = 30
    ) -> None:
        self.timeout = timeout
        #: protocol events received so far (Log.entryAdded and the like)
        self.events: list[dict[str, Any]] = []
        self._buffer = b""
        self._last_id = 0
        self._session: str | None = None
        self._closed = False
        commands_in, self._commands = os.pipe()
        self._replies, replies_out = os.pipe()
        command = [executable, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ONTO_FDS_3_AND_4, str(commands_in), str(replies_out), *command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(commands_in, replies_out),
            start_new_session=True,
        )
        os.close(commands_in)
        os.close(replies_out)
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Log.enable")
            self.call(
                "Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1, mobile=mobile
            )
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> DevTools:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command (to the page once attached) and wait for its reply."""
        self._last_id += 1
        message: dict[str, Any] = {"id": self._last_id, "method": method, "params": params}
        if self._session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self._session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._commands, data) :]
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._last_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"chromium did not answer within {self.timeout} s"
            if select.select([self._replies], [], [], remaining)[0]:
                chunk = os.read(self._replies, 1 << 20)
                assert chunk, "chromium closed the DevTools pipe"
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def open(self, url: str) -> None:
        """Navigate, and wait until the new page has loaded (until then, about:blank answers)."""
        self.call("Page.navigate", url=url)
        self.wait_until(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", what=url)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 15, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            assert time.monotonic() < deadline, f"{what or expression} not true within {timeout} s"
            time.sleep(0.1)

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.proc.poll() is None:
            try:
                self.timeout = min(self.timeout, 5)
                self.call("Browser.close")
                self.proc.wait(10)
            except (AssertionError, OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # not reaped yet, so the group is still ours
            self.proc.wait(10)
        os.close(self._commands)
        os.close(self._replies)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Dom(HTMLParser):
    """What a dumped DOM shows: the text and attributes of every element with an id, and every
    element's classes (to count rows, say)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self.attrs: dict[str, dict[str, str | None]] = {}
        self.classes: list[tuple[str, list[str]]] = []
        self._open: list[tuple[str, str | None]] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        self.classes.append((tag, (named.get("class") or "").split()))
        element_id = named.get("id")
        if element_id:
            self.attrs[element_id] = named
            self.text.setdefault(element_id, "")
        if tag not in _VOID:
            self._open.append((tag, element_id))

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self._open) - 1, -1, -1):
            if self._open[index][0] == tag:
                del self._open[index:]
                return

    def handle_data(self, data: str) -> None:
        for _, element_id in self._open:
            if element_id:
                self.text[element_id] += data

    def count(self, tag: str, css_class: str) -> int:
        return sum(1 for name, classes in self.classes if name == tag and css_class in classes)
