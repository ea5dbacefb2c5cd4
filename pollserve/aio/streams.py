"""The stream calls of AsyncioLoop: ``create_connection``, ``create_server``, their UNIX twins,
``connect_accepted_socket`` and ``sendfile``, each with the standard loop's parameters, checks and
errors on the running Python (``happy_eyeballs_delay``/``interleave``, ``all_errors`` from 3.12,
``keep_alive`` and ``cleanup_socket`` from 3.13).

``ssl=`` runs asyncio's own TLS protocol over the stream transport (tls.py).
pollserve's idle timeout, linger and connection limits apply only to a server given them (limits.py).
"""

from __future__ import annotations

import asyncio
import collections.abc
import errno
import functools
import itertools
import logging
import os
import socket
import stat
import sys
from typing import Any

from .addresses import HAS_IPV6, AddrInfo, interleave, resolve, set_reuse_port
from .connect import ConnectCalls, check_not_ssl
from .sendfile import SendfileCalls
from .server import Server
from .tls import tls_transport
from .transport import StreamTransport
from .unsupported import refuse_on_windows

logger = logging.getLogger("asyncio")


def _ssl_only(ssl: Any, **given: Any) -> None:
    """The standard errors for TLS options given without TLS."""
    for name, value in given.items():
        if value is not None and not ssl:
            raise ValueError(f"{name} is only meaningful with ssl")


def _newer_than_this_python(name: str, since: tuple[int, int], value: Any, default: Any = None) -> None:
    """A parameter this Python's standard loop does not take is refused as the standard refuses it."""
    if sys.version_info < since and value is not default:
        raise TypeError(f"got an unexpected keyword argument {name!r}")


def _check_stream_socket(sock: socket.socket) -> None:
    if sock.type != socket.SOCK_STREAM:
        raise ValueError(f"A Stream Socket was expected, got {sock!r}")


def _one_error(exceptions: list[OSError], all_errors: bool) -> BaseException:
    """What a failed connect to every address raises: the one error, the one text they share, a
    summary of them all, or (``all_errors``) an ExceptionGroup of them."""
    if all_errors and sys.version_info >= (3, 11):  # all_errors is refused before 3.12
        return ExceptionGroup("create_connection failed", exceptions)  # noqa: F821 - a builtin from 3.11
    if len(exceptions) == 1:
        return exceptions[0]
    model = str(exceptions[0])
    if all(str(exc) == model for exc in exceptions):
        return exceptions[0]
    return OSError(f"Multiple exceptions: {', '.join(str(exc) for exc in exceptions)}")


class StreamCalls(ConnectCalls, SendfileCalls):
    """Servers and connections over TCP and UNIX stream sockets, for AsyncioLoop."""

    # -- connections -------------------------------------------------------------------------------

    async def create_connection(
        self,
        protocol_factory: Any,
        host: Any = None,
        port: Any = None,
        *,
        ssl: Any = None,
        family: int = 0,
        proto: int = 0,
        flags: int = 0,
        sock: socket.socket | None = None,
        local_addr: Any = None,
        server_hostname: str | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        happy_eyeballs_delay: float | None = None,
        interleave: int | None = None,
        all_errors: bool = False,
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        _newer_than_this_python("ssl_shutdown_timeout", (3, 11), ssl_shutdown_timeout)
        _newer_than_this_python("all_errors", (3, 12), all_errors, False)
        if server_hostname is not None and not ssl:
            raise ValueError("server_hostname is only meaningful with ssl")
        if server_hostname is None and ssl:
            if not host:
                raise ValueError("You must set server_hostname when using ssl without a host")
            server_hostname = host  # the name the certificate is checked against
        _ssl_only(ssl, ssl_handshake_timeout=ssl_handshake_timeout, ssl_shutdown_timeout=ssl_shutdown_timeout)
        if sock is not None:
            check_not_ssl(sock)
        if happy_eyeballs_delay is not None and interleave is None:
            interleave = 1  # Happy Eyeballs alternates the families by default
        if host is not None or port is not None:
            if sock is not None:
                raise ValueError("host/port and sock can not be specified at the same time")
            sock = await self._connect_to_any(
                host, port, family, proto, flags, local_addr, happy_eyeballs_delay, interleave, all_errors
            )
        elif sock is None:
            raise ValueError("host and port was not specified and no sock specified")
        else:
            _check_stream_socket(sock)
        transport, protocol = await self._connection_transport(
            sock, protocol_factory, ssl, server_hostname, False, ssl_handshake_timeout, ssl_shutdown_timeout
        )
        self.counts.connections_connected += 1
        if self.get_debug():
            logger.debug("%r connected to %s:%r: (%r, %r)", sock, host, port, transport, protocol)
        return transport, protocol

    async def _connect_to_any(
        self,
        host: Any,
        port: Any,
        family: int,
        proto: int,
        flags: int,
        local_addr: Any,
        happy_eyeballs_delay: float | None,
        interleave_count: int | None,
        all_errors: bool,
    ) -> socket.socket:
        """A socket connected to the first address of host:port that answers, in turn or with
        Happy Eyeballs' staggered race."""
        infos = await resolve(self, (host, port), family=family, proto=proto, flags=flags)
        if not infos:
            raise OSError("getaddrinfo() returned empty list")
        local_infos = None
        if local_addr is not None:
            local_infos = await resolve(self, local_addr, family=family, proto=proto, flags=flags)
            if not local_infos:
                raise OSError("getaddrinfo() returned empty list")
        if interleave_count:
            infos = interleave(infos, interleave_count)
        exceptions: list[list[OSError]] = []
        sock = None
        try:
            if happy_eyeballs_delay is None:
                for info in infos:
                    try:
                        sock = await self._connect_one(exceptions, info, local_infos)
                        break
                    except OSError:
                        continue
            else:
                attempts = (functools.partial(self._connect_one, exceptions, info, local_infos) for info in infos)
                sock, _, _ = await asyncio.staggered.staggered_race(attempts, happy_eyeballs_delay, loop=self)
            if sock is None:
                raise _one_error(list(itertools.chain.from_iterable(exceptions)), all_errors)
            return sock
        finally:
            # The error raised holds this frame (its traceback) and the lists hold the error: no
            # cycle is left for the garbage collector (CPython gh-124859).
            del exceptions

    async def _connect_one(
        self, exceptions: list[list[OSError]], info: AddrInfo, local_infos: list[AddrInfo] | None
    ) -> socket.socket:
        """One socket, bound to a local address of its family if asked, connected to ``info``;
        its errors are kept in a list of their own in ``exceptions``."""
        mine: list[OSError] = []
        exceptions.append(mine)
        family, type_, proto, _, address = info
        sock = None
        try:
            sock = socket.socket(family=family, type=type_, proto=proto)
            sock.setblocking(False)
            if local_infos is not None:
                self._bind_local(sock, family, local_infos, mine)
            await self.sock_connect(sock, address)
            return sock
        except OSError as exc:
            mine.append(exc)
            if sock is not None:
                sock.close()
            raise
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        finally:
            del exceptions, mine  # as in _connect_to_any

    @staticmethod
    def _bind_local(sock: socket.socket, family: int, local_infos: list[AddrInfo], errors: list[OSError]) -> None:
        for local_family, _, _, _, local_address in local_infos:
            if local_family != family:
                continue
            try:
                sock.bind(local_address)
                return
            except OSError as exc:
                errors.append(
                    OSError(
                        exc.errno,
                        f"error while attempting to bind on address {local_address!r}: "
                        f"{(exc.strerror or str(exc)).lower()}",
                    )
                )
        if errors:
            raise errors.pop()
        raise OSError(f"no matching local address with family={family!r} found")

    async def _connection_transport(
        self,
        sock: socket.socket,
        protocol_factory: Any,
        ssl: Any = None,
        server_hostname: str | None = None,
        server_side: bool = False,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        """The transport over a connected socket, once connection_made has run (with ``ssl``, once
        the handshake is done; ``ssl=True`` is asyncio's default client context)."""
        sock.setblocking(False)
        protocol = protocol_factory()
        waiter = self.create_future()
        transport: asyncio.Transport
        if ssl:
            transport, _ = tls_transport(
                self,
                sock,
                protocol,
                None if isinstance(ssl, bool) else ssl,
                waiter,
                server_side=server_side,
                server_hostname=server_hostname,
                handshake_timeout=ssl_handshake_timeout,
                shutdown_timeout=ssl_shutdown_timeout,
            )
        else:
            transport = StreamTransport(self, sock, protocol, waiter)
        try:
            await waiter
        except BaseException:
            transport.close()
            raise
        return transport, protocol

    async def create_unix_connection(
        self,
        protocol_factory: Any,
        path: Any = None,
        *,
        ssl: Any = None,
        sock: socket.socket | None = None,
        server_hostname: str | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        refuse_on_windows("UNIX sockets")
        _newer_than_this_python("ssl_shutdown_timeout", (3, 11), ssl_shutdown_timeout)
        if ssl:
            if server_hostname is None:
                raise ValueError("you have to pass server_hostname when using ssl")
        else:
            if server_hostname is not None:
                raise ValueError("server_hostname is only meaningful with ssl")
            _ssl_only(ssl, ssl_handshake_timeout=ssl_handshake_timeout, ssl_shutdown_timeout=ssl_shutdown_timeout)
        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0)
            try:
                sock.setblocking(False)
                await self.sock_connect(sock, os.fspath(path))
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError("no path and sock were specified")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
        transport, protocol = await self._connection_transport(
            sock, protocol_factory, ssl, server_hostname, False, ssl_handshake_timeout, ssl_shutdown_timeout
        )
        self.counts.connections_connected += 1
        return transport, protocol

    async def connect_accepted_socket(
        self,
        protocol_factory: Any,
        sock: socket.socket,
        *,
        ssl: Any = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        _newer_than_this_python("ssl_shutdown_timeout", (3, 11), ssl_shutdown_timeout)
        _check_stream_socket(sock)
        _ssl_only(ssl, ssl_handshake_timeout=ssl_handshake_timeout, ssl_shutdown_timeout=ssl_shutdown_timeout)
        check_not_ssl(sock)
        transport, protocol = await self._connection_transport(
            sock, protocol_factory, ssl, None, True, ssl_handshake_timeout, ssl_shutdown_timeout
        )
        self.counts.connections_accepted += 1
        return transport, protocol

    # -- servers -----------------------------------------------------------------------------------

    async def create_server(
        self,
        protocol_factory: Any,
        host: Any = None,
        port: Any = None,
        *,
        family: int = socket.AF_UNSPEC,
        flags: int = socket.AI_PASSIVE,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: Any = None,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
        keep_alive: bool | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        start_serving: bool = True,
    ) -> Server:
        _newer_than_this_python("ssl_shutdown_timeout", (3, 11), ssl_shutdown_timeout)
        _newer_than_this_python("keep_alive", (3, 13), keep_alive)
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        _ssl_only(ssl, ssl_handshake_timeout=ssl_handshake_timeout, ssl_shutdown_timeout=ssl_shutdown_timeout)
        if sock is not None:
            check_not_ssl(sock)
        if host is not None or port is not None:
            if sock is not None:
                raise ValueError("host/port and sock can not be specified at the same time")
            if reuse_address is None:
                reuse_address = os.name == "posix" and sys.platform != "cygwin"
            sockets = await self._listening_sockets(host, port, family, flags, reuse_address, reuse_port, keep_alive)
        else:
            if sock is None:
                raise ValueError("Neither host/port nor sock were specified")
            _check_stream_socket(sock)
            sockets = [sock]
        for listener in sockets:
            listener.setblocking(False)
        server = Server(self, sockets, protocol_factory, backlog, ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
        if start_serving:
            server._start_serving()
            await asyncio.sleep(0)  # one pass, as the standard loop takes
        if self.get_debug():
            logger.info("%r is serving", server)
        return server

    async def _listening_sockets(
        self,
        host: Any,
        port: Any,
        family: int,
        flags: int,
        reuse_address: bool,
        reuse_port: bool | None,
        keep_alive: bool | None,
    ) -> list[socket.socket]:
        """One bound socket per distinct address the hosts resolve to (IPv6 ones IPv6 only)."""
        if host == "":
            hosts: list[Any] = [None]
        elif isinstance(host, str) or not isinstance(host, collections.abc.Iterable):
            hosts = [host]
        else:
            hosts = list(host)
        resolved = await asyncio.gather(*[self._server_addrinfo(name, port, family, flags) for name in hosts])
        infos = set(itertools.chain.from_iterable(resolved))
        sockets: list[socket.socket] = []
        completed = False
        try:
            for af, socktype, proto, _, address in infos:
                try:
                    sock = socket.socket(af, socktype, proto)
                except OSError:
                    if self.get_debug():
                        logger.warning(
                            "create_server() failed to create socket.socket(%r, %r, %r)",
                            af,
                            socktype,
                            proto,
                            exc_info=True,
                        )
                    continue
                sockets.append(sock)
                if reuse_address:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, True)
                if reuse_port:
                    set_reuse_port(sock)
                if keep_alive:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, True)
                if HAS_IPV6 and af == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, True)
                try:
                    sock.bind(address)
                except OSError as err:
                    message = f"error while attempting to bind on address {address!r}: {str(err).lower()}"
                    if err.errno == errno.EADDRNOTAVAIL:  # the family is not enabled here (bpo-30945)
                        sockets.pop()
                        sock.close()
                        if self.get_debug():
                            logger.warning(message)
                        continue
                    raise OSError(err.errno, message) from None
            if not sockets:
                raise OSError(f"could not bind on any address out of {[info[4] for info in infos]!r}")
            completed = True
        finally:
            if not completed:
                for sock in sockets:
                    sock.close()
        return sockets

    async def _server_addrinfo(self, host: Any, port: Any, family: int, flags: int) -> list[AddrInfo]:
        infos = await resolve(self, (host, port), family=family, flags=flags)
        if not infos:
            raise OSError(f"getaddrinfo({host!r}) returned empty list")
        return infos

    async def create_unix_server(
        self,
        protocol_factory: Any,
        path: Any = None,
        *,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: Any = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        start_serving: bool = True,
        cleanup_socket: bool = True,
    ) -> Server:
        refuse_on_windows("UNIX sockets")
        _newer_than_this_python("ssl_shutdown_timeout", (3, 11), ssl_shutdown_timeout)
        _newer_than_this_python("cleanup_socket", (3, 13), cleanup_socket, True)
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        _ssl_only(ssl, ssl_handshake_timeout=ssl_handshake_timeout, ssl_shutdown_timeout=ssl_shutdown_timeout)
        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            sock = _bind_unix(os.fspath(path))
        else:
            if sock is None:
                raise ValueError("path was not specified, and no sock specified")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
        sock.setblocking(False)
        server = Server(self, [sock], protocol_factory, backlog, ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
        if cleanup_socket and sys.version_info >= (3, 13):
            server._remove_on_close(sock)
        if start_serving:
            server._start_serving()
            await asyncio.sleep(0)
        return server


def _bind_unix(path: Any) -> socket.socket:
    """A UNIX stream socket bound to ``path``; a stale socket file left there is removed first."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if path[0] not in (0, "\x00"):  # not an abstract socket
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            logger.error("Unable to check or remove stale UNIX socket %r: %r", path, err)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(errno.EADDRINUSE, f"Address {path!r} is already in use") from None
        raise
    except BaseException:
        sock.close()
        raise
    return sock
