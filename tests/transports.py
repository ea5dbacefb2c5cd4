"""A transport for sans-IO protocol tests: it records what the protocol writes and asks."""

from __future__ import annotations


class RecordingTransport:
    """Collects what the protocol writes: the protocol is IO-free, so this is all it talks to."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        #: what a real transport would still hold for a client that does not read
        self.unflushed = 0

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def get_write_buffer_size(self) -> int:
        return self.unflushed
