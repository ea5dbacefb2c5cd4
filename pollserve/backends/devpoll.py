"""/dev/poll: Solaris and illumos.  Like poll(2), but the kernel keeps the interest set.

CPython's devpoll object sizes itself from RLIMIT_NOFILE when it is created:
raising the limit afterwards may make it return an incomplete list, lowering
it makes it fail (CPython docs, select.devpoll).  So raise the fd limit before
the backend is created -- pollserve creates it at start-up.
"""

from __future__ import annotations

import select
from typing import Any

from .poll import PollBackend


class DevpollBackend(PollBackend):
    name = "devpoll"

    @staticmethod
    def _create() -> Any:
        return select.devpoll()

    def close(self) -> None:
        poller = self._poller
        super().close()
        if poller is not None:
            poller.close()
