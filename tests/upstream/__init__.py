"""CPython's own asyncio tests, run against any event loop factory.

The loop-generic groups of the running interpreter's ``test.test_asyncio`` (see binding.py) are
bound to a zero-argument loop factory given as ``MODULE:NAME``, as CPython binds its own loops;
each test runs in a process of its own with a time limit, a test that does not end as expected is
run once more, and the outcomes are compared with ``tests/upstream/expected.txt`` (see
expectations.py for its format).  From the repository's root::

    python -m tests.upstream                                   # the reference: asyncio's loop on epoll
    python -m tests.upstream --loop pollserve.loops:epoll --loop pollserve.loops:select
    python -m tests.upstream --loop pollserve.loops:kqueue --emulate kqueue
    python -m tests.upstream --python .tox/py312-epoll/bin/python --loop pollserve.loops:epoll
    python -m tests.upstream --loop pollserve.loops:poll --only 'test_streams.*' -v

``--python`` takes a path, a command or a version (3.12, found on PATH or in pyenv); that Python
must import the factory's module (the source tree is put first on its PYTHONPATH).  It prints a
table per Python and loop, then every difference from the expectations, and exits with status 1
when there is one.  ``tests/test_upstream_asyncio.py`` runs it for the running Python on every
backend (``pytest -m upstream``).
"""
