"""pollserve: a TCP server and library on one event loop over a pluggable polling backend.

The public names below are imported when first used (PEP 562): ``import pollserve.cli`` then runs
nothing but this file before the command's own entry point (pollserve.__main__), which is where a
Ctrl-C during the imports is turned into an exit status instead of a traceback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .aio import AsyncioLoop
    from .apps import Echo, Hello, Protocol, Transport, load_app
    from .backends import (
        READ,
        WRITE,
        Backend,
        BackendError,
        BackendUnavailableError,
        CapacityError,
        available_backends,
        create_backend,
        get_backend,
    )
    from .loop import EventLoop
    from .loops import new_event_loop, run
    from .server import Connection, Server

__version__ = "0.1.0"

#: the module that defines each public name
_MODULES = {
    "apps": "Echo Hello Protocol Transport load_app",
    "backends": "READ WRITE Backend BackendError BackendUnavailableError CapacityError available_backends "
    "create_backend get_backend",
    "aio": "AsyncioLoop",
    "loop": "EventLoop",
    "loops": "new_event_loop run",
    "server": "Connection Server",
}
_SOURCES = {name: module for module, names in _MODULES.items() for name in names.split()}


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{source}"), name)
    globals()[name] = value  # once: later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCES})


__all__ = [
    "AsyncioLoop",
    "READ",
    "WRITE",
    "Backend",
    "BackendError",
    "BackendUnavailableError",
    "CapacityError",
    "Connection",
    "Echo",
    "EventLoop",
    "Hello",
    "Protocol",
    "Server",
    "Transport",
    "available_backends",
    "create_backend",
    "get_backend",
    "load_app",
    "new_event_loop",
    "run",
    "__version__",
]
