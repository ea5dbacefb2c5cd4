"""systemd's side of a service: the sockets it passes (socket activation) and what it is told.

Both are process-level, so the loop and the server know nothing of them: cli.py
takes the passed sockets from the environment once, at start, and service.py
serves on them and calls a Notifier when serving starts and stops.  Neither
needs libsystemd: the protocol is a few environment variables (sd_listen_fds(3))
and one datagram per message (sd_notify(3)).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, MutableMapping
from typing import NamedTuple

from .listeners import adopt

log = logging.getLogger("pollserve")

#: the first passed fd; the others follow it (sd_listen_fds(3))
SD_LISTEN_FDS_START = 3
#: what a socket is called when LISTEN_FDNAMES does not name it (sd_listen_fds_with_names(3))
UNNAMED = "unknown"
#: the name (FileDescriptorName= in the .socket unit) of a socket that serves the stats endpoint
STATS_NAME = "stats"
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
#: more passed fds than any fd limit pollserve plans with: a malformed LISTEN_FDS, not a socket unit
MAX_PASSED_FDS = 65536
#: how long one notification may wait for room in systemd's queue before it is given up
NOTIFY_TIMEOUT = 2.0


class ListenSocket(NamedTuple):
    """A listening socket systemd passed, ready to accept on, and its name."""

    name: str
    sock: socket.socket


class ActivationError(Exception):
    """A passed fd that cannot be served on; the message is meant for the user as it is."""


def parse_listen_environment(environ: Mapping[str, str], pid: int) -> tuple[list[tuple[int, str]], str | None]:
    """The (fd, name) pairs systemd passed to process ``pid``, and a warning if a value is malformed.

    Nothing is passed unless LISTEN_PID is ``pid``: the variables may have been
    inherited from a parent they were meant for.  A malformed value means nothing
    is passed, with a warning; so do malformed names, which are then ignored.
    """
    listen_pid = environ.get("LISTEN_PID")
    if listen_pid is None:
        return [], None
    try:
        target = int(listen_pid)
    except ValueError:
        return [], f"LISTEN_PID={listen_pid!r} is not a process id; ignoring socket activation"
    if target != pid:
        return [], None
    count_text = environ.get("LISTEN_FDS")
    if count_text is None:
        return [], "LISTEN_PID names this process but LISTEN_FDS is not set; ignoring socket activation"
    try:
        count = int(count_text)
    except ValueError:
        count = -1
    if not 0 <= count <= MAX_PASSED_FDS:
        return [], f"LISTEN_FDS={count_text!r} is not a number of fds; ignoring socket activation"
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    warning = None
    names = [UNNAMED] * count
    names_text = environ.get("LISTEN_FDNAMES")
    if names_text is not None and count:
        given = names_text.split(":")
        if len(given) == count:
            names = given
        else:
            warning = (
                f"LISTEN_FDNAMES={names_text!r} names {len(given)} sockets but LISTEN_FDS is {count}; "
                "ignoring the names: every socket serves the app"
            )
    return list(zip(fds, names, strict=True)), warning


def listen_sockets(environ: MutableMapping[str, str] | None = None) -> list[ListenSocket]:
    """The listening sockets systemd passed to this process, as sd_listen_fds_with_names(3) with
    unset_environment=1: the variables are removed whatever they held, so no child of ours takes
    the sockets for its own.  Raises ActivationError for an fd that is not a listening stream socket.
    """
    environ = os.environ if environ is None else environ
    passed, warning = parse_listen_environment(environ, os.getpid())
    for name in LISTEN_VARIABLES:
        environ.pop(name, None)
    if warning:
        log.warning("%s", warning)
    adopted: list[ListenSocket] = []
    for fd, name in passed:
        try:
            # FD_CLOEXEC, as sd_listen_fds(3) sets it: the sockets are not for processes we start.
            os.set_inheritable(fd, False)
            adopted.append(ListenSocket(name, adopt(socket.socket(fileno=fd))))
        except OSError as exc:
            for earlier in adopted:
                earlier.sock.close()
            reason = exc.strerror or str(exc)
            raise ActivationError(f"socket activation: fd {fd} ({name}) cannot be served on: {reason}") from None
    return adopted


def notify_address(value: str) -> str | None:
    """The address $NOTIFY_SOCKET stands for: a path, or an abstract socket written ``@name``
    (sd_notify(3)); None for anything else (systemd 254's ``vsock:`` addresses among them)."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Tells systemd how the service is doing (sd_notify(3)): one datagram per message.

    A failed notification never stops the server; it is logged once.  With
    Type=notify, systemd waits for READY=1 before it counts the service started.
    """

    def __init__(self, address: str) -> None:
        #: a path, or "\\0name" for an abstract socket
        self.address = address
        self._failed = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier | None:
        """The notifier $NOTIFY_SOCKET asks for, or None; the variable is removed, so that a child
        of ours (a worker, an app's subprocess) does not speak for the service."""
        environ = os.environ if environ is None else environ
        value = environ.pop("NOTIFY_SOCKET", None)
        if not value:
            return None
        address = notify_address(value)
        if address is None:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor @name: systemd will not be notified", value)
            return None
        return cls(address)

    def notify(self, *assignments: str) -> bool:
        """Send ``VARIABLE=value`` assignments in one datagram; whether it was sent."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Bounded: a datagram waits while systemd's queue is full, and the loop must go on.
                sock.settimeout(NOTIFY_TIMEOUT)
                sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                shown = "@" + self.address[1:] if self.address.startswith("\0") else self.address
                log.warning("cannot notify systemd at %s: %s; serving anyway", shown, exc.strerror or exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")
