"""Backends from other packages: the ``pollserve.backends`` entry points, and ``MODULE:CLASS`` specs.

Only the registry (``backends/__init__.py``) uses this module; it decides what a
name means.  Nothing here prints: a plugin that cannot be used raises
``PluginError``, whose message is one line naming the plugin and its package,
and the caller decides where the line goes.  Importing a plugin runs its code,
so any exception it raises becomes that line, never a traceback.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from dataclasses import dataclass

from .base import Backend, BackendUnavailableError

#: the entry-point group a package declares its backends in: ``name = "module:Class"``
GROUP = "pollserve.backends"


class PluginError(BackendUnavailableError):
    """A plugin or a ``MODULE:CLASS`` spec that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class Plugin:
    """A backend some installed package declares, not imported yet."""

    name: str
    #: "module:Class", as the entry point says
    value: str
    #: the declaring distribution, "name version"
    package: str

    def describe(self) -> str:
        return f"backend plugin {self.name!r} ({self.value}) of package {self.package}"

    def load(self) -> type[Backend]:
        """Import the plugin's module and check the class: a Backend whose name is the entry point's."""
        try:
            cls = load_class(self.value)
        except PluginError as exc:
            raise PluginError(f"{self.describe()}: {exc}") from None
        if cls.name != self.name:
            raise PluginError(
                f"{self.describe()}: its class is named {cls.name!r}; the entry point and the class's "
                f"name attribute must agree"
            )
        return cls


@functools.cache
def declared() -> tuple[Plugin, ...]:
    """Every backend the installed packages declare, read once per process and imported not at all."""
    found = []
    for entry in importlib.metadata.entry_points(group=GROUP):
        dist = entry.dist
        package = f"{dist.name} {dist.version}" if dist is not None else "(unknown package)"
        found.append(Plugin(entry.name, entry.value, package))
    return tuple(found)


def load_class(spec: str) -> type[Backend]:
    """Import ``MODULE:CLASS`` (the class may be ``Outer.Inner``) and check that it is a Backend."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise PluginError(f"{spec!r} is not MODULE:CLASS")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # importing runs the plugin's code: whatever it raises is the user's to see
        raise PluginError(f"cannot import module {module_name!r}: {one_line(exc)}") from None
    found: object = module
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise PluginError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not (isinstance(found, type) and issubclass(found, Backend)):
        raise PluginError(f"{spec} is not a subclass of pollserve.backends.Backend")
    if not found.name or not isinstance(found.name, str):
        raise PluginError(f"{spec} has no name: set its class attribute name")
    return found


def one_line(exc: BaseException) -> str:
    """The exception's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
