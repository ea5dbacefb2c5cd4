"""EMULATION of the Windows constraints pollserve must live with, on Linux.

Where pollserve runs on Windows there is no ``fcntl`` and no ``resource``,
the select module has only ``select()`` (no poll, epoll, devpoll, kqueue, nor
their constants), ``select()`` accepts sockets only and fails on three empty
sets (WSAEINVAL), ``signal.set_wakeup_fd`` takes a socket only, and there is
no SIGUSR1.  This puts those constraints into a Linux interpreter, so the
server can be run end to end under them.  It is not Windows: sys.platform is
unchanged, so Windows-only code paths (SO_EXCLUSIVEADDRUSE, the 512-socket
count limit) are not exercised by it.
"""

from __future__ import annotations

import itertools
import os
import select
import signal
import stat
import sys

NAME = "windows"

WSAEINVAL = 10022
WSAENOTSOCK = 10038


def _is_socket(fd) -> bool:
    fd = fd if isinstance(fd, int) else fd.fileno()
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def install() -> None:
    # psutil's Linux implementation imports `resource` itself (on Windows psutil
    # has its own): load it first, so only pollserve's imports meet the gap.
    import psutil  # noqa: F401

    for module in ("fcntl", "resource", "termios"):
        sys.modules[module] = None  # type: ignore[assignment]  # `import fcntl` now raises ImportError
    for name in list(vars(select)):
        if name in ("poll", "epoll", "devpoll", "kqueue", "kevent") or name.startswith(("POLL", "EPOLL", "KQ_")):
            delattr(select, name)

    real_select = select.select

    def select_sockets_only(rlist, wlist, xlist, timeout=None):
        if not (rlist or wlist or xlist):
            raise OSError(WSAEINVAL, "An invalid argument was supplied (three empty sets)")
        for fd in itertools.chain(rlist, wlist, xlist):
            if not _is_socket(fd):
                raise OSError(WSAENOTSOCK, f"An operation was attempted on something that is not a socket: {fd}")
        return real_select(rlist, wlist, xlist, timeout)

    select.select = select_sockets_only

    real_set_wakeup_fd = signal.set_wakeup_fd

    def set_wakeup_fd_socket_only(fd, *, warn_on_full_buffer=True):
        if fd != -1 and not _is_socket(fd):
            raise ValueError(f"the fd {fd} must be a socket (Windows)")
        return real_set_wakeup_fd(fd, warn_on_full_buffer=warn_on_full_buffer)

    signal.set_wakeup_fd = set_wakeup_fd_socket_only
    for name in ("SIGUSR1", "SIGUSR2", "SIGHUP"):
        if hasattr(signal, name):
            delattr(signal, name)
