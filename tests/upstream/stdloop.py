"""asyncio's own loop on a given selector: the reference the harness must pass 100% on.

Factories for the worker (its folder is first on its path): ``--loop stdloop:epoll``.
"""

from __future__ import annotations

import asyncio
import selectors


def epoll() -> asyncio.AbstractEventLoop:
    """The standard loop on the real epoll selector (Linux)."""
    return asyncio.SelectorEventLoop(selectors.EpollSelector())


def poll() -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(selectors.PollSelector())


def select() -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(selectors.SelectSelector())
