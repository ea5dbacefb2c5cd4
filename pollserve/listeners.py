"""Where listening sockets come from: bound here by host and port, or handed over ready-made.

A Server accepts on whatever sockets it is given.  Binding is apart from it because a socket
can come from elsewhere: a supervising parent that bound it once for every worker, or systemd
(socket activation).  Functions here raise OSError; ``filename`` names the address that failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import stat
from typing import Any

#: listen() backlog; the kernel caps it at net.core.somaxconn (Linux) or kern.ipc.somaxconn (BSD)
DEFAULT_BACKLOG = 1024


def format_address(address: Any, *, url: bool = False) -> str:
    """``host:port``, with IPv6 hosts in brackets and their scope, as in URLs; ``unix:PATH``.

    getsockname() gives a link-local address's scope apart, as a number (the
    fourth item); without it ``fe80::1`` is not reachable as printed.  In a URL
    the ``%`` before the scope is written ``%25`` (RFC 6874).
    """
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        if ":" not in host:
            return f"{host}:{port}"
        if len(address) >= 4 and address[3] and "%" not in host:
            host = f"{host}%{_scope_name(address[3])}"
        if url:
            host = host.replace("%", "%25")
        return f"[{host}]:{port}"
    if isinstance(address, (str, bytes)):  # AF_UNIX: a path (an unnamed client socket gives "")
        path = address.decode(errors="replace") if isinstance(address, bytes) else address
        if path.startswith("\0"):  # Linux's abstract namespace (unix(7)), written "@name" as systemd does
            path = "@" + path[1:]
        return f"unix:{path}" if path else "unix"
    return str(address)


def _scope_name(scope_id: int) -> str:
    try:
        return socket.if_indextoname(scope_id)
    except (OSError, AttributeError):  # no such interface (any more), or no if_indextoname here
        return str(scope_id)


def bind_tcp(
    host: str | list[str] | None,
    port: int,
    *,
    backlog: int = DEFAULT_BACKLOG,
    reuse_port: bool = False,
    listen: bool = True,
) -> list[socket.socket]:
    """Bind and listen on every address the host stands for; non-blocking sockets.

    A name such as ``localhost`` may stand for 127.0.0.1 and ::1: each gets a
    listener, as with asyncio.create_server (IPv6 ones with IPV6_V6ONLY, so the
    IPv4 one is not shadowed).  With port 0 the port the kernel picks for the
    first address is asked for the others.  ``host`` may also be a list.  If one
    address cannot be bound none is kept, and the OSError's ``filename`` names it.
    With ``listen=False`` the sockets are only bound: they hold the port.
    """
    hosts = [host] if host is None or isinstance(host, str) else list(host)
    addresses: list[tuple[int, int, int, Any]] = []
    for name in hosts:
        for family, type_, proto, _, sockaddr in socket.getaddrinfo(
            name, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        ):
            if (family, type_, proto, sockaddr) not in addresses:
                addresses.append((family, type_, proto, sockaddr))
    opened: list[socket.socket] = []
    address: Any = None
    try:
        for sock_family, sock_type, sock_proto, address in addresses:
            if port == 0 and opened:
                address = (address[0], opened[0].getsockname()[1], *address[2:])
            opened.append(
                _bind_tcp(sock_family, sock_type, sock_proto, address, backlog if listen else None, reuse_port)
            )
    except OSError as exc:
        for sock in opened:
            sock.close()
        if exc.filename is None and exc.errno is not None:
            exc = OSError(exc.errno, exc.strerror, format_address(address))
        raise exc from None
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    return opened


def _bind_tcp(
    family: int, type_: int, proto: int, address: Any, backlog: int | None, reuse_port: bool
) -> socket.socket:
    sock = socket.socket(family, type_, proto)
    try:
        if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):  # Windows: SO_REUSEADDR would allow port stealing
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        if backlog is not None:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def adopt(sock: socket.socket) -> socket.socket:
    """A listening socket made elsewhere, made ready to accept on: non-blocking.

    Raises OSError (ENOTSOCK, EINVAL) for an fd that is not a listening stream socket.
    """
    if sock.type != socket.SOCK_STREAM:
        raise OSError(f"fd {sock.fileno()} is not a stream socket")
    accepting = getattr(socket, "SO_ACCEPTCONN", None)  # Linux, the BSDs, macOS
    if accepting is not None and not sock.getsockopt(socket.SOL_SOCKET, accepting):
        raise OSError(f"fd {sock.fileno()} is not listening")
    sock.setblocking(False)
    return sock


#: how long the probe of an existing socket file waits for an answer before calling it live
STALE_PROBE_TIMEOUT = 1.0


@dataclasses.dataclass(frozen=True)
class SocketFile:
    """The file bind() made for a UNIX socket, known by device and inode.

    Removed at exit only while the path still names that file: a second server
    started while this one drained may have found the path refusing connections,
    taken it for stale and bound its own socket there.  fstat() on the socket
    cannot tell: it describes the socket, not the file that names it.
    """

    path: str
    device: int
    inode: int

    def remove(self) -> bool:
        """Unlink the file if it is still ours; whether it was unlinked."""
        try:
            found = os.lstat(self.path)
            if (found.st_dev, found.st_ino) != (self.device, self.inode):
                return False
            os.unlink(self.path)
        except OSError:  # gone already, or its directory is no longer ours to write
            return False
        return True


def bind_unix(
    path: str, *, backlog: int = DEFAULT_BACKLOG, mode: int | None = None
) -> tuple[socket.socket, SocketFile]:
    """Bind and listen on a UNIX stream socket at path; a non-blocking socket, and its file.

    A socket file left behind by a crashed run is replaced, but only when nothing
    answers there: bind() fails with EADDRINUSE on any existing path (unix(7)), and
    a file that is not a socket is never removed.  ``mode`` (such as 0o660) is
    applied before listen(), so no client can connect under the umask's permissions.
    The OSError raised names the path in ``filename``.
    """
    path = os.path.abspath(path)  # the file is removed by this name at exit, whatever the cwd is then
    _remove_if_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound: SocketFile | None = None
    try:
        sock.bind(path)
        found = os.lstat(path)
        bound = SocketFile(path, found.st_dev, found.st_ino)
        if mode is not None:
            # Linux asks for write permission on the file to connect (unix(7)); some BSDs ignore
            # the file's mode, so there only the directory's permissions protect the socket.
            os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
        return sock, bound
    except BaseException as exc:
        sock.close()
        if bound is not None:
            bound.remove()
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), path) from None
        raise


def _remove_if_stale(path: str) -> None:
    """Unlink a socket file nobody listens on; raise OSError if the path is taken or cannot be judged."""
    try:
        found = os.lstat(path)  # not stat(): a symlink is not followed, and not removed
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(found.st_mode):
        raise OSError(errno.EEXIST, "the path exists and is not a socket; not removing it", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(STALE_PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        # Nothing listens on it (unix(7): ECONNREFUSED): a crashed run's file.  A server
        # between its own bind() and listen() looks the same; two starting at once lose.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except FileNotFoundError:  # removed meanwhile: the path is free
        return
    except (BlockingIOError, TimeoutError):
        # EAGAIN: a listener whose backlog is full (unix(7)) -- alive, only busy.
        raise OSError(errno.EADDRINUSE, "a server is answering there (its backlog is full)", path) from None
    except OSError as exc:
        # EACCES, or EPROTOTYPE (a datagram socket): whether it is stale cannot be told.
        reason = f"{exc.strerror or exc}; cannot tell whether the socket there is stale, so not removing it"
        raise OSError(exc.errno, reason, path) from None
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "a server is answering there", path)
