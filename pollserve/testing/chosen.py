"""What ``python -m pollserve.testing`` collects: the whole kit, on the backend its command line names
(the ``backend_class`` fixture of ``pollserve.testing.plugin``)."""

from __future__ import annotations

from pollserve.testing.contract import BackendContract
from pollserve.testing.end_to_end import LoopContract, ServerContract


class TestBackend(BackendContract):
    pass


class TestLoop(LoopContract):
    pass


class TestServer(ServerContract):
    pass
