"""An app whose module exits the process when imported while the file CRASH_MARKER names exists:
a worker started then crashes at start, as one with a broken deploy would."""

import os

from pollserve.apps import Hello

if os.path.exists(os.environ.get("CRASH_MARKER", "/nonexistent")):
    raise SystemExit(3)

__all__ = ["Hello"]
