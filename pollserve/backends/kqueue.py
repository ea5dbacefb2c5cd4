"""kqueue(2): macOS and the BSDs.  One filter per direction, changes batched.

Registering READ|WRITE means two kevents (EVFILT_READ, EVFILT_WRITE).  Changes
are not applied one system call at a time as ``selectors.KqueueSelector``
does: they are queued and handed to the kernel in the changelist of the next
``kevent()`` call, the one that waits anyway.

Quirks that shape this module (kqueue(2)):

* A change that fails comes back in the event list with ``EV_ERROR`` set and
  the errno in ``data`` -- if there is room, so the event list is sized for
  the whole changelist plus ``max_events``.
* FreeBSD's kern_event.c (kqueue_kevent) copies the failed change into the
  event list and sets its flags to ``EV_ERROR`` alone: the entry keeps the
  ident and the filter, but no longer says whether it was an add or a
  delete.  Our record of the interest tells: a filter we want was an add.
  A call that produced errors returns them at once, without waiting.
* Closing an fd removes its kevents, so an ``EV_DELETE`` queued before the
  close fails with ENOENT (or EBADF if the number is not reused yet): the
  outcome the delete wanted, ignored.
* An add the kernel refuses (ENOMEM: "The kernel failed to allocate enough
  memory for the kernel queue") would leave a live fd without events for
  good.  It is reported once as readiness of what is registered, so the
  handler's own recv()/send() runs, and queued again for the next
  ``kevent()`` call; while the kernel keeps refusing, each call returns at
  once.  An add that fails with EBADF (the fd was closed before the change
  reached the kernel) is reported the same way but not retried.  A delete
  that fails on an open fd is retried too, silently.
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
        ready: list[tuple[int, int]] = []
        for kev in kevents:
            if kev.flags & select.KQ_EV_ERROR:
                self._change_failed(kev, ready)
            elif kev.filter == select.KQ_FILTER_READ:
                ready.append((kev.ident, READ))
            else:
                ready.append((kev.ident, WRITE))
        return ready

    def _change_failed(self, kev: select.kevent, ready: list[tuple[int, int]]) -> None:
        fd = kev.ident
        events = self._interest.get(fd, 0)
        error = kev.data
        if events & (READ if kev.filter == select.KQ_FILTER_READ else WRITE):
            ready.append((fd, events))
            if error != errno.EBADF:
                self._changes.append(select.kevent(fd, kev.filter, select.KQ_EV_ADD))
        elif error not in (errno.ENOENT, errno.EBADF):
            self._changes.append(select.kevent(fd, kev.filter, select.KQ_EV_DELETE))

    def close(self) -> None:
        super().close()
        self._changes.clear()
        self._kqueue.close()
