"""The whole kit in one class: subclass ``BackendSuite`` and give it a ``backend_class`` fixture."""

from __future__ import annotations

from .contract import BackendContract
from .end_to_end import LoopContract, ServerContract


class BackendSuite(BackendContract, LoopContract, ServerContract):
    """The backend contract, then pollserve's loop and server running on the backend."""
