"""A venv per suite and Python, and the release's source with its tests, cached under ``.thirdparty/``.

The venv gets the pinned requirements file of the suite (the release itself and its test
requirements) and pollserve's own runtime requirements, from the package index with pip; pollserve
itself is not installed there but put on PYTHONPATH (``pollserve_path``), so that each run tests the
build given to it.  The release's source distribution, which carries its tests, comes from the index
too (``pip download --no-binary :all:``) and is unpacked beside the venvs.  Both are made once and
found again by a key over what went into them.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .suites import REQUIREMENTS, Suite

REPO = Path(__file__).resolve().parent.parent.parent
CACHE = REPO / ".thirdparty"
#: psutil and mypy_extensions, which pollserve imports, pinned as the suites' are
POLLSERVE_REQUIREMENTS = REQUIREMENTS / "pollserve.txt"
#: what pip says when it cannot reach the package index at all
UNREACHABLE = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution"
    r"|Name or service not known|Network is unreachable|ConnectTimeoutError|Max retries exceeded|ProxyError"
)


class HarnessError(Exception):
    """The harness could not run a suite (not a test's outcome)."""


class IndexUnreachable(HarnessError):
    """pip could not reach the package index."""


@dataclass(frozen=True)
class Prepared:
    suite: Suite
    #: the venv's interpreter
    python: Path
    #: the unpacked release: the suite's pytest runs here
    source: Path
    #: the Python version, "3.11.7"
    version: str


def python_version(python: str) -> str:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise HarnessError(f"cannot run {python}: {exc}") from exc
    return out.stdout.strip()


def pip(python: Path, *args: str, log: Path) -> None:
    """Run pip in the venv, its output to ``log``; an index out of reach is IndexUnreachable."""
    with log.open("a") as out:
        out.write(f"$ {python} -m pip {' '.join(args)}\n")
        out.flush()
        done = subprocess.run([str(python), "-m", "pip", *args], stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        text = log.read_text(errors="replace")
        if UNREACHABLE.search(text):
            raise IndexUnreachable(f"pip could not reach the package index (see {log})")
        raise HarnessError(f"pip {args[0]} failed with status {done.returncode} (see {log})")


def key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:10]


def prepare(suite: Suite, base_python: str) -> Prepared:
    """The suite's venv on ``base_python`` and its unpacked release, made if they are not there yet."""
    version = python_version(base_python)
    short = ".".join(version.split(".")[:2])
    requirements = suite.requirements.read_text() + POLLSERVE_REQUIREMENTS.read_text()
    venv = CACHE / f"venv-{suite.name}-{short}-{key(requirements, version, base_python)}"
    CACHE.mkdir(exist_ok=True)
    log = CACHE / f"install-{suite.name}-{short}.log"
    if not (venv / ".ready").exists():
        shutil.rmtree(venv, ignore_errors=True)
        log.write_text("")
        subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
        python = venv / "bin" / "python"
        pip(python, "install", "-q", "-r", str(suite.requirements), "-r", str(POLLSERVE_REQUIREMENTS), log=log)
        (venv / ".ready").write_text(requirements)
    python = venv / "bin" / "python"
    return Prepared(suite, python, unpack(suite, python, log), version)


def unpack(suite: Suite, python: Path, log: Path) -> Path:
    """The release's source distribution, from the index, unpacked once."""
    source = CACHE / "src" / f"{suite.name}-{suite.version}"
    if (source / ".ready").exists():
        return source
    downloads = CACHE / "sdist"
    downloads.mkdir(parents=True, exist_ok=True)
    spec = f"{suite.name}=={suite.version}"
    pip(python, "download", "-q", "--no-binary", ":all:", "--no-deps", "-d", str(downloads), spec, log=log)
    archives = [
        path
        for path in downloads.glob("*.tar.gz")
        if re.fullmatch(rf"{re.escape(suite.name)}-{re.escape(suite.version)}\.tar\.gz", path.name, re.IGNORECASE)
    ]
    if not archives:
        raise HarnessError(f"pip downloaded no source distribution of {spec} into {downloads}")
    shutil.rmtree(source, ignore_errors=True)
    with tarfile.open(archives[0]) as archive:
        top = {member.name.split("/")[0] for member in archive.getmembers()}
        if len(top) != 1:
            raise HarnessError(f"{archives[0]} does not unpack into one folder")
        staging = CACHE / "src" / f".{suite.name}-unpacking"
        shutil.rmtree(staging, ignore_errors=True)
        if sys.version_info >= (3, 12) or hasattr(tarfile, "data_filter"):
            archive.extractall(staging, filter="data")
        else:  # pragma: no cover - 3.10 before 3.10.12 has no extraction filters
            archive.extractall(staging)  # an archive pip fetched and checked by its hash
    (staging / top.pop()).rename(source)
    shutil.rmtree(staging, ignore_errors=True)
    if suite.package and (source / suite.package).is_dir():
        (source / suite.package).rename(source / f"_{suite.package}_source_not_tested")
    (source / ".ready").write_text(archives[0].name)
    return source


def pollserve_path(root: Path) -> Path:
    """A folder holding only pollserve from ``root`` (the source tree, or a site-packages with a
    compiled install) and the mypyc runtime beside it: put on the suites' PYTHONPATH, it brings in
    that build and nothing else from ``root`` (the tree's own ``tests`` would meet the suite's)."""
    root = root.resolve()
    shim = CACHE / "pollserve" / key(str(root))
    shim.mkdir(parents=True, exist_ok=True)
    wanted = {"pollserve": root / "pollserve"}
    wanted.update((path.name, path) for path in root.glob("*__mypyc*"))
    for link in shim.iterdir():
        if link.name not in wanted or link.resolve() != wanted[link.name].resolve():
            link.unlink()
    for name, target in wanted.items():
        if not (shim / name).is_symlink():
            (shim / name).symlink_to(target)
    return shim
