"""kqueue(2): macOS and the BSDs.  One filter per direction, changes batched.

Registering READ|WRITE means two kevents (EVFILT_READ, EVFILT_WRITE).  Changes
are not applied one system call at a time as ``selectors.KqueueSelector``
does: they are queued and handed to the kernel in the changelist of the next
``kevent()`` call, the one that waits anyway.

Quirks that shape this module (kqueue(2)):

* A change that fails comes back in the event list with ``EV_ERROR`` set and
  the errno in ``data`` -- if there is room, so the event list is sized for
  the whole changelist plus ``max_events``.
* FreeBSD's kern_event.c (kqueue_kevent) sets an error entry's flags to
  ``EV_ERROR`` alone, so the entry does not say which change failed; and a
  call that produced errors returns them at once, without waiting.
* Closing an fd removes its kevents, so an ``EV_DELETE`` queued before the
  close fails with ENOENT (or EBADF if the number is not reused yet).  ENOENT
  is the outcome the delete wanted and is ignored; any other error on an fd
  that is still registered becomes readiness of what is registered, so the
  handler's own recv()/send() meets the error (at worst a spurious wakeup).
* ``EV_EOF`` arrives with EVFILT_READ while data may still be buffered; it
  is reported as plain readiness and recv() drains the data before seeing
  the end of stream.
* A kqueue is not inherited by a forked child.
"""

from __future__ import annotations

import errno
import select

from .base import READ, WRITE, Backend


class KqueueBackend(Backend):
    name = "kqueue"

    #: at most this many events per poll(); the rest wait for the next call
    max_events = 1024

    def __init__(self) -> None:
        super().__init__()
        self._kqueue = select.kqueue()
        self._changes: list[select.kevent] = []

    def fileno(self) -> int:
        return self._kqueue.fileno()

    def _queue(self, fd: int, events: int, flags: int) -> None:
        if events & READ:
            self._changes.append(select.kevent(fd, select.KQ_FILTER_READ, flags))
        if events & WRITE:
            self._changes.append(select.kevent(fd, select.KQ_FILTER_WRITE, flags))

    def register(self, fd: int, events: int) -> None:
        self._add(fd, events)
        self._queue(fd, events, select.KQ_EV_ADD)

    def modify(self, fd: int, events: int) -> None:
        old = self._change(fd, events)
        self._queue(fd, old & ~events, select.KQ_EV_DELETE)
        self._queue(fd, events & ~old, select.KQ_EV_ADD)

    def unregister(self, fd: int) -> None:
        old = self._remove(fd)
        self._queue(fd, old, select.KQ_EV_DELETE)

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        if timeout is not None and timeout < 0:
            timeout = 0
        changes = self._changes
        if changes:
            self._changes = []
        kevents = self._kqueue.control(changes, self.max_events + len(changes), timeout)
        ready = []
        for kev in kevents:
            if kev.flags & select.KQ_EV_ERROR:
                # ENOENT: a delete whose kevent went away with close() -- the outcome
                # it wanted.  Anything else, for an fd still registered, is handed to
                # the handler as readiness so its own recv()/send() meets the error.
                if kev.data != errno.ENOENT:
                    events = self._interest.get(kev.ident, 0)
                    if events:
                        ready.append((kev.ident, events))
            elif kev.filter == select.KQ_FILTER_READ:
                ready.append((kev.ident, READ))
            else:
                ready.append((kev.ident, WRITE))
        self.polls += 1
        self.events_total += len(ready)
        return ready

    def close(self) -> None:
        super().close()
        self._changes.clear()
        self._kqueue.close()
