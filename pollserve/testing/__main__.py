"""``python -m pollserve.testing NAME|MODULE:CLASS [PYTEST ARGS...]``: pollserve's backend tests on a backend.

Runs pytest and exits with pytest's status.  A backend that cannot be loaded,
or pytest missing, is one line on stderr and exit 2, before any test runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from pollserve.backends import BackendError, get_backend

USAGE = "usage: python -m pollserve.testing NAME|MODULE:CLASS [PYTEST ARGS...]"
EXIT_USAGE = 2


def fail(message: str) -> int:
    print(f"pollserve.testing: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        if args and args[0] in ("-h", "--help"):
            print(USAGE)
            print("Runs pollserve's backend tests on a backend: a name `pollserve backends` lists, or MODULE:CLASS.")
            return 0
        return fail(f"name the backend to test first ({USAGE})")
    spec, pytest_args = args[0], args[1:]
    try:
        import pytest
    except ImportError:
        return fail("needs pytest, which is not installed: pip install 'pollserve[testing]'")
    try:
        get_backend(spec)  # the plugin's fixture loads it again; here a bad spec is one line, not N failures
    except BackendError as exc:
        return fail(str(exc))
    tests = str(Path(__file__).with_name("chosen.py"))
    options = ["-p", "pollserve.testing.plugin", "--pollserve-backend", spec, "-p", "no:cacheprovider"]
    return int(pytest.main([tests, *options, *pytest_args]))


if __name__ == "__main__":
    sys.exit(main())
