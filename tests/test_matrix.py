"""The CI workflow and the tox matrix are configuration; these tests keep them honest."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import yaml

from pollserve.backends import BACKENDS

ROOT = Path(__file__).resolve().parent.parent
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


def workflow() -> dict:
    return yaml.safe_load((ROOT / ".github" / "workflows" / "tests.yml").read_text())


def tox_config() -> configparser.ConfigParser:
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "tox.ini")
    return config


def factor_lines(value: str) -> dict[str, str]:
    """`factor: value` lines of a tox setting."""
    return dict(line.split(":", 1) for line in value.strip().splitlines() if ":" in line)


def test_workflow_matrix_covers_three_oses_and_every_python() -> None:
    jobs = workflow()["jobs"]
    matrix = jobs["tests"]["strategy"]["matrix"]
    assert {os_name.split("-")[0] for os_name in matrix["os"]} == {"ubuntu", "macos", "windows"}
    assert matrix["python"] == PYTHONS
    commands = " ".join(step.get("run", "") for step in jobs["tests"]["steps"])
    assert "tox run -f" in commands and "kqueue-emulated" in commands
    assert any("tox run -e lint" in step.get("run", "") for step in jobs["lint"]["steps"])


def test_tox_env_list_is_python_by_backend() -> None:
    env_list = tox_config()["tox"]["env_list"]
    match = re.search(r"py3\{([\d,]+)\}-\{([\w,]+)\}", env_list)
    assert match, env_list
    assert ["3." + minor for minor in match[1].split(",")] == PYTHONS
    assert set(match[2].split(",")) == {"auto", *BACKENDS}
    for extra in ("kqueue-emulated", "devpoll-emulated", "lint"):
        assert extra in env_list
    assert tox_config()["tox"]["skip_missing_interpreters"].strip() == "true"


def test_each_backend_factor_sets_its_backend_and_platforms() -> None:
    testenv = tox_config()["testenv"]
    set_env = {factor.strip(): value.strip() for factor, value in factor_lines(testenv["set_env"]).items()}
    for name in ("auto", *BACKENDS):
        assert set_env[name] == f"POLLSERVE_BACKEND = {name}"
    platforms = {factor.strip(): value.strip() for factor, value in factor_lines(testenv["platform"]).items()}
    assert platforms["epoll"] == "linux"
    assert platforms["devpoll"] == "sunos"
    assert "darwin" in platforms["kqueue"] and "linux" not in platforms["kqueue"]
    assert "win32" not in testenv["platform"]  # auto and select run everywhere, Windows included
    assert "auto" not in platforms and "select" not in platforms


def test_emulated_envs_name_their_emulation() -> None:
    config = tox_config()
    for name in ("kqueue", "devpoll"):
        section = config[f"testenv:{name}-emulated"]
        assert "EMULATION" in section["description"]
        assert f"POLLSERVE_BACKEND = {name}" in section["set_env"]
        assert f"POLLSERVE_TEST_EMULATE = {name}" in section["set_env"]
