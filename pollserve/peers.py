"""The servers pollserve is measured against, with the same apps and the same start-up line.

    python -m pollserve.peers asyncio|uvloop|pollserve-asyncio|selectors [--app hello|echo] [--streams]
                              [--host H] [--port P]

- ``asyncio``: the standard library's event loop with an ``asyncio.Protocol``, the usual way to
  write such a server in Python.
- ``uvloop``: the same protocol on uvloop's libuv-based loop (``pip install uvloop``), the fastest
  Python event loop there is.
- ``pollserve-asyncio``: the same protocol on pollserve's own loop as an asyncio loop (pollserve.aio),
  on ``$POLLSERVE_BACKEND`` or the best backend: what the asyncio face's layering costs.
- ``selectors``: a plain loop over ``selectors.DefaultSelector``, what people hand-roll.

``--streams`` serves the app with asyncio streams (``asyncio.start_server``, a coroutine per client that
reads, writes and drains) instead of a Protocol, on the asyncio-family peers.

Each logs ``listening on HOST:PORT (backend NAME, app APP)`` on stderr like pollserve, so the same
benchmark code starts any of them, and exits 0 on SIGTERM or SIGINT.  The hello and echo apps behave as
pollserve's: one ``Hello world\\n`` per chunk received, or every byte sent back.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import selectors
import signal
import socket
import sys
from collections.abc import Callable, Sequence

from .apps import HELLO_REPLY

PEERS = ("asyncio", "uvloop", "pollserve-asyncio", "selectors")


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


async def stream_client(app: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One client, as streams code is written: read, write, drain, until EOF."""
    try:
        while data := await reader.read(65536):
            writer.write(HELLO_REPLY if app == "hello" else data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


#: the same client for ``pollserve --app pollserve.peers:stream_hello`` (or ``stream_echo``): the command's
#: own server running the handler asyncio's start_server runs here
stream_hello = functools.partial(stream_client, "hello")
stream_echo = functools.partial(stream_client, "echo")


async def serve_asyncio(name: str, app: str, host: str, port: int, streams: bool = False) -> None:
    loop = asyncio.get_running_loop()
    if streams:
        server = await asyncio.start_server(functools.partial(stream_client, app), host, port, backlog=1024)
    else:
        protocol = AsyncioHello if app == "hello" else AsyncioEcho
        server = await loop.create_server(protocol, host, port, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    listening(server.sockets[0].getsockname(), name, app)
    await stop.wait()
    server.close()
    await server.wait_closed()


def run_asyncio(app: str, host: str, port: int, streams: bool = False) -> None:
    asyncio.run(serve_asyncio("asyncio", app, host, port, streams))


def run_uvloop(app: str, host: str, port: int, streams: bool = False) -> None:
    try:
        import uvloop
    except ImportError:
        sys.exit("pollserve.peers: uvloop is not installed (pip install uvloop)")
    uvloop.run(serve_asyncio("uvloop", app, host, port, streams))


def run_pollserve_asyncio(app: str, host: str, port: int, streams: bool = False) -> None:
    from .loops import new_event_loop, run

    backend = new_event_loop()
    name = f"pollserve-asyncio/{backend.backend.name}"
    backend.close()
    run(serve_asyncio(name, app, host, port, streams))


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


RUNNERS: dict[str, Callable[..., None]] = {
    "asyncio": run_asyncio,
    "uvloop": run_uvloop,
    "pollserve-asyncio": run_pollserve_asyncio,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pollserve.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("peer", choices=PEERS)
    parser.add_argument("--app", choices=["hello", "echo"], default="hello")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--streams", action="store_true", help="asyncio streams instead of a Protocol")
    args = parser.parse_args(argv)
    if args.peer == "selectors":
        if args.streams:
            parser.error("--streams is for the asyncio loops")
        run_selectors(args.app, args.host, args.port)
    else:
        RUNNERS[args.peer](args.app, args.host, args.port, args.streams)
    return 0


if __name__ == "__main__":
    sys.exit(main())
