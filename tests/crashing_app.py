"""An app whose module exits the process when imported while the file CRASH_MARKER names exists:
a worker started then crashes at start, as one with a broken deploy would.  A marker that holds a
signal's number kills the process with that signal instead (a real-time one has no name)."""

import os

from pollserve.apps import Hello

marker = os.environ.get("CRASH_MARKER", "/nonexistent")
if os.path.exists(marker):
    with open(marker) as file:
        content = file.read().strip()
    if content.isdigit():
        os.kill(os.getpid(), int(content))
    raise SystemExit(3)

__all__ = ["Hello"]
