"""Subprocesses on pollserve's loop: ``subprocess_exec``, ``subprocess_shell`` and so
``asyncio.create_subprocess_exec``/``create_subprocess_shell``.

The transport is asyncio's own ``BaseSubprocessTransport`` (its pipes connect through the loop's
``connect_read_pipe``/``connect_write_pipe``, ``pipes.py``), started with ``subprocess.Popen``.

A child's exit is noticed by the loop itself, with no policy child watcher:

- ``pidfd`` (Linux 5.3 and later): ``os.pidfd_open(pid)`` is watched for readability on the core's
  fast path, then ``os.waitpid(pid, WNOHANG)`` reaps exactly that child.
- ``thread`` (everywhere else: macOS, the BSDs, a kernel or sandbox without ``pidfd_open``): one
  thread per child blocks in ``os.waitpid(pid, 0)`` and hands the status to the loop with
  ``call_soon_threadsafe``; no SIGCHLD handler, and no ``waitpid(-1)`` that could reap another's child.

``loop.child_wait`` (or the ``POLLSERVE_ASYNCIO_CHILD_WAIT`` environment variable) picks one:
``"auto"`` (the default: pidfd where the kernel has it), ``"pidfd"`` or ``"thread"``.  The exit
status is asyncio's: the exit code, or the negative number of the signal that ended the child.

A loop closed with children still running kills none of them: their pidfds are closed with the
loop, and a transport never closed warns (``ResourceWarning``) when it is collected, as asyncio's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import threading
from asyncio import base_subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..backends import CapacityError
from ..loop import EventLoop
from .unsupported import refuse_on_windows

logger = logging.getLogger("asyncio")

CHILD_WAIT_ENV = "POLLSERVE_ASYNCIO_CHILD_WAIT"
CHILD_WAITS = ("auto", "pidfd", "thread")

_pidfd_works: bool | None = None


def pidfd_works() -> bool:
    """Whether ``os.pidfd_open`` works here (Python 3.9+ on Linux 5.3+, not refused by a sandbox)."""
    global _pidfd_works
    if _pidfd_works is None:
        try:
            os.close(os.pidfd_open(os.getpid()))  # type: ignore[attr-defined,unused-ignore]
        except (AttributeError, OSError):
            _pidfd_works = False
        else:
            _pidfd_works = True
    return _pidfd_works


class SubprocessTransport(base_subprocess.BaseSubprocessTransport):
    """asyncio's subprocess transport, started with ``subprocess.Popen``."""

    def _start(self, args: Any, shell: bool, stdin: Any, stdout: Any, stderr: Any, bufsize: int, **kwargs: Any) -> None:
        self._proc = subprocess.Popen(
            args, shell=shell, stdin=stdin, stdout=stdout, stderr=stderr, universal_newlines=False, bufsize=bufsize,
            **kwargs,
        )  # fmt: skip


@dataclass
class _Child:
    transport: SubprocessTransport
    #: the child's pidfd, or -1 when a thread waits for it
    pidfd: int = -1


def _wait_in_thread(loop: Any, pid: int) -> None:
    """The thread method: block until the child ends, then tell the loop (None: reaped elsewhere)."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        code = None
    else:
        code = os.waitstatus_to_exitcode(status)
    # The loop may have closed meanwhile: no one is left to tell, and the child is reaped.
    with contextlib.suppress(RuntimeError, OSError):
        loop.call_soon_threadsafe(loop._child_exited, pid, code)


def _format_pipe(fd: Any) -> str:
    if fd == subprocess.PIPE:
        return "<pipe>"
    if fd == subprocess.STDOUT:
        return "<stdout>"
    return repr(fd)


class SubprocessCalls:
    """The loop's subprocess methods and its children's exits (a mixin of ``AsyncioLoop``)."""

    #: how children's exits are noticed: "auto", "pidfd" or "thread" (None: the environment's)
    child_wait: str | None = None
    #: pid -> the child still running
    _children: dict[int, _Child] | None = None

    async def subprocess_shell(
        self: Any,
        protocol_factory: Callable[[], asyncio.SubprocessProtocol],
        cmd: str | bytes,
        *,
        stdin: Any = subprocess.PIPE,
        stdout: Any = subprocess.PIPE,
        stderr: Any = subprocess.PIPE,
        universal_newlines: bool = False,
        shell: bool = True,
        bufsize: int = 0,
        encoding: str | None = None,
        errors: str | None = None,
        text: bool | None = None,
        **kwargs: Any,
    ) -> tuple[asyncio.SubprocessTransport, asyncio.SubprocessProtocol]:
        if not isinstance(cmd, (bytes, str)):
            raise ValueError("cmd must be a string")
        _check_popen_arguments(universal_newlines, shell, True, bufsize, text, encoding, errors)
        what = f"run shell command {cmd!r}"
        return await self._spawn(protocol_factory, cmd, True, what, stdin, stdout, stderr, kwargs)

    async def subprocess_exec(
        self: Any,
        protocol_factory: Callable[[], asyncio.SubprocessProtocol],
        program: Any,
        *args: Any,
        stdin: Any = subprocess.PIPE,
        stdout: Any = subprocess.PIPE,
        stderr: Any = subprocess.PIPE,
        universal_newlines: bool = False,
        shell: bool = False,
        bufsize: int = 0,
        encoding: str | None = None,
        errors: str | None = None,
        text: bool | None = None,
        **kwargs: Any,
    ) -> tuple[asyncio.SubprocessTransport, asyncio.SubprocessProtocol]:
        _check_popen_arguments(universal_newlines, shell, False, bufsize, text, encoding, errors)
        what = f"execute program {program!r}"  # not its arguments: they may hold secrets
        return await self._spawn(protocol_factory, (program, *args), False, what, stdin, stdout, stderr, kwargs)

    async def _spawn(
        self: Any,
        protocol_factory: Callable[[], asyncio.SubprocessProtocol],
        args: Any,
        shell: bool,
        what: str,
        stdin: Any,
        stdout: Any,
        stderr: Any,
        kwargs: dict[str, Any],
    ) -> tuple[asyncio.SubprocessTransport, asyncio.SubprocessProtocol]:
        protocol = protocol_factory()
        if self._debug:
            _log_subprocess(what, stdin, stdout, stderr)
        transport = await self._make_subprocess_transport(protocol, args, shell, stdin, stdout, stderr, 0, **kwargs)
        if self._debug:
            logger.info("%s: %r", what, transport)
        return transport, protocol

    async def _make_subprocess_transport(
        self: Any,
        protocol: asyncio.SubprocessProtocol,
        args: Any,
        shell: bool,
        stdin: Any,
        stdout: Any,
        stderr: Any,
        bufsize: int,
        extra: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> SubprocessTransport:
        self._check_closed()
        method = self._child_wait_method()
        waiter = self.create_future()
        transport = SubprocessTransport(
            self, protocol, args, shell, stdin, stdout, stderr, bufsize, waiter=waiter, extra=extra, **kwargs
        )
        self._watch_child(transport, method)
        try:
            await waiter
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            transport.close()
            await transport._wait()
            raise
        return transport

    # -- children's exits ------------------------------------------------------------------------------

    def _child_wait_method(self) -> str:
        """The method the next child gets: the loop's, the environment's, or pidfd where it works."""
        method = self.child_wait or os.environ.get(CHILD_WAIT_ENV) or "auto"
        if method not in CHILD_WAITS:
            raise ValueError(f"child_wait must be one of {', '.join(CHILD_WAITS)}, not {method!r}")
        if method == "auto":
            return "pidfd" if pidfd_works() else "thread"
        if method == "pidfd" and not pidfd_works():
            raise RuntimeError("child_wait='pidfd' but os.pidfd_open() is not available here (Linux 5.3+ has it)")
        return method

    def _watch_child(self: Any, transport: SubprocessTransport, method: str) -> None:
        pid = transport.get_pid()
        assert pid is not None  # set once Popen has started the child
        child = _Child(transport)
        if self._children is None:
            self._children = {}
        self._children[pid] = child
        if method == "pidfd":
            try:
                child.pidfd = os.pidfd_open(pid)  # a zombie's works too: a child already gone is seen
                EventLoop.add_reader(self, child.pidfd, lambda: self._pidfd_ready(pid))
            except (OSError, CapacityError):  # out of fds, or (select) one it cannot watch
                self._close_pidfd(child)
            else:
                transport._child_wait = "pidfd"
                return
        transport._child_wait = "thread"
        threading.Thread(target=_wait_in_thread, args=(self, pid), name=f"pollserve waitpid {pid}", daemon=True).start()

    def _close_pidfd(self, child: _Child) -> None:
        if child.pidfd >= 0:
            EventLoop.remove_reader(self, child.pidfd)  # type: ignore[arg-type]
            os.close(child.pidfd)
            child.pidfd = -1

    def _pidfd_ready(self, pid: int) -> None:
        """A child's pidfd is readable: it has ended; reap it."""
        child = self._children.get(pid) if self._children else None
        if child is None:
            return
        proc = child.transport._proc
        code: int | None = None  # None: the status is its Popen's
        if proc is None or proc.returncode is None:
            # (Once its Popen's poll() has reaped it, as the transport's close() asks, the pid may
            # be another child's: it is not waited for then.)
            try:
                reaped, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass  # reaped by its Popen meanwhile
            else:
                if reaped == 0:
                    return
                code = os.waitstatus_to_exitcode(status)
        self._close_pidfd(child)
        self.call_soon(self._child_exited, pid, code)

    def _child_exited(self, pid: int, code: int | None) -> None:
        child = self._children.pop(pid, None) if self._children else None
        if child is None:
            return
        self._close_pidfd(child)
        transport = child.transport
        if code is None:
            code = transport._proc.returncode if transport._proc is not None else None
        if code is None:
            logger.warning("child process pid %d exit status already read: will report returncode 255", pid)
            code = 255
        if transport._returncode is None:
            transport._process_exited(code)

    def _forget_children(self) -> None:
        """The loop closes: close the pidfds; the children themselves are left running."""
        children, self._children = self._children, None
        for child in (children or {}).values():
            if child.pidfd >= 0:
                os.close(child.pidfd)


def _check_popen_arguments(
    universal_newlines: bool,
    shell: bool,
    shell_wanted: bool,
    bufsize: int,
    text: bool | None,
    encoding: str | None,
    errors: str | None,
) -> None:
    """asyncio's checks, in its order: bytes only, unbuffered, and the call's own shell."""
    refuse_on_windows("subprocesses")
    if universal_newlines:
        raise ValueError("universal_newlines must be False")
    if shell != shell_wanted:
        raise ValueError(f"shell must be {shell_wanted}")
    if bufsize != 0:
        raise ValueError("bufsize must be 0")
    if text:
        raise ValueError("text must be False")
    if encoding is not None:
        raise ValueError("encoding must be None")
    if errors is not None:
        raise ValueError("errors must be None")


def _log_subprocess(message: str, stdin: Any, stdout: Any, stderr: Any) -> None:
    info = [message]
    if stdin is not None:
        info.append(f"stdin={_format_pipe(stdin)}")
    if stdout is not None and stderr == subprocess.STDOUT:
        info.append(f"stdout=stderr={_format_pipe(stdout)}")
    else:
        if stdout is not None:
            info.append(f"stdout={_format_pipe(stdout)}")
        if stderr is not None:
            info.append(f"stderr={_format_pipe(stderr)}")
    logger.debug(" ".join(info))
