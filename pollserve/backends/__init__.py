"""The registry of backends: which exist, which are usable here, which `auto` picks."""

from __future__ import annotations

from .base import (
    READ,
    WRITE,
    AlreadyRegisteredError,
    Backend,
    BackendError,
    BackendUnavailableError,
    CapacityError,
    NotRegisteredError,
)
from .devpoll import DevpollBackend
from .epoll import EpollBackend
from .kqueue import KqueueBackend
from .poll import PollBackend
from .select import SelectBackend

__all__ = [
    "READ",
    "WRITE",
    "AlreadyRegisteredError",
    "Backend",
    "BackendError",
    "BackendUnavailableError",
    "CapacityError",
    "NotRegisteredError",
    "BACKENDS",
    "available_backends",
    "auto_backend",
    "get_backend",
    "create_backend",
]

#: every backend pollserve knows, in the order `auto` prefers them: the ones
#: whose cost grows with ready fds first, then poll, then select (the same
#: reasoning as selectors.DefaultSelector).
BACKENDS: dict[str, type[Backend]] = {
    cls.name: cls for cls in (EpollBackend, KqueueBackend, DevpollBackend, PollBackend, SelectBackend)
}


def available_backends() -> list[str]:
    """Names of the backends that can actually be created here, best first."""
    return [name for name, cls in BACKENDS.items() if cls.is_available()]


def auto_backend() -> type[Backend]:
    """The best backend available here."""
    for cls in BACKENDS.values():
        if cls.is_available():
            return cls
    raise BackendUnavailableError("no polling backend works on this system")  # pragma: no cover


def get_backend(name: str) -> type[Backend]:
    """The backend class for a name, or "auto"; a clear error if it is unknown or missing here."""
    if name == "auto":
        return auto_backend()
    cls = BACKENDS.get(name)
    if cls is None:
        raise BackendUnavailableError(f"unknown backend {name!r} (known: auto, {', '.join(BACKENDS)})")
    if not cls.is_available():
        raise BackendUnavailableError(
            f"backend {name!r} is not available on this system (available: {', '.join(available_backends())})"
        )
    return cls


def create_backend(name: str = "auto") -> Backend:
    """A new backend instance, chosen by name or automatically."""
    return get_backend(name)()
