"""Bounded loopback clients for the tests: many connections on one thread."""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time

from pollserve import load


def connect(address: tuple[str, int], timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            raise ConnectionError(f"EOF after {len(chunks)} of {size} bytes")
        chunks += chunk
    return bytes(chunks)


def recv_until(sock: socket.socket, end: bytes) -> bytes:
    """What arrives until it ends with ``end`` (a reply whose length is not known, only its end)."""
    chunks = bytearray()
    while not chunks.endswith(end):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"EOF after {bytes(chunks)!r}")
        chunks += chunk
    return bytes(chunks)


def recv_until_eof(sock: socket.socket, limit: int = 64 << 20) -> bytes:
    chunks = bytearray()
    while len(chunks) <= limit:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return bytes(chunks)
        chunks += chunk
    raise AssertionError(f"more than {limit} bytes before EOF")


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def exchange(address: tuple[str, int], payload: bytes, reply_size: int, timeout: float = 60) -> bytes:
    """Send payload while reading the reply concurrently (a large echo needs both)."""
    with connect(address, timeout) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        reply = recv_exactly(sock, reply_size)
        sender.join(timeout)
        assert not sender.is_alive(), "sendall did not finish"
        return reply


def request_rounds(
    address: tuple[str, int],
    clients: int,
    rounds: int,
    request: bytes,
    expected: bytes,
    timeout: float = 60,
) -> int:
    """``clients`` concurrent connections each doing ``rounds`` request/reply rounds.

    Returns the number of correct replies; raises on a wrong reply, an early EOF
    or when the deadline passes.
    """
    deadline = time.monotonic() + timeout
    selector = selectors.DefaultSelector()
    socks = []
    try:
        for _ in range(clients):
            sock = connect(address)
            sock.setblocking(False)
            socks.append(sock)
            selector.register(sock, selectors.EVENT_READ, [0, bytearray()])
            sock.send(request)
        correct = 0
        pending = clients
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{pending} clients unfinished after {timeout} s ({correct} replies)")
            for key, _ in selector.select(min(left, 1.0)):
                state = key.data
                chunk = key.fileobj.recv(65536)
                if not chunk:
                    raise ConnectionError(f"server closed a connection after {state[0]} rounds")
                state[1] += chunk
                if len(state[1]) < len(expected):
                    continue
                if bytes(state[1]) != expected:
                    raise AssertionError(f"wrong reply {bytes(state[1])[:80]!r}, expected {expected[:80]!r}")
                correct += 1
                state[0] += 1
                state[1].clear()
                if state[0] == rounds:
                    selector.unregister(key.fileobj)
                    pending -= 1
                else:
                    key.fileobj.send(request)
        return correct
    finally:
        selector.close()
        for sock in socks:
            sock.close()


class SlowClients:
    """``count`` clients that connect, send one byte and wait, on a thread until stop().

    The hostile version of a slow client: one the server closes is replaced at once, so a slot
    it frees is taken again.  Bounded in time (``limit`` seconds) and in connections opened.
    """

    def __init__(self, address: tuple[str, int], count: int, *, first: bytes = b"G", limit: float = 120) -> None:
        self.address = address
        self.count = count
        self.first = first
        self.limit = limit
        #: connections whose first byte was sent, and those the server closed since
        self.sent = 0
        self.closed_by_server = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        deadline = time.monotonic() + self.limit
        opened = 0
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                while len(selector.get_map()) < self.count and opened < 100 * self.count:
                    sock = socket.socket()
                    sock.setblocking(False)
                    opened += 1
                    try:
                        sock.connect(self.address)
                    except BlockingIOError:
                        pass
                    except OSError:
                        sock.close()
                        break
                    selector.register(sock, selectors.EVENT_WRITE)
                for key, mask in selector.select(0.1):
                    sock = key.fileobj
                    try:
                        if mask & selectors.EVENT_WRITE:
                            sock.send(self.first)
                            self.sent += 1
                            selector.modify(sock, selectors.EVENT_READ)
                            continue
                        if sock.recv(65536):
                            continue  # an answer (a 408, say): wait for the close
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        pass
                    self.closed_by_server += 1
                    selector.unregister(sock)
                    sock.close()
        finally:
            for key in list(selector.get_map().values()):
                key.fileobj.close()
            selector.close()

    def wait_sent(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.sent < count:
            assert time.monotonic() < deadline, f"only {self.sent} of {count} slow clients sent their byte"
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop and close every connection (the server sees their EOF)."""
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the slow clients' thread is stuck"


def flood_metrics(
    address: tuple[str, int],
    concurrency: int,
    stop: threading.Event,
    outcomes: dict[str, int],
    path: str = "/metrics",
) -> None:
    """Keep `concurrency` GET `path` in flight until stop is set; count answers by status."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    load.flood_metrics(address, concurrency, stop.is_set, outcomes, request=request)
