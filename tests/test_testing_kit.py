"""The pollserve.testing kit as a backend author runs it: ``python -m pollserve.testing``, in a subprocess.

The built-ins pass the same kit in this process (test_backends.py).  Here it
must pass a built-in from the command line, fail the backends of
lying_backends.py, each of which has one bug a real backend could have, and
pass the example plugin in examples/instrumented_backend once pip installed it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REQUESTED
from serverproc import pollserve_env, run_pollserve

from pollserve.backends import auto_backend

TESTS_DIR = str(Path(__file__).parent)
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "instrumented_backend"
#: the backend this run is about: the one POLLSERVE_BACKEND asks for, else the best here
BACKEND = auto_backend().name if REQUESTED in (None, "auto") else REQUESTED


def run_kit(*args: str, pythonpath: str = TESTS_DIR, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pollserve.testing", *args],
        env=pollserve_env({"PYTHONPATH": pythonpath}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def failed(result: subprocess.CompletedProcess) -> set[str]:
    """The tests pytest's ``-rf`` summary names as failed, without class or parameters."""
    return {
        line.split()[1].split("::")[-1].split("[")[0]
        for line in result.stdout.splitlines()
        if line.startswith("FAILED ")
    }


def test_a_built_in_passes_the_whole_kit() -> None:
    result = run_kit(BACKEND, "-q", "-rfs")
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "failed" not in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("liar", "caught_by"),
    [
        ("WrongDirection", {"test_both_registered_only_one_ready"}),
        ("DropsAfterModify", {"test_modify_changes_what_is_reported", "test_modify_every_way"}),
        (
            "ReportsUnregistered",
            {
                "test_unregistered_fd_is_not_reported",
                "test_unregistering_one_fd_keeps_the_others",
                "test_a_reused_fd_number_carries_nothing_over",
            },
        ),
        # Off by one at the capacity itself, which the kit checked only 16 fds beyond.
        ("ClaimsOneFdTooMany", {"test_bounded_backends_take_the_last_fd_below_capacity"}),
        ("LetsInTheFdAtCapacity", {"test_bounded_backends_refuse_fds_from_capacity_on"}),
    ],
)
def test_the_kit_fails_a_backend_that_lies(liar: str, caught_by: set[str]) -> None:
    result = run_kit(f"lying_backends:{liar}", "-q", "-rf", "-k", "TestBackend")
    assert result.returncode == 1, result.stdout + result.stderr
    assert caught_by <= failed(result), result.stdout


def test_pytest_arguments_pass_through_and_its_status_is_returned() -> None:
    result = run_kit(BACKEND, "-q", "-k", "TestBackend and test_write_readiness and not drains")
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr
    assert run_kit(BACKEND, "-q", "-k", "no_such_test_xyz").returncode == 5  # pytest: no tests collected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "name the backend to test first"),
        (["no_such_module_xyz:Backend"], "cannot import module 'no_such_module_xyz': ModuleNotFoundError: "),
        (["os:sep"], "os:sep is not a subclass of pollserve.backends.Backend"),
        (["nope"], "unknown backend 'nope'"),
    ],
)
def test_a_backend_that_cannot_be_loaded_is_one_line_exit_2(args: list[str], message: str) -> None:
    result = run_kit(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"pollserve.testing: {message}"), result.stderr
    assert result.stdout == ""


def test_without_pytest_it_says_so_in_one_line() -> None:
    code = (
        "import runpy, sys; sys.modules['pytest'] = None; sys.argv[1:] = ['select']; "
        "runpy.run_module('pollserve.testing', run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=pollserve_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr == "pollserve.testing: needs pytest, which is not installed: pip install 'pollserve[testing]'\n"
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="docs/backends.md claims it on Linux only")
def test_the_backend_in_docs_passes_the_contract(tmp_path: Path) -> None:
    """docs/backends.md shows a whole backend: it must be one."""
    text = (EXAMPLE.parent.parent / "docs" / "backends.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert "class SelectorsBackend(Backend):" in code
    (tmp_path / "selectors_backend.py").write_text(code)
    result = run_kit("selectors_backend:SelectorsBackend", "-q", "-rf", "-k", "TestBackend", pythonpath=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def pip_install(project: Path, target: Path) -> subprocess.CompletedProcess:
    """pip install --target: the package and its entry points, as any user would get them."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            "--target",
            str(target),
            str(project),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_the_example_plugin_installs_lists_and_passes_the_kit(tmp_path: Path) -> None:
    target = tmp_path / "site"
    installed = pip_install(EXAMPLE, target)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    name = f"instrumented-{BACKEND}"

    listing = run_pollserve("backends", env={"PYTHONPATH": str(target)})
    assert listing.returncode == 0 and listing.stderr == "", listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(f"{name} "))
    assert row.split()[1] == "yes" and "pollserve-instrumented 0.1.0" in row, row

    kit = run_kit(name, "-q", "-rfs", pythonpath=str(target))
    assert kit.returncode == 0, kit.stdout + kit.stderr
    assert " passed" in kit.stdout and "failed" not in kit.stdout, kit.stdout

    own = subprocess.run(
        [sys.executable, "-m", "pytest", str(EXAMPLE / "tests"), "-q", "-p", "no:cacheprovider"],
        env=pollserve_env({"PYTHONPATH": str(target)}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert own.returncode == 0, own.stdout + own.stderr
