"""What a careless user types, and what happens before serving starts: one line and the exit code
the message names, never a traceback; and a Ctrl-C while the command starts up."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from clients import connect, recv_exactly
from serverproc import pollserve_env, run_pollserve, sigint_as_at_a_terminal
from test_cli import one_line

POSIX = sys.platform != "win32"


class TestOneLine:
    @pytest.mark.skipif(not POSIX, reason="RLIMIT_NOFILE is POSIX")
    @pytest.mark.parametrize("fds", ["1", "3", "5", "8"])
    def test_max_fds_too_low_for_the_server_itself(self, fds: str) -> None:
        """Below a handful of fds the backend or a socketpair failed with EMFILE before the check."""
        line = one_line(run_pollserve("--port", "0", "--max-fds", fds), 2)
        assert re.fullmatch(r"pollserve: no fds left for connections: the fd limit leaves none once \d+ .*", line)

    @pytest.mark.parametrize("host", ["999.1.1.1", "nosuchhost.invalid"])
    @pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["single", "workers"])
    def test_a_host_that_does_not_resolve_names_host(self, host: str, workers: list[str]) -> None:
        line = one_line(run_pollserve("--host", host, "--port", "0", *workers), 1)
        assert line.startswith(f"pollserve: cannot listen on {host}:0 (--host): "), line

    def test_a_stats_host_that_does_not_resolve_names_stats_host(self) -> None:
        line = one_line(run_pollserve("--port", "0", "--stats-port", "0", "--stats-host", "999.1.1.1"), 1)
        assert line.startswith("pollserve: cannot listen on 999.1.1.1:0 (--stats-host): "), line

    def test_the_environment_variable_is_named(self) -> None:
        line = one_line(run_pollserve("--port", "0", env={"POLLSERVE_BACKEND": "nope"}), 2)
        assert line.startswith("pollserve: POLLSERVE_BACKEND=nope: unknown backend 'nope'"), line

    def test_an_empty_backend_is_an_error(self) -> None:
        line = one_line(run_pollserve("--port", "0", "--backend", "", timeout=15), 2)
        assert line.startswith("pollserve: --backend needs a name"), line
        for empty in ("", " , "):
            line = one_line(run_pollserve("bench", "--backends", empty, "--seconds", "0.1", timeout=30), 2)
            assert line.startswith("pollserve: --backends needs comma-separated names"), line

    @pytest.mark.parametrize(
        "args",
        [
            ["--host", "127.0.0.1", "--host", "127.0.0.2"],
            ["--host=127.0.0.1", "--host", "127.0.0.1"],
            ["--unix", "a.sock", "--unix", "b.sock"],
        ],
    )
    def test_a_repeated_address_is_an_error(self, args: list[str], tmp_path: Path) -> None:
        """argparse keeps the last one; the user meant both."""
        args = [str(tmp_path / arg) if arg.endswith(".sock") else arg for arg in args]
        line = one_line(run_pollserve("--port", "0", *args, timeout=15), 2)
        option = args[0].split("=")[0]
        assert line.startswith(f"pollserve: {option} is given more than once: one "), line
        if option == "--host":
            assert "a name that resolves to several addresses" in line, line


@pytest.mark.skipif(not POSIX, reason="a closed pipe is SIGPIPE/EPIPE on POSIX")
def test_stats_watch_into_a_closed_pipe_ends_quietly() -> None:
    """`pollserve stats --watch 1 | head -2`: the reader goes, the command ends as cat does."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pollserve", "stats", "--pid", str(os.getpid()), "--watch", "0.05", "--json"],
        env=pollserve_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith("{") and proc.stdout.readline().startswith("{")
        proc.stdout.close()
        assert proc.wait(timeout=15) == 0
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not POSIX, reason="a closed pipe is SIGPIPE/EPIPE on POSIX")
def test_any_command_into_a_closed_pipe_ends_without_a_traceback() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pollserve", "backends"],
        env=pollserve_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # before it prints: it is still importing
    _, errors = proc.communicate(timeout=30)
    assert proc.returncode == 1 and errors == "", errors


#: makes the import of pollserve.server last long enough for a Ctrl-C to land in it; then the
#: command starts as `python -m pollserve` does, or as the installed script (run as it is)
SLOW_IMPORT = """
import sys, time

class SlowServerImport:
    def find_spec(self, name, path=None, target=None):
        if name == "pollserve.server":
            sys.stderr.write("importing\\n")
            sys.stderr.flush()
            time.sleep(30)
        return None

sys.meta_path.insert(0, SlowServerImport())
"""


def console_script() -> str:
    script = shutil.which("pollserve", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the pollserve script is not installed next to this interpreter")
    return script


@pytest.mark.skipif(not POSIX, reason="SIGINT to a child process is POSIX")
@pytest.mark.parametrize("entry", ["python -m pollserve", "the pollserve script"])
def test_ctrl_c_while_importing_exits_130_without_a_traceback(entry: str) -> None:
    if entry == "python -m pollserve":
        start = (
            "import runpy; sys.argv = ['pollserve', '--port', '0']; "
            "runpy.run_module('pollserve', run_name='__main__', alter_sys=True)"
        )
    else:
        script = console_script()
        start = f"sys.argv = [{script!r}, '--port', '0']; exec(open({script!r}).read(), {{'__name__': '__main__'}})"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_IMPORT + start],
        env=pollserve_env(),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_at_a_terminal,
    )
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline() == "importing\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 130
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


APP_MODULE = """
from pollserve import Protocol


class Factory(Protocol):
    def data_received(self, data):
        self.transport.write(b"mine:" + data)
"""


@pytest.mark.skipif(not POSIX, reason="started through sh")
@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["single", "workers"])
def test_app_imports_from_the_current_directory(start_server, tmp_path: Path, workers: list[str]) -> None:
    """As gunicorn and uvicorn do, from the installed script too; a local pollserve.py does not
    stand in for pollserve itself, in the workers either (they start a fresh interpreter)."""
    (tmp_path / "mymodule.py").write_text(APP_MODULE)
    (tmp_path / "pollserve.py").write_text("raise SystemExit('the local pollserve.py was imported')\n")
    in_folder = ["sh", "-c", 'cd "$0" && exec "$@"', str(tmp_path), console_script()]
    server = start_server("--app", "mymodule:Factory", *workers, launcher=in_folder)
    with connect(server.address) as sock:
        sock.sendall(b"hi")
        assert recv_exactly(sock, 7) == b"mine:hi"
    assert "local pollserve.py" not in server.log
