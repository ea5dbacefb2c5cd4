"""Protocols: the application layer, with no socket code in it.

The shape is asyncio's ``Protocol`` so users already know it: the server calls
``connection_made(transport)``, ``data_received(data)`` for every chunk,
``eof_received()`` when the peer shuts its side, and ``connection_lost(exc)``
once at the end.  The transport offers ``write()``, ``write_eof()``, ``close()``,
``abort()``, ``get_extra_info()``, ``pause_reading()``/``resume_reading()``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from typing import Protocol as _TypingProtocol

if TYPE_CHECKING:
    import asyncio


class Transport(_TypingProtocol):
    """What a protocol may call on its connection (implemented by server.Connection)."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def is_closing(self) -> bool: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_reading(self) -> bool: ...
    def get_write_buffer_size(self) -> int: ...
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...
    def set_protocol(self, protocol: Protocol) -> None: ...
    def get_protocol(self) -> Protocol: ...


class LayeredTransport:
    """A transport made of another's bound methods: what a layer (TLS, the PROXY header) hands the
    app.  Each call goes straight to the object below, so it costs what it costs without the layer;
    a subclass overrides what the layer changes (``get_extra_info``, say)."""

    METHODS = (
        "write",
        "write_eof",
        "close",
        "abort",
        "is_closing",
        "pause_reading",
        "resume_reading",
        "is_reading",
        "get_write_buffer_size",
        "set_write_buffer_limits",
        "set_protocol",
        "get_protocol",
    )
    __slots__ = ("_below", *METHODS)

    write: Callable[[bytes | bytearray | memoryview], None]
    write_eof: Callable[[], None]
    close: Callable[[], None]
    abort: Callable[[], None]
    is_closing: Callable[[], bool]
    pause_reading: Callable[[], None]
    resume_reading: Callable[[], None]
    is_reading: Callable[[], bool]
    get_write_buffer_size: Callable[[], int]
    set_write_buffer_limits: Callable[..., None]
    set_protocol: Callable[[Protocol], None]
    get_protocol: Callable[[], Protocol]

    def __init__(self, below: Any) -> None:
        self._below = below
        for name in self.METHODS:
            setattr(self, name, getattr(below, name))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._below.get_extra_info(name, default)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} over {self._below!r}>"


class Protocol:
    """Base class for applications; override what you need."""

    transport: Transport

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        """A chunk as recv() returned it: message boundaries are not preserved."""

    def eof_received(self) -> bool | None:
        """The peer will send no more.  Return True to keep writing; otherwise the server closes."""
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Called once: exc is None on a normal close; otherwise the OSError that ended it, or the
        exception the protocol itself raised in a callback."""

    def pause_writing(self) -> None:
        """The transport's write buffer went over the high-water mark (it also stops reading)."""

    def resume_writing(self) -> None:
        """The write buffer drained below the low-water mark."""


HELLO_REPLY = b"Hello world\n"


class Hello(Protocol):
    """The classic lesson's server: one ``Hello world\\n`` for every chunk received."""

    def data_received(self, data: bytes) -> None:
        self.transport.write(HELLO_REPLY)


class Echo(Protocol):
    """Sends back every byte it receives."""

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


BUILTIN_APPS: dict[str, Callable[[], Protocol]] = {"hello": Hello, "echo": Echo}

ProtocolFactory = Callable[[], Protocol]
#: ``async def handler(reader, writer)``, the shape ``asyncio.start_server`` takes (pollserve.handlers)
StreamHandler = Callable[["asyncio.StreamReader", "asyncio.StreamWriter"], Awaitable[None]]

#: what --app takes besides the built-ins, as the one-line errors say it
HANDLER_SHAPE = "async def handler(reader, writer)"
EXPECTED = f"--app takes {HANDLER_SHAPE}, or a protocol class or factory"


class AppError(Exception):
    """An app spec that cannot be loaded; the message is meant for the user as it is."""


def load_app(spec: str) -> ProtocolFactory | StreamHandler:
    """Resolve ``hello``, ``echo`` or ``MODULE:ATTRIBUTE`` to a protocol factory or a stream handler
    (``is_stream_handler`` tells which); AppError for anything else."""
    if spec in BUILTIN_APPS:
        return BUILTIN_APPS[spec]
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise AppError(f"unknown app {spec!r}: use {', '.join(BUILTIN_APPS)} or MODULE:FACTORY")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import runs arbitrary code: any error is the user's to see
        raise AppError(f"cannot import module {module_name!r} for app {spec!r}: {type(exc).__name__}: {exc}") from None
    app: Any = module
    for part in attribute.split("."):
        try:
            app = getattr(app, part)
        except AttributeError:
            raise AppError(f"module {module_name!r} has no attribute {attribute!r}") from None
    check_app(spec, app)
    return app


def _unwrapped(app: object) -> object:
    """What a ``functools.partial`` (of a partial...) calls in the end."""
    while isinstance(app, functools.partial):
        app = app.func
    return app


def is_stream_handler(app: object) -> bool:
    """A coroutine function, a ``functools.partial`` of one, or an object whose ``__call__`` is
    ``async def``: served as ``asyncio.start_server`` serves its handler.  A class is a protocol
    class, whatever its instances' ``__call__``."""
    target = _unwrapped(app)
    if inspect.iscoroutinefunction(target):
        return True
    if isinstance(target, type) or not callable(target):
        return False
    return inspect.iscoroutinefunction(type(target).__call__)


def _callable_with(app: object, count: int) -> bool:
    """Whether ``app`` takes ``count`` positional arguments; True when its signature cannot be read
    (a builtin's): it is then called and any error is the app's, as before."""
    try:
        signature = inspect.signature(app)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(*([None] * count))
    except TypeError:
        return False
    return True


def check_app(spec: str, app: object) -> None:
    """One of the shapes --app serves, else AppError saying what was expected, in one line: a
    handler must take (reader, writer), a protocol class or factory no argument at all."""
    if not callable(app):
        raise AppError(f"app {spec!r} is not callable ({type(app).__name__}): {EXPECTED}")
    if inspect.isasyncgenfunction(_unwrapped(app)):
        raise AppError(f"app {spec!r} is an async generator function, not a coroutine function: {EXPECTED}")
    if is_stream_handler(app):
        if not _callable_with(app, 2):
            raise AppError(f"app {spec!r} cannot be called with (reader, writer): a handler is {HANDLER_SHAPE}")
        return
    if not _callable_with(app, 0):
        raise AppError(
            f"app {spec!r} is neither a coroutine function nor callable without arguments, as a protocol "
            f"factory is: {EXPECTED}"
        )
