"""``pollserve --app module:handler`` for ``async def handler(reader, writer)``: the command's own
server, with asyncio's streams over each of its connections.

The shape is ``asyncio.start_server``'s, and so are the objects: ``reader`` is an
``asyncio.StreamReader`` and ``writer`` an ``asyncio.StreamWriter``, made by asyncio's own
``StreamReaderProtocol``.  What carries them is not asyncio's server but pollserve's: the loop is
``AsyncioLoop`` (the core ``EventLoop`` with its asyncio face), and the accept path, the
``Connection`` transport and every layer stay those of the callback apps, so that a handler is
served with every feature the command has -- the fd budget, ``--max-connections``,
``--idle-timeout``, the PROXY and TLS layers, workers, systemd's sockets, the stats endpoint and
the loop's health figures -- by the code that serves the protocol apps, without a second copy.

Why asyncio's stream classes over pollserve's transport, and not the asyncio face's own server
(``loop.create_server``, with its ``StreamCore`` transport): the face's server has none of the
command's layers nor its counters, and pollserve's callback transport already has nearly all that
``StreamReaderProtocol`` and ``StreamWriter`` call -- ``write``, ``write_eof``, ``close``, ``abort``,
``is_closing``, ``get_extra_info``, ``pause_reading``/``resume_reading`` (the reader's flow control),
and ``pause_writing``/``resume_writing`` calls on the protocol (``drain()``'s).  It lacks two:
``writelines`` and ``can_write_eof``, which ``StreamTransport`` adds, its other methods being the
connection's (or the layer's) own, bound, so a write costs what it costs a protocol app.  Where the
two differ, asyncio's side is kept where a handler could notice: ``close()`` lingers (see the
README), so ``wait_closed()`` returns when the close is complete; a TLS connection keeps writing
after the client's close_notify (pollserve's TLS layer can half-close; asyncio's cannot, and its
stream protocol closes there), so a handler answers a request that came with the client's EOF.

The life of one connection's handler (``HandlerProtocol``): its task starts in
``connection_made``; its ``reader`` gets EOF when the client's EOF comes, when the server closes the
connection (the idle timeout: ``server_closing``), or at once when a shutdown starts; when the task
ends the connection is closed (flushed, then the lingering close), aborted if it was cancelled, and
an exception it raised is logged once, naming the client.  Invariant: every connection whose
protocol was made has at most one task, and once that task is done its connection is closing.

The drain of the whole server (``HandlerApp``, ``HandlerServer.shutdown``): stop accepting (the
clients queued in the backlog are accepted first, as for the protocol apps), read what already
arrived, give every reader EOF; the handlers end on their own within ``--shutdown-timeout`` or are
cancelled then; then the connections' own shutdown (flush, linger, abort at the deadline) takes the
time that is left.  Invariant: when the server reports drained, no handler task is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable
from typing import Any

from .aio.loop import AsyncioLoop
from .apps import StreamHandler, Transport
from .listeners import format_address
from .server import Server

log = logging.getLogger("pollserve")

#: after a shutdown cancelled the handlers (a second signal, or the loop's end), how long the loop
#: runs on so that they see their CancelledError and end: a handler that ignores it is left
SETTLE_TIMEOUT = 1.0


class StreamTransport(asyncio.Transport):
    """What ``StreamWriter`` is given: pollserve's connection (or the layer in front of it), with
    the two calls it lacks.  The others are its own bound methods, set on the instance (the
    ``LayeredTransport`` way), so a call goes straight to it."""

    def __init__(self, below: Transport) -> None:
        super().__init__()
        self._below = below
        self.write = below.write  # type: ignore[method-assign]
        self.write_eof = below.write_eof  # type: ignore[method-assign]
        self.close = below.close  # type: ignore[method-assign]
        self.abort = below.abort  # type: ignore[method-assign]
        self.is_closing = below.is_closing  # type: ignore[method-assign]
        self.pause_reading = below.pause_reading  # type: ignore[method-assign]
        self.resume_reading = below.resume_reading  # type: ignore[method-assign]
        self.is_reading = below.is_reading  # type: ignore[method-assign]
        self.get_write_buffer_size = below.get_write_buffer_size  # type: ignore[method-assign]
        self.set_write_buffer_limits = below.set_write_buffer_limits  # type: ignore[method-assign]
        self.get_extra_info = below.get_extra_info  # type: ignore[method-assign]

    def can_write_eof(self) -> bool:
        """pollserve's connection and its TLS layer both half-close."""
        return True

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._below.set_protocol(protocol)  # type: ignore[arg-type]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._below.get_protocol()  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"<StreamTransport over {self._below!r}>"


class HandlerProtocol(asyncio.StreamReaderProtocol):
    """One connection: asyncio's stream protocol, whose task is started and ended here."""

    def __init__(self, app: HandlerApp) -> None:
        self.app = app
        #: held here: StreamReaderProtocol keeps only a weak reference without a callback of its own
        self.reader = asyncio.StreamReader(loop=app.loop)
        super().__init__(self.reader, loop=app.loop)
        self.task: asyncio.Task[Any] | None = None
        self.peer = "an unknown client"
        #: the reader has had its EOF (the client's, or the server's: a shutdown, the idle timeout);
        #: bytes read after it are dropped
        self.eof_given = False
        #: connection_lost() came: the client is gone, or the close is complete
        self.lost = False
        self._face: StreamTransport | None = None

    def connection_made(self, transport: Any) -> None:
        face = self._face = StreamTransport(transport)
        super().connection_made(face)
        self.peer = format_address(face.get_extra_info("peername"))
        self.app.start(self, asyncio.StreamWriter(face, self, self.reader, self.app.loop))

    def data_received(self, data: bytes) -> None:
        # The reader itself, not StreamReaderProtocol's method: that one finds the same reader
        # through a weak reference, and the super() call and the lookup cost a request about
        # 1,000 instructions (callgrind).
        if not self.eof_given:
            self.reader.feed_data(data)

    def eof_received(self) -> bool:
        """The client's EOF: the reader's too.  The connection stays open for the reply, over TLS as
        well; it closes when the handler ends."""
        self.give_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        super().connection_lost(exc)

    def server_closing(self) -> None:
        """The server closes this connection itself (the idle timeout): the handler's reader ends
        now, and what it writes from here on is dropped."""
        self.give_eof()

    def give_eof(self) -> None:
        if not self.eof_given:
            self.eof_given = True
            self.reader.feed_eof()

    def handler_done(self, task: asyncio.Task[Any]) -> None:
        """The task ended: close the connection (abort it if the task was cancelled), and say why
        if the handler raised."""
        face = self._face
        assert face is not None
        if task.cancelled():
            face.abort()
        else:
            exc = task.exception()
            if exc is not None:
                self.app.failed(self, exc)
            face.close()
        self.app.finished(self)


class Drain(enum.Enum):
    """Where the server's handlers are in a shutdown."""

    #: serving: no shutdown yet
    SERVING = "serving"
    #: every reader has had EOF; the handlers end on their own until the deadline
    WAITING = "waiting"
    #: the deadline passed, or the server closed: the handlers still running were cancelled
    CANCELLED = "cancelled"
    #: the drain is over: the connections' own shutdown has the time left
    DONE = "done"


class HandlerApp:
    """The protocol factory of a handler app, and the handlers it has running.

    A new connection's handler starts whatever the state; one made while draining has its
    reader's EOF at once (after the bytes already read), as the others had at the start.
    """

    def __init__(self, handler: StreamHandler, loop: AsyncioLoop, name: str) -> None:
        self.handler = handler
        self.loop = loop
        self.name = name
        #: the connections whose task is running
        self.running: set[HandlerProtocol] = set()
        self.state = Drain.SERVING
        self._then: Callable[[float], Any] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._settling = False

    def __call__(self) -> HandlerProtocol:
        return HandlerProtocol(self)

    def start(self, protocol: HandlerProtocol, writer: asyncio.StreamWriter) -> None:
        """Call the handler and run what it returns as a task (named by the client, so that a slow
        one is named by the client in the loop's figures)."""
        try:
            coroutine = self.handler(protocol.reader, writer)
            if not asyncio.iscoroutine(coroutine):
                raise TypeError(f"the handler returned {type(coroutine).__name__}, not a coroutine")
        except Exception as exc:
            self.failed(protocol, exc)
            writer.close()
            return
        task = self.loop.create_task(coroutine, name=f"{self.name} {protocol.peer}")
        protocol.task = task
        self.running.add(protocol)
        task.add_done_callback(protocol.handler_done)
        if self.state is not Drain.SERVING:
            protocol.give_eof()

    def failed(self, protocol: HandlerProtocol, exc: BaseException) -> None:
        """Logged once, naming the client.  A connection error after the connection was lost is
        the client's leaving, not the app's bug: debug level, without the traceback."""
        if protocol.lost and isinstance(exc, ConnectionError):
            log.debug("%s for %s ended: %s: %s", self.name, protocol.peer, type(exc).__name__, exc)
            return
        log.error("app error in %s for %s; closing it", self.name, protocol.peer, exc_info=exc)

    def finished(self, protocol: HandlerProtocol) -> None:
        self.running.discard(protocol)
        if self.state is Drain.WAITING and not self.running:
            self._cancel_timer()
            self._done()

    # -- the drain ----------------------------------------------------------------------------

    def drain(self, timeout: float, then: Callable[[float], Any]) -> None:
        """Give every reader EOF; once the handlers have ended, or ``timeout`` seconds from now
        when those still running are cancelled, call ``then`` with the seconds left."""
        self.state = Drain.WAITING
        self._then = then
        self._deadline = self.loop.time() + timeout
        for protocol in list(self.running):
            protocol.give_eof()
        if self.running:
            self._timer = self.loop.call_later(timeout, self._expired)
        else:
            self._done()

    def _expired(self) -> None:
        self._timer = None
        log.warning("shutdown timeout: cancelling %d handlers still running", len(self.running))
        self.cancel()
        # The cancelled tasks take their step first (cancel() scheduled it), then the connections
        # are shut down with no time left: those still open are aborted.
        self.loop.call_soon(self._done)

    def cancel(self) -> None:
        self.state = Drain.CANCELLED
        for protocol in list(self.running):
            if protocol.task is not None:
                protocol.task.cancel()

    def _done(self) -> None:
        self.state = Drain.DONE
        then, self._then = self._then, None
        if then is not None:
            then(max(0.0, self._deadline - self.loop.time()))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """The server closes now (a second stop signal, or the process's end): cancel what still
        runs, and when the loop is not running, run it until the cancelled tasks have ended
        (within SETTLE_TIMEOUT), so that none is destroyed pending."""
        self._cancel_timer()
        self._then = None
        if self.running:
            self.cancel()
        if self.loop.is_running() or self.loop.is_closed() or self._settling:
            return
        tasks = [protocol.task for protocol in self.running if protocol.task is not None]
        if not tasks:
            return
        self._settling = True
        try:
            with contextlib.suppress(RuntimeError):  # a signal stopped the loop meanwhile
                self.loop.run_until_complete(asyncio.wait(tasks, timeout=SETTLE_TIMEOUT))
        finally:
            self._settling = False
        self.state = Drain.DONE


class HandlerServer(Server):
    """The command's server for a handler app: the protocol apps' server, whose shutdown lets the
    handlers end (``HandlerApp.drain``) before it closes their connections, and which refuses a
    client the backend cannot watch as it does on the core loop."""

    def __init__(self, handlers: HandlerApp, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handlers = handlers

    def _serve(self, sock: Any, peername: Any) -> None:
        try:
            super()._serve(sock, peername)
        except OSError as exc:
            # The asyncio face's add_reader() says a backend at its capacity (select's FD_SETSIZE)
            # with an OSError where the core raises CapacityError, which the server refuses.
            self._refuse(sock, str(exc))

    def shutdown(self, timeout: float, on_done: Callable[[], Any]) -> None:
        """Stop accepting, give the handlers EOF and up to ``timeout`` seconds to end; then the
        connections' shutdown within what is left of it."""
        self._accept_backlog()
        self.stop_accepting()
        for conn in list(self.connections):
            conn._read_pending()  # what a client sent before the shutdown reaches its handler first
        base = super().shutdown
        self.handlers.drain(timeout, lambda left: base(left, on_done))

    def close(self) -> None:
        super().close()
        self.handlers.close()
