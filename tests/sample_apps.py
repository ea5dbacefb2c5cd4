"""User apps loaded by the end-to-end tests through ``--app sample_apps:NAME``."""

import os
import time

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


class FdHog(Protocol):
    """Holds two extra fds per connection: the fd budget planned at start cannot foresee it, so
    accept() meets EMFILE, the last line of defence behind the connection limit."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        import os

        self.fds = []
        for _ in range(2):
            try:
                self.fds.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:  # EMFILE: keep what it got; the next accept() meets the limit
                break

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"Hello world\n")

    def connection_lost(self, exc) -> None:
        import os

        for fd in self.fds:
            os.close(fd)


def not_a_protocol() -> int:
    """A factory that returns something that is not a protocol."""
    return 42


class FailsOnData(Protocol):
    """Raises in data_received: the server closes this connection and logs the exception."""

    def data_received(self, data: bytes) -> None:
        raise ValueError("app bug")


class ReplyPeername(Protocol):
    """Answers every chunk with ``PEER_HOST PEER_PORT SOCK_HOST SOCK_PORT\\n`` as the app sees
    them: behind --proxy-protocol, the addresses the PROXY header named."""

    def data_received(self, data: bytes) -> None:
        peer = self.transport.get_extra_info("peername")
        sock = self.transport.get_extra_info("sockname")
        self.transport.write(f"{peer[0]} {peer[1]} {sock[0]} {sock[1]}\n".encode())


class WhichBuild(Protocol):
    """Replies ``PID BUILD`` for any chunk: which process served it, and which pollserve build that
    process runs (``compiled`` or ``pure Python``), as its workers see it from the inside."""

    def data_received(self, data: bytes) -> None:
        from pollserve import compiled

        self.transport.write(f"{os.getpid()} {compiled.build()}\n".encode())


#: how long Sleepy holds the loop on every chunk
SLEEPY_SECONDS = 0.3


class Sleepy(Protocol):
    """Blocks the loop 300 ms on every chunk, as an app calling a slow library would, then echoes it."""

    def data_received(self, data: bytes) -> None:
        time.sleep(SLEEPY_SECONDS)
        self.transport.write(data)


class Spin(Protocol):
    """Burns the CPU 20 ms on every chunk, then echoes it: steady input keeps the loop saturated."""

    def data_received(self, data: bytes) -> None:
        deadline = time.perf_counter() + 0.02
        while time.perf_counter() < deadline:
            pass
        self.transport.write(data)


class RunsHelper(Protocol):
    """Starts a helper program with ``os.system`` on each request, as an app that shells out does,
    and answers with the helper's pid once it has written it to the file HELPER_PIDS names: the
    helper (``sleep 30``) inherits whatever fds the server lets it."""

    def data_received(self, data: bytes) -> None:
        pids = os.environ["HELPER_PIDS"]
        os.system(f"sleep 30 </dev/null >/dev/null 2>&1 & echo $! >> {pids}")
        with open(pids) as file:
            self.transport.write(file.read().split()[-1].encode() + b"\n")
