"""Certificates made on the fly (trustme) and TLS clients for the TLS tests.

``BIOClient`` is a TLS client on MemoryBIOs over a blocking socket: the test decides which
bytes go out in which send(), so it can put a Finished and the first request in one segment,
or several records in one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import selectors
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import trustme
from clients import connect
from inprocess import serving

from pollserve.loop import EventLoop
from pollserve.server import Server
from pollserve.tls import ServerTLS, TLSLayerFactory, TLSOptions

HOSTNAME = "localhost"


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
    backend_name: str, app_factory, options: TLSOptions, **server_options
) -> Iterator[tuple[Server, TLSLayerFactory]]:
    """An in-process server of app_factory over TLS (tests/inprocess.serving), and its layer factory."""
    loop = EventLoop(backend_name)
    layers = TLSLayerFactory(app_factory, loop, ServerTLS.load(options))
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
