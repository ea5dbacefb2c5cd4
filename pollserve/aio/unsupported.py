"""What pollserve's asyncio loop cannot give on this OS, refused with the reason.

On Windows the loop runs on select alone, and Winsock's ``select()`` watches sockets only
("fd_set structure (winsock.h)", Microsoft Learn): pipes, and so a child's pipes, cannot be
watched; CPython there has no ``AF_UNIX``; and asyncio's own Windows loops take no signal handlers
(``add_signal_handler`` raises ``NotImplementedError`` there too).  Each is refused when called,
with ``NotImplementedError`` naming why, as asyncio refuses what a loop lacks; docs/asyncio.md
lists them.
"""

from __future__ import annotations

import sys

WINDOWS_REASONS = {
    "signal handlers": "asyncio's loops on Windows take no signal handlers (use signal.signal in the main thread)",
    "UNIX sockets": "CPython on Windows has no AF_UNIX",
    "pipes": "Winsock's select(), the only backend there, watches sockets only",
    "subprocesses": "a child's pipes are not sockets, and Winsock's select(), the only backend there, "
    "watches sockets only",
}


def refuse_on_windows(feature: str) -> None:
    """Raise ``NotImplementedError`` naming why ``feature`` (a ``WINDOWS_REASONS`` key) is missing."""
    if sys.platform == "win32":
        raise NotImplementedError(
            f"{feature} are not available on pollserve's asyncio loop on Windows: {WINDOWS_REASONS[feature]}"
        )
