"""The public API takes what asyncio takes, in the build under test as in the pure one.

The compiled build checks its annotations at run time, so a narrow annotation (``int`` for a size,
``list`` for hosts) refused calls the pure build and asyncio accept: ``set_write_buffer_limits(1e6)``,
``Server(high_water=65536.0)``, a tuple of hosts, ``start()`` with a tuple of sockets.  Each case
here runs against whichever build the suite tests (CI runs the suite on both); a value no reading
can make sense of is the same ValueError or TypeError, naming the argument, in both.
"""

from __future__ import annotations

import math
import re
import socket
import sys
from collections.abc import Callable, Iterator

import pytest
from clients import connect, exchange, recv_exactly, recv_until_eof
from conftest import AVAILABLE, TESTED_BUILD
from inprocess import in_loop, serving, wait_until

from pollserve.apps import Echo, Protocol
from pollserve.loop import EventLoop
from pollserve.server import Server

BACKEND = AVAILABLE[0]


def loopback_hosts() -> Iterator[str]:
    yield "127.0.0.1"


#: keyword arguments to Server (made fresh for each case: a generator is used up once), and the
#: attributes they give it; every server here listens on 127.0.0.1, port 0, unless the case says
ACCEPTED: list[tuple[str, Callable[[], dict], dict]] = [
    ("float sizes", lambda: {"high_water": 65536.0}, {"high_water": 65536, "low_water": 16384}),
    ("floats rounded down", lambda: {"high_water": 1e6, "low_water": 1000.9}, {"high_water": 10**6, "low_water": 1000}),
    ("no mark at all", lambda: {"high_water": math.inf}, {"high_water": sys.maxsize}),
    ("int low, default high", lambda: {"low_water": 1024}, {"high_water": 65536, "low_water": 1024}),
    ("float limit", lambda: {"max_connections": 100.0}, {"max_connections": 100}),
    ("bool as int", lambda: {"max_connections": True}, {"max_connections": 1}),
    ("no limit", lambda: {"max_connections": None}, {"max_connections": None}),
    ("float counts", lambda: {"backlog": 128.0, "accept_batch": 8.0}, {"backlog": 128, "accept_batch": 8}),
    (
        "int seconds",
        lambda: {"linger_timeout": 1, "flush_timeout": 30, "idle_timeout": 5},
        {"linger_timeout": 1.0, "flush_timeout": 30.0, "idle_timeout": 5.0},
    ),
    ("idle timeout 0 is off", lambda: {"idle_timeout": 0}, {"idle_timeout": None}),
    ("port as digits", lambda: {"port": "0"}, {"port": 0}),
    ("port None is any", lambda: {"port": None}, {"port": 0}),
    ("hosts in a tuple", lambda: {"host": ("127.0.0.1",)}, {"host": ["127.0.0.1"]}),
    ("hosts in a list", lambda: {"host": ["127.0.0.1"]}, {"host": ["127.0.0.1"]}),
    ("hosts from a generator", lambda: {"host": loopback_hosts()}, {"host": ["127.0.0.1"]}),
]


@pytest.mark.parametrize(("make_kwargs", "expected"), [case[1:] for case in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_server_takes_what_asyncio_takes(make_kwargs: Callable[[], dict], expected: dict) -> None:
    kwargs = {"host": "127.0.0.1", "port": 0, **make_kwargs()}
    loop = EventLoop(BACKEND)
    with serving(BACKEND, Echo, loop=loop, server=Server(loop, Echo, **kwargs)) as server:
        assert {name: getattr(server, name) for name in expected} == expected
        assert exchange(server.address, b"ping", 4) == b"ping"


def test_start_takes_any_iterable_of_sockets_or_one_socket() -> None:
    """asyncio's create_server takes ``sock``, one socket; start() takes one, or any iterable."""
    for wrap in (tuple, list, iter, lambda socks: socks[0]):
        listeners = [socket.create_server(("127.0.0.1", 0))]
        with serving(BACKEND, Echo) as server:
            in_loop(server, lambda: server.start(wrap(listeners)))  # noqa: B023 -- run at once
            assert server.sockets[1:] == listeners
            assert exchange(listeners[0].getsockname(), b"ping", 4) == b"ping"


def test_a_float_connection_limit_is_the_limit() -> None:
    with serving(BACKEND, Echo, max_connections=2.0) as server:
        held = [connect(server.address) for _ in range(2)]
        try:
            for sock in held:
                sock.sendall(b"held")
                assert recv_exactly(sock, 4) == b"held"
            with connect(server.address) as refused:
                assert recv_until_eof(refused) == b""
            wait_until(lambda: server.connections_refused == 1)
        finally:
            for sock in held:
                sock.close()


class Filler(Protocol):
    """Buffers 32 MiB with no pause (its mark far above), for the test to set the limits."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=1 << 30)
        transport.write(b"f" * (32 << 20))
        self.calls.append("made")

    def pause_writing(self) -> None:
        self.calls.append(f"pause at {self.transport.get_write_buffer_size()}")

    def resume_writing(self) -> None:
        self.calls.append(f"resume at {self.transport.get_write_buffer_size()}")


def test_set_write_buffer_limits_takes_floats_as_asyncio_does() -> None:
    """``set_write_buffer_limits(1e6)``: pause past 1,000,000 bytes, resume at or below a quarter."""
    made: list[Filler] = []
    factory = lambda: made.append(Filler()) or made[-1]  # noqa: E731
    with serving(BACKEND, factory) as server, connect(server.address) as sock:
        wait_until(lambda: made and made[0].calls)
        transport = made[0].transport
        in_loop(server, lambda: transport.set_write_buffer_limits(1e6))
        assert (transport.high_water, transport.low_water) == (1_000_000, 250_000)
        assert made[0].calls[1].startswith("pause at ")
        sock.settimeout(10)
        assert recv_exactly(sock, 32 << 20) == b"f" * (32 << 20)
        wait_until(lambda: len(made[0].calls) == 3)
        resumed_at = int(made[0].calls[2].removeprefix("resume at "))
        assert resumed_at <= 250_000
        # Only low given: high is four times it (asyncio's rule); both given as floats.
        in_loop(server, lambda: transport.set_write_buffer_limits(low=100_000))
        assert (transport.high_water, transport.low_water) == (400_000, 100_000)
        in_loop(server, lambda: transport.set_write_buffer_limits(high=2048.0, low=512.0))
        assert (transport.high_water, transport.low_water) == (2048, 512)


#: (keyword arguments, exception, what its message says); the same in both builds
REFUSED: list[tuple[dict, type[Exception], str]] = [
    ({"high_water": -1}, ValueError, r"high_water must not be negative, got -1"),
    ({"high_water": math.nan}, ValueError, r"high_water must be a number, got nan"),
    ({"high_water": "64k"}, TypeError, r"high_water must be an int or a float, not str"),
    ({"high_water": 1000, "low_water": 2000}, ValueError, r"low_water 2000 is above high_water 1000"),
    ({"low_water": -math.inf}, ValueError, r"low_water must not be negative, got -inf"),
    ({"max_connections": -1}, ValueError, r"max_connections must not be negative, got -1"),
    ({"max_connections": "10"}, TypeError, r"max_connections must be an int or a float, not str"),
    ({"backlog": -5.0}, ValueError, r"backlog must not be negative, got -5"),
    ({"accept_batch": 0}, ValueError, r"accept_batch must be at least 1, got 0"),
    ({"port": 70000}, ValueError, r"port must be 0-65535, got 70000"),
    ({"port": -1}, ValueError, r"port must be 0-65535, got -1"),
    ({"port": 80.5}, TypeError, r"port must be an int or a service name, not float"),
    ({"port": "no-such-service"}, ValueError, r"port 'no-such-service' is no TCP service name this host knows"),
    ({"host": b"127.0.0.1"}, TypeError, r"host must be a str or an iterable of str, not bytes"),
    ({"host": ["127.0.0.1", 1]}, TypeError, r"host must be a str or an iterable of str, not int in it"),
    ({"host": 5}, TypeError, r"host must be a str or an iterable of str, not int"),
    ({"idle_timeout": -1}, ValueError, r"idle_timeout must be a finite number of seconds, not negative: -1"),
    ({"linger_timeout": math.nan}, ValueError, r"linger_timeout must be a number, got nan"),
    ({"flush_timeout": math.inf}, ValueError, r"flush_timeout must be a finite number of seconds, .*inf"),
    ({"flush_timeout": "1"}, TypeError, r"flush_timeout must be an int or a float, not str"),
]


def says(raised: BaseException | None, error: type[Exception], message: str, wrong: object = None) -> bool:
    """Whether ``raised`` is ``error`` saying ``message``.  A wrong type the compiled build refuses
    before the call starts, by the annotation, in its own words ("float object expected; got str"):
    a TypeError all the same."""
    if type(raised) is not error:
        return False
    if re.fullmatch(message, str(raised)):
        return True
    mypyc_words = rf"[\w\[\], ]+ object expected; got {type(wrong).__name__}"
    return TESTED_BUILD == "compiled" and error is TypeError and re.fullmatch(mypyc_words, str(raised)) is not None


@pytest.mark.parametrize(("kwargs", "error", "message"), REFUSED, ids=[str(case[0]) for case in REFUSED])
def test_server_refuses_nonsense_alike_in_both_builds(kwargs: dict, error: type[Exception], message: str) -> None:
    loop = EventLoop(BACKEND)
    try:
        with pytest.raises(error) as raised:
            Server(loop, Echo, **{"port": 0, **kwargs})
        assert says(raised.value, error, message, wrong=list(kwargs.values())[-1]), raised.value
    finally:
        loop.close()


def test_start_refuses_what_is_not_a_stream_socket() -> None:
    loop = EventLoop(BACKEND)
    server = Server(loop, Echo, port=0)
    try:
        with pytest.raises(TypeError, match=r"^start\(\) takes sockets, not str$"):
            server.start(["127.0.0.1"])
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with udp, pytest.raises(ValueError, match=r"^start\(\) takes stream sockets \(SOCK_STREAM\), not "):
            server.start(udp)
        assert server.sockets == []
    finally:
        server.close()
        loop.close()


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((-1,), ValueError, r"high must not be negative, got -1"),
        ((math.nan,), ValueError, r"high must be a number, got nan"),
        (("1",), TypeError, r"high must be an int or a float, not str"),
        ((100, 200), ValueError, r"low 200 is above high 100"),
        ((None, "2"), TypeError, r"low must be an int or a float, not str"),
    ],
)
def test_set_write_buffer_limits_refuses_nonsense_alike(args: tuple, error: type[Exception], message: str) -> None:
    made: list[Protocol] = []
    with serving(BACKEND, lambda: made.append(Echo()) or made[-1]) as server, connect(server.address):
        wait_until(lambda: made and hasattr(made[0], "transport"))
        transport = made[0].transport

        def call() -> BaseException | None:
            try:
                transport.set_write_buffer_limits(*args)
            except Exception as exc:  # handed to the test thread
                return exc
            return None

        raised = in_loop(server, call)
        assert says(raised, error, message, wrong=[arg for arg in args if arg is not None][-1]), raised
        assert (transport.high_water, transport.low_water) == (65536, 16384)  # unchanged
