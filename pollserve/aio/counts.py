"""What the asyncio face's transports count, for the loop's stats snapshot (``AsyncioLoop.stats()``).

Slots, updated by every transport of the loop on its own path: a read adds to ``bytes_in``, a send
to ``bytes_out``, a buffered write to ``write_buffer_bytes`` (and its flush takes it off).  A server's
accepted connection and a client's connected one are both connections of the loop: the snapshot's
``connections_open`` counts every one.
"""

from __future__ import annotations


class ConnectionCounts:
    """One loop's connections and bytes, every asyncio transport on it together."""

    __slots__ = (
        "connections_open",
        "connections_accepted",
        "connections_connected",
        "connections_closed",
        "connections_refused",
        "bytes_in",
        "bytes_out",
        "write_buffer_bytes",
    )

    def __init__(self) -> None:
        #: stream transports not yet closed (server and client side)
        self.connections_open = 0
        #: accepted by the loop's servers, and connected by create_connection and the like
        self.connections_accepted = 0
        self.connections_connected = 0
        self.connections_closed = 0
        #: accepted, then closed at once (a backend at its capacity, say): the server went on
        self.connections_refused = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.write_buffer_bytes = 0
