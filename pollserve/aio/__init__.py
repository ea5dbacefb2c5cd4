"""asyncio on pollserve's loop: ``AsyncioLoop`` and the modules it is made of.

The entry points are ``pollserve.new_event_loop``, ``pollserve.run`` and the per-backend factories
of ``pollserve.loops``; ``docs/asyncio.md`` says how to use them and what differs from asyncio's own
loop.  ``AsyncioLoop`` is imported when first used (PEP 562): the stats code reads ``counts`` without
importing asyncio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loop import AsyncioLoop


def __getattr__(name: str) -> Any:
    if name != "AsyncioLoop":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = importlib.import_module(f"{__name__}.loop").AsyncioLoop
    globals()[name] = value
    return value


__all__ = ["AsyncioLoop"]
