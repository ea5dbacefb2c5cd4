"""A pytest plugin for a third-party suite: pollserve's loop in place of asyncio's, and what ran where.

Loaded into the suite's own pytest (``-p pollserve_thirdparty``, this folder on PYTHONPATH) by
``python -m tests.thirdparty``, in each xdist worker too.  It is told what to do by the environment:

- ``POLLSERVE_THIRDPARTY_LOOP``: ``MODULE:NAME`` of pollserve's loop factory; empty for asyncio's own
  loop (the reference run), where nothing is swapped and the loops are only noted.
- ``POLLSERVE_THIRDPARTY_SUITE``: the suite's name, for the hooks of the suite that offers one.
- ``POLLSERVE_THIRDPARTY_OUT``: a folder; each process appends one JSON line per test to a file there.
- ``POLLSERVE_THIRDPARTY_ONLY``: a file of node ids, one a line: the tests outside it are deselected.
- ``POLLSERVE_THIRDPARTY_DROP``: comma-separated parameter ids (``trio``): a test whose parameters
  have one of them is deselected (anyio's trio half, and its uvloop runs, are not counted).
- ``POLLSERVE_THIRDPARTY_SKIP``: ``MARKER=REASON`` lines: a test with that marker is skipped, saying why.

The swap is where asyncio makes its default loop, as uvloop's ``install()`` does: the default
policy's loop factory, which ``asyncio.new_event_loop()``, ``asyncio.run()``, ``asyncio.Runner`` and
anyio's runner without a ``loop_factory`` all reach.  A suite that names a loop itself gets the
factory where it offers one: uvicorn's ``loop="auto"`` resolves to it (as it resolves to uvloop where
uvloop is installed), and anyio's asyncio backend is given it as its ``loop_factory`` option when
the test gives none.  A loop built from asyncio's classes directly (uvicorn's ``loop="asyncio"``,
aiohttp's ``selector_loop`` fixture) stays asyncio's: the record says so, and the driver does not
count that test for pollserve's loop.

anyio's and aiohttp's suites run blockbuster, which fails a test whose code makes a blocking call
while a loop runs, and allows a few such calls inside asyncio's own loop by file and function: the
stat and unlink of a UNIX server's socket file, ``os.sendfile`` in ``loop.sendfile()``, the read of a
child's exec status in ``subprocess_exec()``.  On pollserve's loop the same calls are allowed in
pollserve's functions that make them (``POLLSERVE_CAN_BLOCK``), through blockbuster's own
``can_block_in()``, as the suites allow their own.

Every loop that becomes a running loop, in any thread, is noted by its type for the test that is
running then: the record's ``loops``.  Standard library and pytest only: it runs in the suite's venv.
"""

from __future__ import annotations

import asyncio
import asyncio.events
import importlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

LOOP = os.environ.get("POLLSERVE_THIRDPARTY_LOOP", "")
SUITE = os.environ.get("POLLSERVE_THIRDPARTY_SUITE", "")
OUT = os.environ.get("POLLSERVE_THIRDPARTY_OUT", "")
ONLY = os.environ.get("POLLSERVE_THIRDPARTY_ONLY", "")
DROP = tuple(name for name in os.environ.get("POLLSERVE_THIRDPARTY_DROP", "").split(",") if name)
SKIP = dict(line.split("=", 1) for line in os.environ.get("POLLSERVE_THIRDPARTY_SKIP", "").splitlines() if line)
#: how much of a failure's text a record carries
DETAIL_CHARS = 4000

#: type names of the loops that became running loops since the current test began
_running: set[str] = set()


def _type_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _watch_running_loops() -> None:
    """Note every loop that becomes the running one (asyncio's loops and pollserve's call
    ``asyncio.events._set_running_loop`` from their ``run_forever``)."""
    original = asyncio.events._set_running_loop

    def set_running_loop(loop: asyncio.AbstractEventLoop | None) -> None:
        if loop is not None:
            _running.add(_type_name(loop))
        original(loop)

    asyncio.events._set_running_loop = set_running_loop
    asyncio._set_running_loop = set_running_loop  # type: ignore[attr-defined]


#: blocking calls blockbuster allows in asyncio's loop, allowed in pollserve's functions that make them
POLLSERVE_CAN_BLOCK = {
    "os.stat": [
        ("pollserve/aio/streams.py", {"create_unix_server"}),
        ("pollserve/aio/server.py", {"_remove_on_close", "_close_listener"}),
    ],
    "os.unlink": [("pollserve/aio/server.py", {"_close_listener"})],
    "os.sendfile": [("pollserve/aio/sendfile.py", {"sendfile"})],
    "os.read": [("pollserve/aio/subprocess.py", {"subprocess_exec", "subprocess_shell"})],
}


def _allow_pollserves_blocking_calls() -> None:
    try:
        from blockbuster import blockbuster
    except ImportError:
        return
    init = blockbuster.BlockBuster.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        for name, places in POLLSERVE_CAN_BLOCK.items():
            function = self.functions.get(name)
            for filename, functions in places if function is not None else ():
                function.can_block_in(filename, functions)

    blockbuster.BlockBuster.__init__ = __init__


def load_factory(spec: str) -> Any:
    module_name, _, name = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), name)
    if not callable(factory):
        raise TypeError(f"POLLSERVE_THIRDPARTY_LOOP={spec!r} is not callable")
    return factory


def _swap_default_loop(factory: Any) -> None:
    """asyncio's default loop becomes the factory's: the policy class's ``_loop_factory`` is what
    its ``new_event_loop()`` calls (staticmethod: a plain function would be bound to the policy)."""
    policy_class = type(asyncio.get_event_loop_policy())
    policy_class._loop_factory = staticmethod(factory)  # type: ignore[attr-defined]


def uvicorn_auto_loop_factory(use_subprocess: bool = False) -> Any:
    """uvicorn's ``loop="auto"`` setup: it returns the loop factory to run the server on."""
    return load_factory(LOOP)


def _swap_uvicorn() -> None:
    from uvicorn import config

    config.LOOP_FACTORIES["auto"] = f"{__name__}:uvicorn_auto_loop_factory"


def _swap_anyio(factory: Any) -> None:
    from anyio._backends import _asyncio

    backend = _asyncio.AsyncIOBackend
    create_test_runner = backend.create_test_runner.__func__  # type: ignore[attr-defined]
    run = backend.run.__func__  # type: ignore[attr-defined]

    def with_factory(options: dict[str, Any]) -> dict[str, Any]:
        if options.get("loop_factory") is None and not options.get("use_uvloop"):
            options = {**options, "loop_factory": factory}
        return options

    backend.create_test_runner = classmethod(  # type: ignore[method-assign]
        lambda cls, options: create_test_runner(cls, with_factory(options))
    )
    backend.run = classmethod(  # type: ignore[method-assign]
        lambda cls, func, args, kwargs, options: run(cls, func, args, kwargs, with_factory(options))
    )


def pytest_configure(config: pytest.Config) -> None:
    _watch_running_loops()
    if not LOOP:
        return
    factory = load_factory(LOOP)
    _swap_default_loop(factory)
    _allow_pollserves_blocking_calls()
    if SUITE == "uvicorn":
        _swap_uvicorn()
    elif SUITE == "anyio":
        _swap_anyio(factory)


def pytest_report_header(config: pytest.Config) -> str:
    where = f"pollserve's loop ({LOOP})" if LOOP else "asyncio's own loop (reference)"
    return f"pollserve_thirdparty: {SUITE or 'a suite'} on {where}"


def _dropped(item: pytest.Item) -> bool:
    """Whether one of the test's parameter ids (``trio``, ``asyncio+uvloop``) is one not counted."""
    callspec = getattr(item, "callspec", None)
    return bool(DROP and callspec is not None and set(callspec.id.split("-")) & set(DROP))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = set(Path(ONLY).read_text().split("\n")) if ONLY else None
    keep, drop = [], []
    for item in items:
        for marker, reason in SKIP.items():
            if item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))
        if _dropped(item) or (wanted is not None and item.nodeid not in wanted):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    if OUT:
        # Each xdist worker collects the whole run: the driver takes the union, and a test that has
        # no record then is one whose process died under it.
        (Path(OUT) / f"collected-{os.getpid()}.txt").write_text("".join(f"{item.nodeid}\n" for item in keep))


class _Record:
    """One test's reports, folded into one outcome."""

    def __init__(self) -> None:
        self.outcome = "passed"
        self.detail = ""
        self.seconds = 0.0

    def add(self, report: pytest.TestReport) -> None:
        self.seconds += report.duration
        if self.outcome == "failed":
            return
        xfail = hasattr(report, "wasxfail")
        if report.failed:
            self.outcome = "failed"
            self.detail = f"{report.when}: {report.longreprtext}"[-DETAIL_CHARS:]
        elif report.skipped and self.outcome == "passed":
            self.outcome = "skipped"
            self.detail = f"xfail: {report.wasxfail}" if xfail else _skip_reason(report)


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr or "")


_records: dict[str, _Record] = {}


def _write(message: dict[str, Any]) -> None:
    if not OUT:
        return
    with open(Path(OUT) / f"records-{os.getpid()}.jsonl", "a") as out:
        out.write(json.dumps(message) + "\n")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    _running.clear()
    record = _records[item.nodeid] = _Record()
    started = time.monotonic()
    try:
        return (yield)
    finally:
        del _records[item.nodeid]
        _write_record(item.nodeid, record, started)


def _write_record(test: str, record: _Record, started: float) -> None:
    _write(
        {
            "test": test,
            "outcome": record.outcome,
            "detail": record.detail,
            "loops": sorted(_running),
            "seconds": round(time.monotonic() - started, 3),
        }
    )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    record = _records.get(report.nodeid)
    if record is not None:
        record.add(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _write(
            {
                "test": report.nodeid,
                "outcome": "failed",
                "detail": f"collect: {report.longreprtext}"[-DETAIL_CHARS:],
                "loops": [],
                "seconds": 0.0,
                "collect": True,
            }
        )
