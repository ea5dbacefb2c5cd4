"""Pausing and resuming reading, as asyncio's read transports do it, for the stream and pipe
transports: the transport says how its fd is watched (``_start_reading``/``_stop_reading``), this
says when."""

from __future__ import annotations

import logging

logger = logging.getLogger("asyncio")


class PausableReading:
    """``is_reading``/``pause_reading``/``resume_reading`` over a transport's ``_closing``,
    ``_paused``, ``_loop`` and its ``_start_reading``/``_stop_reading``."""

    _closing: bool
    _paused: bool

    def is_reading(self) -> bool:
        return not self._closing and not self._paused

    def pause_reading(self) -> None:
        if not self.is_reading():
            return
        self._paused = True
        self._stop_reading()
        if self._loop.get_debug():
            logger.debug("%r pauses reading", self)

    def resume_reading(self) -> None:
        if self._closing or not self._paused:
            return
        self._paused = False
        self._start_reading()
        if self._loop.get_debug():
            logger.debug("%r resumes reading", self)
