"""pollserve: a TCP server and library on one event loop over a pluggable polling backend."""

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
from .server import Connection, Server

__version__ = "0.1.0"

__all__ = [
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
    "__version__",
]
