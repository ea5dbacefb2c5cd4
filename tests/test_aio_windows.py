"""What pollserve's asyncio loop refuses on Windows, and that each refusal says why.

Windows is not this machine: the branch is taken with ``sys.platform`` said to be ``"win32"`` for
the one call, on a real loop over real sockets; the ``windows`` CI runner takes it for real.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import pytest

from pollserve.aio import AsyncioLoop


class Child(asyncio.SubprocessProtocol):
    pass


async def unix_server(loop):
    return await loop.create_unix_server(asyncio.Protocol, "/nonexistent/never-made")


async def unix_connection(loop):
    return await loop.create_unix_connection(asyncio.Protocol, "/nonexistent/never-made")


async def signal_handler(loop):
    loop.add_signal_handler(signal.SIGINT, print)


async def remove_signal_handler(loop):
    loop.remove_signal_handler(signal.SIGINT)


CALLS = {
    "subprocess_exec": (lambda loop: loop.subprocess_exec(Child, "/bin/true"), "subprocesses"),
    "subprocess_shell": (lambda loop: loop.subprocess_shell(Child, "true"), "subprocesses"),
    "connect_read_pipe": (lambda loop: loop.connect_read_pipe(asyncio.Protocol, sys.stdin), "pipes"),
    "connect_write_pipe": (lambda loop: loop.connect_write_pipe(asyncio.Protocol, sys.stdout), "pipes"),
    "create_unix_server": (unix_server, "UNIX sockets"),
    "create_unix_connection": (unix_connection, "UNIX sockets"),
    "add_signal_handler": (signal_handler, "signal handlers"),
    "remove_signal_handler": (remove_signal_handler, "signal handlers"),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_on_windows_each_missing_feature_is_refused_saying_why(name: str, monkeypatch) -> None:
    call, feature = CALLS[name]
    loop = AsyncioLoop("select")
    try:
        monkeypatch.setattr(sys, "platform", "win32")
        with pytest.raises(
            NotImplementedError, match=f"{feature} are not available on pollserve's asyncio loop on Windows: .+"
        ):
            loop.run_until_complete(call(loop))
        monkeypatch.undo()
        assert loop.run_until_complete(asyncio.sleep(0, "alive")) == "alive"
    finally:
        monkeypatch.undo()
        loop.close()
