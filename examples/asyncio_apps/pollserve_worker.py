"""gunicorn's uvicorn worker on pollserve's loop: gunicorn takes a worker class, not a loop, so the
class names the loop uvicorn makes in each worker process.

gunicorn -k pollserve_worker.PollserveWorker -w 2 where:app"""

from typing import Any, ClassVar

from uvicorn_worker import UvicornWorker


class PollserveWorker(UvicornWorker):
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {**UvicornWorker.CONFIG_KWARGS, "loop": "pollserve:new_event_loop"}
