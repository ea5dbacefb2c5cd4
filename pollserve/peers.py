"""The servers pollserve is measured against, with the same apps and the same start-up line.

    python -m pollserve.peers asyncio|uvloop|selectors [--app hello|echo] [--host H] [--port P]

- ``asyncio``: the standard library's event loop with an ``asyncio.Protocol``, the usual way to
  write such a server in Python.
- ``uvloop``: the same protocol on uvloop's libuv-based loop (``pip install uvloop``), the fastest
  Python event loop there is.
- ``selectors``: a plain loop over ``selectors.DefaultSelector``, what people hand-roll.

Each logs ``listening on HOST:PORT (backend NAME, app APP)`` on stderr like pollserve, so the same
benchmark code starts any of them, and exits 0 on SIGTERM or SIGINT.  The hello and echo apps behave as
pollserve's: one ``Hello world\\n`` per chunk received, or every byte sent back.
"""

from __future__ import annotations

import argparse
import asyncio
import selectors
import signal
import socket
import sys
from collections.abc import Callable, Sequence

from .apps import HELLO_REPLY

PEERS = ("asyncio", "uvloop", "selectors")


def listening(address: tuple, name: str, app: str) -> None:
    print(f"listening on {address[0]}:{address[1]} (backend {name}, app {app})", file=sys.stderr, flush=True)


# -- asyncio and uvloop ----------------------------------------------------------------------------------


class AsyncioHello(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(HELLO_REPLY)


class AsyncioEcho(AsyncioHello):
    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve_asyncio(name: str, app: str, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    protocol = AsyncioHello if app == "hello" else AsyncioEcho
    server = await loop.create_server(protocol, host, port, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    listening(server.sockets[0].getsockname(), name, app)
    await stop.wait()
    server.close()
    await server.wait_closed()


def run_asyncio(app: str, host: str, port: int) -> None:
    asyncio.run(serve_asyncio("asyncio", app, host, port))


def run_uvloop(app: str, host: str, port: int) -> None:
    try:
        import uvloop
    except ImportError:
        sys.exit("pollserve.peers: uvloop is not installed (pip install uvloop)")
    uvloop.run(serve_asyncio("uvloop", app, host, port))


# -- a plain selectors loop ------------------------------------------------------------------------------


def run_selectors(app: str, host: str, port: int) -> None:
    """Accept, recv, send; what send() does not take waits for EVENT_WRITE, and reading stops meanwhile."""
    selector = selectors.DefaultSelector()
    listener = socket.create_server((host, port), backlog=1024)
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ, None)
    pending: dict[socket.socket, bytes] = {}

    def stop(signum: int, frame: object) -> None:
        # Raise: a flag would wait, since Python retries the interrupted select() (PEP 475).
        raise SystemExit(0)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    listening(listener.getsockname(), "selectors", app)
    echo = app == "echo"
    while True:
        for key, mask in selector.select():
            sock: socket.socket | None = key.data  # None: the listener
            if sock is None:
                for _ in range(128):
                    try:
                        client, _ = listener.accept()
                    except BlockingIOError:
                        break
                    client.setblocking(False)
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    selector.register(client, selectors.EVENT_READ, client)
                continue
            try:
                if mask & selectors.EVENT_WRITE:
                    data = pending.pop(sock)
                else:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError
                    if not echo:
                        data = HELLO_REPLY
                sent = sock.send(data)
            except BlockingIOError:
                continue
            except OSError:
                selector.unregister(sock)
                pending.pop(sock, None)
                sock.close()
                continue
            if sent < len(data):
                pending[sock] = data[sent:]
                selector.modify(sock, selectors.EVENT_WRITE, sock)
            elif mask & selectors.EVENT_WRITE:
                selector.modify(sock, selectors.EVENT_READ, sock)


RUNNERS: dict[str, Callable[[str, str, int], None]] = {
    "asyncio": run_asyncio,
    "uvloop": run_uvloop,
    "selectors": run_selectors,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pollserve.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("peer", choices=PEERS)
    parser.add_argument("--app", choices=["hello", "echo"], default="hello")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    RUNNERS[args.peer](args.app, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
