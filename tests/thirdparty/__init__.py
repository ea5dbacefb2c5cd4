"""uvicorn's, anyio's and aiohttp's own test suites, on asyncio's loop and on pollserve's, compared.

Each suite runs from its pinned release's source distribution (which carries its tests) in a venv of
its own with its pinned test requirements (``requirements/``), both fetched from the package index
with pip and cached under ``.thirdparty/`` at the repository's root.  Its pytest runs once on
asyncio's own loop and once per pollserve loop factory asked for, with a plugin of ours
(``inject/pollserve_thirdparty.py``) that puts pollserve's loop where the suite gets its loop and
notes, per test, the type of every loop that ran during it: a test that never reached pollserve's
loop is "other-loop" and not counted for it.  Outcomes are compared test for test with asyncio's; a
difference is run twice more on both loops and counts when it reproduces, and the remaining ones are
listed in ``expected.txt`` with their reason (see expectations.py).  From the repository's root::

    python -m tests.thirdparty                                    # every suite, on epoll
    python -m tests.thirdparty --suite uvicorn --loop pollserve.loops:poll -j 2
    python -m tests.thirdparty --suite anyio --python 3.13 --loop pollserve.loops:select
    python -m tests.thirdparty --suite uvicorn --tests tests/protocols -v

It prints, per suite, Python and loop, passed/failed/skipped/other-loop with the wall time, then the
differences, and exits with status 1 when one is not in the expectations (or an entry no longer
holds), 2 when a suite could not run.  ``tests/test_thirdparty.py`` runs a set of them under
``pytest -m thirdparty``.
"""
