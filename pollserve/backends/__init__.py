"""The registry of backends: the built-ins, the ones other packages plug in, and which `auto` picks.

Third-party backends enter here and nowhere else.  A package declares one in
the entry-point group ``pollserve.backends`` (``name = "module:Class"``), and a
user may name any Backend subclass as ``MODULE:CLASS``.  The rules keep
installing a package from ever being a surprise:

* The entry points are read once, and only when a name that is not built in
  is looked up, the backends are listed, or ``auto`` is told to consider
  plugins: ``--backend epoll`` starts without reading them.
* Looking a plugin up imports that plugin only; listing imports them all.
* A built-in name always means the built-in; a plugin declaring one is
  ignored, and listing says so.
* ``auto`` picks among the built-ins, unless the user names plugins in
  POLLSERVE_AUTO_PLUGINS and a named plugin offers itself
  (``auto_candidate = True``) and works here.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass

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
from .plugins import PluginError, declared, load_class, one_line
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
    "PluginError",
    "BACKENDS",
    "AUTO_PLUGINS_ENV",
    "BackendInfo",
    "available_backends",
    "auto_backend",
    "get_backend",
    "create_backend",
    "known_names",
    "list_backends",
]

#: every backend pollserve ships, in the order `auto` prefers them: the ones
#: whose cost grows with ready fds first, then poll, then select (the same
#: reasoning as selectors.DefaultSelector).
BACKENDS: dict[str, type[Backend]] = {
    cls.name: cls for cls in (EpollBackend, KqueueBackend, DevpollBackend, PollBackend, SelectBackend)
}

#: plugins `auto` may try before the built-ins, comma-separated, best first
AUTO_PLUGINS_ENV = "POLLSERVE_AUTO_PLUGINS"

#: names no plugin can take
RESERVED = frozenset(["auto", *BACKENDS])


@dataclass(frozen=True)
class BackendInfo:
    """One backend as ``pollserve backends`` lists it."""

    name: str
    #: "built-in", or the package that declares the plugin ("name version")
    origin: str
    #: None when the plugin cannot be loaded
    backend: type[Backend] | None
    available: bool


def available_backends() -> list[str]:
    """Names of the built-in backends that can actually be created here, best first."""
    return [name for name, cls in BACKENDS.items() if cls.is_available()]


def auto_plugin_names() -> list[str]:
    """The plugins the user allows `auto` to pick (POLLSERVE_AUTO_PLUGINS), best first."""
    return [name.strip() for name in os.environ.get(AUTO_PLUGINS_ENV, "").split(",") if name.strip()]


def auto_backend() -> type[Backend]:
    """The best backend here: a plugin the user named in POLLSERVE_AUTO_PLUGINS that offers itself
    to auto and works here, else the best built-in."""
    for name in auto_plugin_names():
        cls = _plugin_class(name)
        if not cls.auto_candidate:
            raise BackendUnavailableError(
                f"{AUTO_PLUGINS_ENV} names {name!r}, which does not offer itself to auto; use it by name instead"
            )
        if _works_here(cls, f"backend {name!r}"):
            return cls
    for cls in BACKENDS.values():
        if cls.is_available():
            return cls
    raise BackendUnavailableError("no polling backend works on this system")  # pragma: no cover


def get_backend(name: str) -> type[Backend]:
    """The backend class for "auto", a built-in or plugin name, or MODULE:CLASS; a clear one-line
    error if it is unknown, cannot be loaded or does not work here."""
    if name == "auto":
        return auto_backend()
    cls = BACKENDS.get(name)
    if cls is None:
        cls = load_class(name) if ":" in name else _plugin_class(name)
    if not _works_here(cls, f"backend {name!r}"):
        problem = creation_error(cls)
        why = f"cannot be created here: {problem}" if problem else "is not available on this system"
        raise BackendUnavailableError(f"backend {name!r} {why} (available: {', '.join(available_backends())})")
    return cls


def creation_error(cls: type[Backend]) -> str:
    """Why the backend cannot be created here, when an OSError says (a plugin's own failure, or a
    sandbox refusing the system call), or ""."""
    try:
        cls().close()
    except OSError as exc:
        return one_line(exc)
    except Exception:  # is_available() said no: a missing primitive (AttributeError) needs no detail
        return ""
    return ""


def create_backend(name: str = "auto") -> Backend:
    """A new backend instance, chosen by name or automatically."""
    return get_backend(name)()


def known_names() -> list[str]:
    """auto, the built-ins, then the names plugins declare (none of them imported)."""
    names = ["auto", *BACKENDS]
    names.extend(sorted({plugin.name for plugin in declared()} - RESERVED))
    return names


def list_backends() -> tuple[list[BackendInfo], list[str]]:
    """Every backend, built-ins first, with each plugin imported to see whether it works here;
    and one line for each plugin that cannot be used (broken, declaring a built-in name, or a
    name another package declares too)."""
    rows = [BackendInfo(name, "built-in", cls, cls.is_available()) for name, cls in BACKENDS.items()]
    problems = []
    plugins = sorted(declared(), key=lambda plugin: (plugin.name, plugin.package))
    declarations = collections.Counter(plugin.name for plugin in plugins)
    for plugin in plugins:
        if plugin.name in RESERVED:
            problems.append(
                f"{plugin.describe()} is ignored: {plugin.name!r} means the built-in backend "
                f"(--backend {plugin.value} runs the plugin)"
            )
            continue
        if declarations[plugin.name] > 1:
            problems.append(
                f"{plugin.describe()} is ignored: other packages declare {plugin.name!r} too "
                f"(--backend {plugin.value} runs this one)"
            )
            rows.append(BackendInfo(plugin.name, plugin.package, None, False))
            continue
        try:
            cls = plugin.load()
            available = _works_here(cls, plugin.describe())
        except PluginError as exc:
            problems.append(str(exc))
            rows.append(BackendInfo(plugin.name, plugin.package, None, False))
            continue
        rows.append(BackendInfo(plugin.name, plugin.package, cls, available))
    return rows, problems


def _plugin_class(name: str) -> type[Backend]:
    """The class of the plugin declared under name, importing that plugin only."""
    matches = sorted(
        (plugin for plugin in declared() if plugin.name == name and name not in RESERVED),
        key=lambda plugin: plugin.package,
    )
    if not matches:
        raise BackendUnavailableError(f"unknown backend {name!r} (known: {', '.join(known_names())}; or MODULE:CLASS)")
    if len(matches) > 1:
        raise PluginError(
            f"backend plugin {name!r} is declared by several packages "
            f"({', '.join(f'{plugin.package}: {plugin.value}' for plugin in matches)}); name one as MODULE:CLASS"
        )
    return matches[0].load()


def _works_here(cls: type[Backend], label: str) -> bool:
    """cls.is_available(), with a plugin's own exception turned into one line."""
    try:
        return bool(cls.is_available())
    except Exception as exc:  # a plugin's is_available() is its own code
        raise PluginError(f"{label}: is_available() failed: {one_line(exc)}") from None
