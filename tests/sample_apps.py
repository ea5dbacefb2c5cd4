"""User apps loaded by the end-to-end tests through ``--app sample_apps:NAME``."""

from pollserve import Protocol


class Upper(Protocol):
    """Replies with the chunk in upper case: proves a user's protocol is what runs."""

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())


#: bytes BigReply sends: far more than the socket buffers hold, so most is buffered
BIG_REPLY_SIZE = 8 << 20


class BigReply(Protocol):
    """Answers any chunk with BIG_REPLY_SIZE bytes of a repeating pattern."""

    def data_received(self, data: bytes) -> None:
        self.transport.write(big_reply())


def big_reply() -> bytes:
    return bytes(range(256)) * (BIG_REPLY_SIZE // 256)


def make_upper() -> Upper:
    return Upper()


NOT_CALLABLE = 42
