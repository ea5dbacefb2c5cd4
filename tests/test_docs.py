"""The shell blocks of README.md and docs/: each is marked as run here or not, and the marked ones run.

The marker is an HTML comment on the line before the block's opening fence (CONTRIBUTING.md, "Commands
in the docs"):

- ``<!-- runs -->``: every command of the block, in order, in a fresh copy of the repository, with
  the ``pollserve`` under test first on PATH.  A command must end with status 0 or, if it is a server,
  listen on a TCP port; servers run until the block's last command has ended, then are stopped.
- ``<!-- runs against: COMMAND -->``: COMMAND is started first, as a server the block talks to.
- ``; prints: TEXT`` after either: what the block's commands write must contain TEXT.
- ``<!-- not run: REASON -->``: never run here, and the reason says why.
- ``<!-- from PATH -->`` before any block: its lines are lines of the repository's file PATH, in a row
  (either side may be indented as a whole), so that a quoted snippet cannot drift from the example
  the tests run.

A shell block is one fenced as ``sh``, ``bash``, ``shell`` or ``console`` (where the commands are the
``$`` lines), or an unlabelled one with a ``$`` line: every one of them must carry a marker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from serverproc import pollserve_env

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"sh", "bash", "shell", "console"}
FENCE = re.compile(r"^(\s*)(```+)\s*(\S*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*(runs|not run)\b(.*?)-->\s*$")
QUOTED_FROM = re.compile(r"^\s*<!--\s*from\s+(\S+)\s*-->\s*$")
#: how long one command may take to end, or to listen when it is a server
COMMAND_TIMEOUT = 60.0
#: how long a stopped server may take to exit (--drain-delay 5 in the HAProxy block, then the flush)
STOP_TIMEOUT = 20.0
#: tools the blocks call that CI installs (.ci/run): missing there is a failure, elsewhere a skip
REQUIRED = bool(os.environ.get("CI")) and sys.platform.startswith("linux")


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: list[str]
    marker: str | None  # "runs ..." or "not run: ...", as written
    indent: str
    quoted_from: str | None = None  # PATH of a <!-- from PATH --> marker

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.language in SHELL_LANGUAGES or (not self.language and any(t.startswith("$ ") for t in self.text))

    def commands(self) -> list[str]:
        """The commands, continuation lines joined; a console block's are its ``$`` lines."""
        lines = [line[2:] for line in self.text if line.startswith("$ ")] if self.language == "console" else self.text
        commands: list[str] = []
        pending = ""
        for line in lines:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command = (pending + line).strip()
            pending = ""
            if command and not command.startswith("#"):
                commands.append(command)
        return commands

    def options(self) -> dict[str, str]:
        """``against`` and ``prints`` of a ``runs`` marker."""
        assert self.marker is not None
        found = {}
        for part in self.marker.removeprefix("runs").split(";"):
            name, _, value = part.strip().partition(":")
            if name:
                found[name.strip()] = value.strip()
        return found


def blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence, language = opening.groups()
        end = index + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        previous = next((line for line in reversed(lines[:index]) if line.strip()), "")
        marker = MARKER.match(previous)
        quoted = QUOTED_FROM.match(previous)
        text = [line[len(indent) :] if line.startswith(indent) else line.strip() for line in lines[index + 1 : end]]
        runs = (marker[1] + marker[2]).strip() if marker else None
        yield Block(path, index + 1, language, text, runs, indent, quoted[1] if quoted else None)
        index = end + 1


ALL_BLOCKS = [block for path in DOCUMENTS for block in blocks(path)]
RUNNABLE = [block for block in ALL_BLOCKS if block.is_shell and block.marker and block.marker.startswith("runs")]


def test_every_shell_block_is_marked() -> None:
    unmarked = [block.where for block in ALL_BLOCKS if block.is_shell and block.marker is None]
    assert not unmarked, (
        "mark these shell blocks <!-- runs --> or <!-- not run: REASON --> (CONTRIBUTING.md): " + ", ".join(unmarked)
    )
    unlabelled = [block.where for block in ALL_BLOCKS if block.is_shell and not block.language]
    assert not unlabelled, "label these blocks of $ commands ```console: " + ", ".join(unlabelled)
    misplaced = [block.where for block in ALL_BLOCKS if block.marker and not block.is_shell]
    assert not misplaced, "these markers are not before a shell block: " + ", ".join(misplaced)
    unexplained = [block.where for block in ALL_BLOCKS if block.marker and re.fullmatch(r"not run:?\s*", block.marker)]
    assert not unexplained, "say why these are not run: " + ", ".join(unexplained)
    assert RUNNABLE, "no block is marked to run"


QUOTING = [block for block in ALL_BLOCKS if block.quoted_from]


@pytest.mark.parametrize("block", QUOTING, ids=[block.where for block in QUOTING])
def test_a_quoted_block_is_in_its_file(block: Block) -> None:
    assert block.quoted_from is not None
    source = ROOT / block.quoted_from
    assert source.is_file(), f"{block.where} quotes {block.quoted_from}, which is not there"
    lines = source.read_text(encoding="utf-8").splitlines()
    wanted = textwrap.dedent("\n".join(block.text)).strip("\n")
    count = len(wanted.splitlines())
    windows = (textwrap.dedent("\n".join(lines[start : start + count])) for start in range(len(lines) - count + 1))
    assert wanted in windows, f"{block.where}: these lines are not, in a row, in {block.quoted_from}:\n{wanted}"


def copy_of_the_repository(target: Path) -> Path:
    """The files a fresh clone has: git's list where this is a checkout, else the tree without
    what a build or a test run leaves."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=30, check=False)
    if listed.returncode == 0 and listed.stdout:
        for name in listed.stdout.decode().split("\0"):
            source = ROOT / name
            if name and source.is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)
    else:
        ignored = shutil.ignore_patterns(".git", ".venv", ".tox", "__pycache__", "*.egg-info", "build", "dist")
        shutil.copytree(ROOT, target, ignore=ignored, dirs_exist_ok=True)
    return target


def listening(pid: int) -> bool:
    """The process or one of its children listens on a TCP port."""
    try:
        process = psutil.Process(pid)
        family = [process, *process.children(recursive=True)]
    except psutil.Error:
        return False
    for member in family:
        with contextlib.suppress(psutil.Error):
            sockets = member.net_connections("inet") if hasattr(member, "net_connections") else member.connections()
            if any(sock.status == psutil.CONN_LISTEN for sock in sockets):
                return True
    return False


class Session:
    """The commands of one block, each in a process group of its own, with their output in files."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.servers: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.outputs: list[Path] = []

    def start(self, command: str, *, server: bool | None = None) -> subprocess.Popen[bytes]:
        """Run a command until it ends (status 0) or listens (then it is a server and keeps running).
        server=True: it must listen; False: it must end."""
        output = self.folder.parent / f"output-{len(self.outputs)}.txt"
        self.outputs.append(output)
        with output.open("wb") as sink:
            proc = subprocess.Popen(
                ["bash", "-c", command],
                cwd=self.folder,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as one, by this PID
            )
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while time.monotonic() < deadline:
            status = proc.poll()
            if status is not None:
                assert status == 0 and server is not True, f"`{command}` exited {status}:\n{output.read_text()}"
                return proc
            if server is not False and listening(proc.pid):
                self.servers.append((command, proc))
                return proc
            time.sleep(0.05)
        self.servers.append((command, proc))  # stopped with the others
        raise AssertionError(f"`{command}` neither ended nor listened in {COMMAND_TIMEOUT:g} s:\n{output.read_text()}")

    def printed(self) -> str:
        return "".join(output.read_text(errors="replace") for output in self.outputs if output.exists())

    def stop(self) -> None:
        for _, proc in reversed(self.servers):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for command, proc in self.servers:
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
                raise AssertionError(f"`{command}` did not stop within {STOP_TIMEOUT:g} s of SIGTERM") from None


def tools_present(commands: list[str], path: str) -> None:
    for command in commands:
        tool = command.split()[0]
        if "=" in tool or shutil.which(tool, path=path) is not None:
            continue
        if REQUIRED:
            pytest.fail(f"{tool} is missing: .ci/run installs the tools the README's commands call")
        pytest.skip(f"{tool} is not on PATH")


@contextlib.contextmanager
def one_block_at_a_time() -> Iterator[None]:
    """The blocks listen on the ports they show (5001, 9100, ...): under pytest-xdist (the README's
    ``-n 2``), or beside another run of the suite, a block waits for the one running elsewhere."""
    import fcntl  # POSIX, as the blocks

    with open(Path(tempfile.gettempdir()) / "pollserve-docs-blocks.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.mark.skipif(sys.platform == "win32", reason="the blocks are POSIX shell")
@pytest.mark.parametrize("block", RUNNABLE, ids=[block.where for block in RUNNABLE])
def test_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    with one_block_at_a_time():
        run_block(block, tmp_path)


def run_block(block: Block, tmp_path: Path) -> None:
    options = block.options()
    commands = block.commands()
    env = pollserve_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    tools_present([*commands, *([options["against"]] if "against" in options else [])], env["PATH"])
    session = Session(copy_of_the_repository(tmp_path / "clone"), env)
    try:
        if "against" in options:
            session.start(options["against"], server=True)
        for index, command in enumerate(commands):
            # The last command of a block that prints something must end, whatever it listens on along
            # the way (a test run's own server, a stats endpoint of its own): taken for a server as soon
            # as it listened, it was stopped before it printed its result.
            last = index == len(commands) - 1
            session.start(command, server=False if last and "prints" in options else None)
        if "prints" in options:
            assert options["prints"] in session.printed(), f"{block.where}: no {options['prints']!r} in:\n" + (
                session.printed()
            )
    finally:
        session.stop()
