"""Protocols: the application layer, with no socket code in it.

The shape is asyncio's ``Protocol`` so users already know it: the server calls
``connection_made(transport)``, ``data_received(data)`` for every chunk,
``eof_received()`` when the peer shuts its side, and ``connection_lost(exc)``
once at the end.  The transport offers ``write()``, ``write_eof()``, ``close()``,
``abort()``, ``get_extra_info()``, ``pause_reading()``/``resume_reading()``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any
from typing import Protocol as _TypingProtocol


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


class AppError(Exception):
    """An app spec that cannot be loaded; the message is meant for the user as it is."""


def load_app(spec: str) -> ProtocolFactory:
    """Resolve ``hello``, ``echo`` or ``MODULE:FACTORY`` to a protocol factory."""
    if spec in BUILTIN_APPS:
        return BUILTIN_APPS[spec]
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise AppError(f"unknown app {spec!r}: use {', '.join(BUILTIN_APPS)} or MODULE:FACTORY")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import runs arbitrary code: any error is the user's to see
        raise AppError(f"cannot import module {module_name!r} for app {spec!r}: {type(exc).__name__}: {exc}") from None
    factory: Any = module
    for part in attribute.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise AppError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(factory):
        raise AppError(f"app {spec!r} is not callable: it must be a protocol class or factory")
    return factory
