"""The echo app, in a process that takes a second and a half to exit once its server has stopped, as
an app whose atexit handler flushes something: a worker on its way out, its loop closed and its signal
handlers restored, for that long."""

import atexit
import time

from pollserve.apps import Echo

atexit.register(time.sleep, 1.5)

__all__ = ["Echo"]
