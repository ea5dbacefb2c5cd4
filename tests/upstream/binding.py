"""The CPython asyncio test groups, bound to a loop factory as CPython binds its own loops.

Runs in the worker, on the Python under test, with the standard library only.  A mixin group gets
a concrete class whose loop hook (``create_event_loop`` or ``new_loop``) returns the factory's loop,
on the base CPython's own selector classes use; an ``IsolatedAsyncioTestCase`` file gets its
``loop_factory`` on 3.13+.  ``asyncio.new_event_loop`` is patched in every test process, for the
suites that call it (StreamTests, IsolatedAsyncioTestCase before 3.13, a second loop in a test),
and so is the policy's.

Every loop that becomes a running loop, and every test's ``self.loop``, is noted with whether the
factory made it, so a test that ran on another loop is never counted as a pass.
"""

from __future__ import annotations

import asyncio
import asyncio.events
import importlib
import sys
import unittest
import weakref
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    #: "test_server.BaseStartServer" for a mixin, the file's name for an IsolatedAsyncioTestCase file
    name: str
    module: str
    #: the mixin class, or "" for an IsolatedAsyncioTestCase file (every such class in it)
    mixin: str = ""
    #: the mixin's loop hook, or "" when the class gets its loop from asyncio.new_event_loop
    hook: str = ""
    #: "test_utils" for test.test_asyncio.utils.TestCase, "unittest" for unittest.TestCase
    base: str = "unittest"
    since: tuple[int, int] = (3, 10)


GROUPS = [
    Group("test_sock_lowlevel.BaseSockTestsMixin", "test_sock_lowlevel", "BaseSockTestsMixin", "create_event_loop",
          "test_utils"),
    Group("test_server.BaseStartServer", "test_server", "BaseStartServer", "new_loop"),
    Group("test_buffered_proto.BaseTestBufferedProtocol", "test_buffered_proto", "BaseTestBufferedProtocol",
          "new_loop"),
    Group("test_sendfile.SendfileTestsBase", "test_sendfile", "SendfileTestsBase", "create_event_loop",
          "test_utils"),
    # A concrete class: its setUp calls asyncio.new_event_loop(), patched.
    Group("test_streams.StreamTests", "test_streams", "StreamTests"),
    # CPython binds it with UnixEventLoopTestsMixin, whose setUp only attaches a child watcher for
    # SubprocessTestsMixin, which is not part of this group.
    Group("test_events.EventLoopTestsMixin", "test_events", "EventLoopTestsMixin", "create_event_loop", "test_utils"),
    # CPython binds it beside UnixEventLoopTestsMixin, whose child watcher the loop under test does
    # not need: pollserve's loop notices its children itself, and asyncio's default watcher serves
    # the reference loop.
    Group("test_events.SubprocessTestsMixin", "test_events", "SubprocessTestsMixin", "create_event_loop",
          "test_utils"),
    # CPython binds it with a child watcher's class (SubprocessWatcherMixin) whose setUp makes the loop
    # from the policy: here the loop is the factory's, made as that setUp makes it, and no watcher is
    # attached: pollserve's loop notices its children itself, and asyncio's loop makes its default one.
    Group("test_subprocess.SubprocessMixin", "test_subprocess", "SubprocessMixin", "create_event_loop",
          "test_utils"),
    # A concrete class: its setUp calls asyncio.new_event_loop(), patched.
    Group("test_ssl.TestSSL", "test_ssl", "TestSSL", since=(3, 11)),
    Group("test_timeouts", "test_timeouts", since=(3, 11)),
    Group("test_taskgroups", "test_taskgroups", since=(3, 11)),
    Group("test_waitfor", "test_waitfor"),
    Group("test_locks", "test_locks"),
    # On 3.10 its tests run on test_utils.TestLoop, not on a real loop.
    Group("test_queues", "test_queues", since=(3, 11)),
    Group("test_staggered", "test_staggered", since=(3, 13)),
]  # fmt: skip


@dataclass(frozen=True)
class BoundTest:
    #: "<group's module>.<class in CPython's file>.<method>", the same on every Python and loop
    id: str
    group: str
    cls: type[unittest.TestCase]
    method: str


# What the tests of this process ran on: loop type name -> whether the factory made that loop.
_made: weakref.WeakSet = weakref.WeakSet()
_kept: list = []  # loops that take no weak reference
seen: dict[str, bool] = {}


def type_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def note(loop: object) -> None:
    try:
        made = loop in _made
    except TypeError:
        made = any(loop is kept for kept in _kept)
    name = type_name(loop)
    seen[name] = seen.get(name, True) and made


def wrap_factory(factory: Callable[[], asyncio.AbstractEventLoop]) -> Callable[[], asyncio.AbstractEventLoop]:
    """The factory, remembering every loop it makes."""

    def make_loop() -> asyncio.AbstractEventLoop:
        loop = factory()
        try:
            _made.add(loop)
        except TypeError:
            _kept.append(loop)
        return loop

    return make_loop


def watch_running_loops() -> None:
    """Note every loop that becomes the running one.  Call it before the factory's module is
    imported, so that a loop which imported ``_set_running_loop`` by name calls this one too."""
    original = asyncio.events._set_running_loop

    def set_running_loop(loop: asyncio.AbstractEventLoop | None) -> None:
        if loop is not None:
            note(loop)
        original(loop)

    asyncio.events._set_running_loop = set_running_loop
    asyncio._set_running_loop = set_running_loop  # type: ignore[attr-defined]


def patch_new_event_loop(make_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """Make every loop asyncio creates for a test the factory's: ``asyncio.new_event_loop()``, and
    the policy's, which ``asyncio.get_event_loop()`` creates where no loop is set (a test calls it
    in an IsolatedAsyncioTestCase, whose runner sets no current loop when given a loop_factory)."""
    asyncio.new_event_loop = make_loop
    asyncio.events.new_event_loop = make_loop
    asyncio.events.BaseDefaultEventLoopPolicy.new_event_loop = lambda self: make_loop()  # type: ignore[method-assign]


def _noting_setup(cls: type[unittest.TestCase]) -> Callable[[unittest.TestCase], None]:
    def setUp(self: unittest.TestCase) -> None:
        super(cls, self).setUp()  # type: ignore[misc]
        if getattr(self, "loop", None) is None:
            # A mixin CPython binds beside one whose setUp makes the loop (SubprocessTestsMixin
            # beside EventLoopTestsMixin): make it as that setUp does.
            self.loop = self.create_event_loop()  # type: ignore[attr-defined]
            self.set_event_loop(self.loop)  # type: ignore[attr-defined]
        note(self.loop)  # type: ignore[attr-defined]

    return setUp


def bind_mixin(group: Group, module: object, make_loop: Callable[[], asyncio.AbstractEventLoop]) -> list[type]:
    mixin = getattr(module, group.mixin)
    if group.base == "test_utils":
        from test.test_asyncio import utils

        bases: tuple[type, ...] = (mixin, utils.TestCase)
    elif issubclass(mixin, unittest.TestCase):
        bases = (mixin,)
    else:
        bases = (mixin, unittest.TestCase)
    attrs: dict[str, object] = {"__module__": module.__name__}  # type: ignore[attr-defined]
    if group.hook:
        attrs[group.hook] = lambda self: make_loop()
    cls = type(group.mixin, bases, attrs)
    cls.setUp = _noting_setup(cls)  # type: ignore[method-assign]
    return [cls]


def bind_isolated(module: object, make_loop: Callable[[], asyncio.AbstractEventLoop]) -> list[type]:
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, unittest.IsolatedAsyncioTestCase)
        and value.__module__ == module.__name__  # type: ignore[attr-defined]
    ]
    if sys.version_info < (3, 13):
        return found  # asyncio.new_event_loop is patched
    return [
        type(cls.__name__, (cls,), {"__module__": cls.__module__, "loop_factory": staticmethod(make_loop)})
        for cls in found
    ]


def collect(make_loop: Callable[[], asyncio.AbstractEventLoop]) -> list[BoundTest]:
    """Every test of every group this Python has, bound to ``make_loop``."""
    loader = unittest.TestLoader()
    tests = []
    for group in GROUPS:
        if sys.version_info[:2] < group.since:
            continue
        module = importlib.import_module(f"test.test_asyncio.{group.module}")
        classes = bind_mixin(group, module, make_loop) if group.mixin else bind_isolated(module, make_loop)
        for cls in classes:
            for method in loader.getTestCaseNames(cls):
                tests.append(BoundTest(f"{group.module}.{cls.__name__}.{method}", group.name, cls, method))
    return tests
