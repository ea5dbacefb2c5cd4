"""Certificates made on the fly (trustme) and TLS clients for the TLS tests.

``BIOClient`` is a TLS client on MemoryBIOs over a blocking socket: the test decides which
bytes go out in which send(), so it can put a Finished and the first request in one segment,
or several records in one.  ``client_hello()`` builds a ClientHello byte by byte (RFC 8446
section 4.1.2), for offers no client library makes; ``s_client()`` runs ``openssl s_client``
once, for the offers its options make (``-groups``, ``-alpn``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import selectors
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import trustme
from clients import connect
from inprocess import serving

from pollserve.loop import EventLoop
from pollserve.server import Server
from pollserve.tls import ServerTLS, TLSLayerFactory, TLSOptions

HOSTNAME = "localhost"


# -- openssl s_client ---------------------------------------------------------------------------------------------


def find_openssl() -> tuple[str | None, str]:
    """OpenSSL's own s_client, 1.1.1 or later (TLS 1.3, the K command), or None and why not: macOS
    puts LibreSSL's openssl on PATH, whose s_client differs."""
    path = shutil.which("openssl")
    if path is None:
        return None, "openssl is not on PATH"
    try:
        version = subprocess.run([path, "version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"openssl version failed: {exc}"
    found = re.match(r"OpenSSL (\d+)\.(\d+)\.(\d+)", version)
    if not found or tuple(map(int, found.groups())) < (1, 1, 1):
        return None, f"{version or path} is not OpenSSL 1.1.1 or later"
    return path, version


OPENSSL, OPENSSL_ABOUT = find_openssl()
#: CI on Linux installs openssl (.ci/run): there a missing one is a failure, not a skip
if OPENSSL is None and os.environ.get("CI") and sys.platform.startswith("linux"):
    OPENSSL_ABOUT = ""

#: skips a test that drives openssl s_client where it is missing, except under CI on Linux
uses_openssl = pytest.mark.skipif(OPENSSL is None and bool(OPENSSL_ABOUT), reason=OPENSSL_ABOUT or "-")


def needs_openssl() -> None:
    if OPENSSL is None:
        pytest.fail(f"openssl is missing: .ci/run installs Debian's openssl package ({OPENSSL_ABOUT})")


def s_client(address, ca_file: str, *args: str, send: str = "") -> str:
    """``openssl s_client`` once: connect, handshake, send ``send`` and close; its whole output.
    ``-ign_eof`` is left out, so stdin's end ends the session."""
    needs_openssl()
    assert OPENSSL is not None
    result = subprocess.run(
        [OPENSSL, "s_client", "-connect", f"{address[0]}:{address[1]}", "-CAfile", ca_file,
         "-servername", HOSTNAME, *args],
        input=send, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return result.stdout + result.stderr


# -- ClientHellos made by hand (RFC 8446 section 4.1.2) -------------------------------------------------------------

#: named groups (RFC 8446 section 4.2.7, RFC 7919)
X25519, SECP256R1, SECP384R1 = 0x001D, 0x0017, 0x0018
FFDHE2048, FFDHE8192 = 0x0100, 0x0104
#: the size of a finite-field group's key_exchange: its prime's (RFC 8446 section 4.2.8.1)
FFDHE_SIZES = {FFDHE2048: 256, FFDHE8192: 1024}


def key_exchange(group: int) -> bytes:
    """A share OpenSSL takes: 32 random bytes for X25519; for a finite-field group, the generator
    (2 = g^1, which RFC 7919's groups accept as a public value, padded to the prime's size); one
    byte for any other group, as for GREASE (RFC 8701)."""
    if group == X25519:
        return secrets.token_bytes(32)
    if group in FFDHE_SIZES:
        return (2).to_bytes(FFDHE_SIZES[group], "big")
    return b"\x00"


def _vector(width: int, data: bytes) -> bytes:
    return len(data).to_bytes(width, "big") + data


def extension(kind: int, data: bytes) -> bytes:
    return kind.to_bytes(2, "big") + _vector(2, data)


def _u16s(values: Iterable[int]) -> bytes:
    return b"".join(value.to_bytes(2, "big") for value in values)


def client_hello(
    *,
    groups: Iterable[int] = (X25519,),
    key_shares: Iterable[int] | None = None,
    alpn: Iterable[bytes] | None = None,
    tls13: bool = True,
    more: bytes = b"",
) -> bytes:
    """A ClientHello handshake message (no record header): TLS 1.3 (and 1.2) suites, the groups
    listed in supported_groups, a share for each of ``key_shares`` (default: the first group;
    X25519 or finite-field ones), ALPN if given, then the extensions in ``more`` as they are.
    OpenSSL answers such a hello with a ServerHello (or a HelloRetryRequest)."""
    groups = tuple(groups)
    shares = groups[:1] if key_shares is None else tuple(key_shares)
    extensions = [
        extension(10, _vector(2, _u16s(groups))),  # supported_groups
        extension(13, _vector(2, _u16s((0x0403, 0x0804, 0x0401)))),  # signature_algorithms
    ]
    if tls13:
        extensions.append(extension(43, _vector(1, _u16s((0x0304, 0x0303)))))  # supported_versions
        key_share = b"".join(group.to_bytes(2, "big") + _vector(2, key_exchange(group)) for group in shares)
        extensions.append(extension(51, _vector(2, key_share)))
    if alpn is not None:
        extensions.append(extension(16, _vector(2, b"".join(_vector(1, name) for name in alpn))))
    body = (
        b"\x03\x03"  # legacy_version: TLS 1.2
        + secrets.token_bytes(32)  # random
        + _vector(1, secrets.token_bytes(32))  # legacy_session_id
        + _vector(2, _u16s((0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F)))  # cipher_suites
        + b"\x01\x00"  # legacy_compression_methods: null
        + _vector(2, b"".join(extensions) + more)
    )
    return b"\x01" + _vector(3, body)


def records(message: bytes, size: int = 1 << 14) -> bytes:
    """A handshake message in handshake records of at most ``size`` bytes each (RFC 8446 section 5.1)."""
    return b"".join(
        b"\x16\x03\x01" + _vector(2, message[start : start + size]) for start in range(0, len(message), size)
    )


def handshake_message(flight: bytes) -> bytes:
    """The handshake bytes the records of ``flight`` carry (their fragments, joined)."""
    message, at = bytearray(), 0
    while at < len(flight):
        assert flight[at] == 0x16, f"a record of type {flight[at]} in the flight"
        length = int.from_bytes(flight[at + 3 : at + 5], "big")
        message += flight[at + 5 : at + 5 + length]
        at += 5 + length
    return bytes(message)


#: the alert records a server sends before its ServerHello (RFC 8446 section 6): fatal, then the description
HANDSHAKE_FAILURE = b"\x15\x03\x03\x00\x02\x02\x28"
NO_APPLICATION_PROTOCOL = b"\x15\x03\x03\x00\x02\x02\x78"


@dataclasses.dataclass
class Certs:
    """One CA, a server certificate it issued for localhost, 127.0.0.1 and ::1, and a client's."""

    ca: trustme.CA
    server: trustme.LeafCert
    ca_file: str
    cert_file: str
    key_file: str
    #: the client's certificate and key in one PEM file
    client_file: str

    def options(self, **kwargs) -> TLSOptions:
        return TLSOptions(self.cert_file, self.key_file, **kwargs)

    def client_context(self, *, certificate: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if certificate:
            context.load_cert_chain(self.client_file)
        return context

    def write_server_files(self, cert_file: str, key_file: str) -> None:
        """This CA's server certificate and key, written over the given paths (a renewal)."""
        Path(cert_file).write_bytes(b"".join(pem.bytes() for pem in self.server.cert_chain_pems))
        self.server.private_key_pem.write_to_path(key_file)


def make_certs(folder: Path, *, extra_names: int = 0) -> Certs:
    """``extra_names`` more DNS names in the server's certificate make it (and the server's
    handshake flight) about 25 bytes each larger."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    names = [f"name-{index}.padding.example" for index in range(extra_names)]
    server = ca.issue_cert(HOSTNAME, "127.0.0.1", "::1", *names)
    client = ca.issue_cert("client.example")
    paths = {name: str(folder / name) for name in ("ca.pem", "cert.pem", "key.pem", "client.pem")}
    ca.cert_pem.write_to_path(paths["ca.pem"])
    certs = Certs(ca, server, paths["ca.pem"], paths["cert.pem"], paths["key.pem"], paths["client.pem"])
    certs.write_server_files(certs.cert_file, certs.key_file)
    client.private_key_and_cert_chain_pem.write_to_path(paths["client.pem"])
    return certs


@contextlib.contextmanager
def tls_serving(
    backend_name: str, app_factory, options: TLSOptions, context: ssl.SSLContext | None = None, **server_options
) -> Iterator[tuple[Server, TLSLayerFactory]]:
    """An in-process server of app_factory over TLS (tests/inprocess.serving), and its layer factory;
    ``context``: one of the app's own instead of the one ``options`` load."""
    loop = EventLoop(backend_name)
    layers = TLSLayerFactory(app_factory, loop, ServerTLS(options, context))
    try:
        with serving(backend_name, layers, loop=loop, **server_options) as server:
            yield server, layers
    finally:
        if not loop._closed:  # serving() closes it; a start() that failed did not
            loop.close()


def small_buffer_client(address, timeout: float = 10) -> socket.socket:
    """A TCP client whose receive buffer is the kernel's minimum, set before connecting so that
    the window it advertises is small: a server writing to it soon meets a full socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def small_send_buffers(server: Server) -> None:
    """The kernel's minimum send buffer on the listeners, which accepted sockets inherit (Linux,
    the BSDs, macOS); a fixed size also turns Linux's send-buffer autotuning off."""
    for listener in server.sockets:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)


def tls_connect(
    address, context: ssl.SSLContext, timeout: float = 10, *, raw: socket.socket | None = None, **kwargs
) -> ssl.SSLSocket:
    """A handshaken client connection (Python's ssl, blocking with a timeout)."""
    raw = raw if raw is not None else connect(address, timeout)
    try:
        return context.wrap_socket(raw, server_hostname=kwargs.pop("server_hostname", HOSTNAME), **kwargs)
    except BaseException:
        raw.close()
        raise


def recv_plain(sock: ssl.SSLSocket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


class BIOClient:
    """A TLS client whose records the test sends when and how it likes."""

    def __init__(self, address, context: ssl.SSLContext, timeout: float = 10, *, sock: socket.socket | None = None):
        self.sock = sock if sock is not None else connect(address, timeout)
        self.timeout = timeout
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname=HOSTNAME)
        #: the server's close_notify arrived; the socket's EOF arrived
        self.close_notify = False
        self.eof = False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> BIOClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def handshake(self, *, send_finished: bool = True) -> None:
        """Handshake; with send_finished=False the client's last flight stays unsent (flush() sends it)."""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                self._receive()
        if send_finished:
            self.flush()

    def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def write(self, data: bytes, *, send: bool = True) -> None:
        self.obj.write(data)
        if send:
            self.flush()

    def send_close_notify(self) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):  # sent; the server's is read by read()
            self.obj.unwrap()
        self.flush()

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            raise ConnectionError("the server closed the connection")
        self.incoming.write(data)

    def read(self, size: int) -> bytes:
        """Exactly size bytes of plaintext."""
        data = bytearray()
        while len(data) < size:
            chunk = self._read_some()
            if chunk is None:
                raise ConnectionError(f"close_notify after {len(data)} of {size} bytes")
            data += chunk
        return bytes(data)

    def read_to_close_notify(self) -> bytes:
        """Plaintext until the server's close_notify."""
        data = bytearray()
        while (chunk := self._read_some()) is not None:
            data += chunk
        return bytes(data)

    def _read_some(self) -> bytes | None:
        while True:
            try:
                chunk = self.obj.read(65536)
            except ssl.SSLWantReadError:
                self.flush()  # a read can write (a ticket's acknowledgement, a key update)
                self._receive()
                continue
            except ssl.SSLZeroReturnError:
                chunk = b""
            if not chunk:
                self.close_notify = True
                return None
            return chunk

    def exchange(self, payload: bytes, reply_size: int, timeout: float = 60) -> bytes:
        """Send payload while reading the reply, on this one thread (an SSL object must not be
        read and written by two threads at once)."""
        self.obj.write(payload)
        out = bytearray(self.outgoing.read())
        reply = bytearray()
        deadline = time.monotonic() + timeout
        self.sock.setblocking(False)
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.sock, selectors.EVENT_READ)
                while len(reply) < reply_size:
                    assert time.monotonic() < deadline, f"{len(reply)} of {reply_size} bytes in {timeout} s"
                    events = selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0)
                    selector.modify(self.sock, events)
                    for _, mask in selector.select(1.0):
                        if mask & selectors.EVENT_WRITE:
                            with contextlib.suppress(BlockingIOError):
                                del out[: self.sock.send(out)]
                        if mask & selectors.EVENT_READ:
                            try:
                                data = self.sock.recv(1 << 16)
                            except BlockingIOError:
                                continue
                            if not data:
                                raise ConnectionError(f"EOF after {len(reply)} of {reply_size} bytes")
                            self.incoming.write(data)
                            while True:
                                try:
                                    chunk = self.obj.read(1 << 16)
                                except ssl.SSLWantReadError:
                                    break
                                if not chunk:
                                    raise ConnectionError(f"close_notify after {len(reply)} of {reply_size} bytes")
                                reply += chunk
                            out += self.outgoing.read()
        finally:
            self.sock.settimeout(self.timeout)
        return bytes(reply)

    def wait_eof(self) -> None:
        """Read the socket until its EOF; nothing but the EOF may come."""
        data = self.sock.recv(65536)
        assert data == b"", f"{len(data)} bytes where EOF was expected"
        self.eof = True
