"""asyncio on pollserve's loop: ``AsyncioLoop`` and the modules it is made of.

The entry points are ``pollserve.new_event_loop``, ``pollserve.run`` and the per-backend factories
of ``pollserve.loops``; ``docs/asyncio.md`` says how to use them and what differs from asyncio's own loop.
"""

from __future__ import annotations

from .loop import AsyncioLoop

__all__ = ["AsyncioLoop"]
