"""The server's TLS sessions as a model: clients at every stage of a handshake and of a session,
clients that vanish, and the server's shutdown landing among them, in random orders.

After each step the server holds exactly the connections of the clients still there, and its
handshake counters say what the clients did.  A shutdown answers every client that had spoken:
one whose handshake was under way (its ClientHello cut short, or its Finished held back) completes
it, then reads close_notify, and no app is made for it; an established session reads close_notify;
a client that never sent a byte is closed at once.  The server then drains, and nothing is logged
with a traceback."""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading

import pytest
from clients import reset
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule
from inprocess import in_loop, wait_until
from tlshelpers import BIOClient, Certs, make_certs, tls_serving

from pollserve.apps import Echo

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

#: a handshake held open by the model must not time out while the steps run (a loaded machine)
HANDSHAKE_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls-model"))


class Made(Echo):
    """Echoes; counts the apps the server connected (the factory makes one at each accept)."""

    def __init__(self, made: list[Made]) -> None:
        super().__init__()
        self.made = made

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.made.append(self)


class Client:
    """One client and the stage it is at: silent (connected, nothing sent), partial (part of its
    ClientHello sent), finished_held (the server's flight read, its Finished not sent), open."""

    def __init__(self, bio: BIOClient) -> None:
        self.bio = bio
        self.stage = "silent"
        self.held = b""  # the rest of a partial ClientHello


class Tracebacks(logging.Handler):
    """Records every log record that carries an exception."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


class ServerTLSSessions(RuleBasedStateMachine):
    backend: str
    certs: Certs

    clients = Bundle("clients")

    def __init__(self) -> None:
        super().__init__()
        self.tracebacks = Tracebacks()  # for every server of the run, removed at teardown
        logging.getLogger().addHandler(self.tracebacks)
        self.stack = contextlib.ExitStack()  # the server of the moment
        self.live: list[Client] = []
        self.start_server()

    def start_server(self) -> None:
        self.made: list[Made] = []
        options = self.certs.options(handshake_timeout=HANDSHAKE_TIMEOUT)
        self.server, self.layers = self.stack.enter_context(tls_serving(self.backend, lambda: Made(self.made), options))
        self.handshakes = 0  # completed, as the server counts them
        self.failures = 0  # clients that left mid-handshake

    def new_client(self) -> Client:
        client = Client(BIOClient(self.server.address, self.certs.client_context()))
        self.live.append(client)
        return client

    def drop(self, client: Client) -> None:
        client.bio.close()
        self.live.remove(client)

    @rule(target=clients)
    def connect(self) -> Client:
        return self.new_client()

    @rule(target=clients)
    def open_a_session(self) -> Client:
        """A client through its whole handshake in one step, so that runs reach several sessions at once."""
        client = self.new_client()
        client.bio.handshake()
        self.handshakes += 1
        client.stage = "open"
        return client

    @rule(client=clients, cut=st.integers(1, 200))
    def send_part_of_the_hello(self, client: Client, cut: int) -> None:
        if client not in self.live or client.stage != "silent":
            return
        with contextlib.suppress(ssl.SSLWantReadError):
            client.bio.obj.do_handshake()
        hello = client.bio.outgoing.read()
        client.bio.sock.sendall(hello[:cut])
        client.held = hello[cut:]
        client.stage = "partial"

    def complete_hello(self, client: Client) -> None:
        """The rest of a partial ClientHello, then the handshake up to the client's Finished."""
        client.bio.sock.sendall(client.held)
        client.held = b""
        client.bio.handshake(send_finished=False)

    @rule(client=clients)
    def handshake_to_the_finished(self, client: Client) -> None:
        if client not in self.live or client.stage not in ("silent", "partial"):
            return
        if client.stage == "partial":
            self.complete_hello(client)
        else:
            client.bio.handshake(send_finished=False)
        client.stage = "finished_held"

    @rule(client=clients, data=st.binary(max_size=3000))
    def send_the_finished(self, client: Client, data: bytes) -> None:
        """The Finished, with application data in the same segment when ``data`` is not empty."""
        if client not in self.live or client.stage != "finished_held":
            return
        if data:
            client.bio.write(data, send=False)
        client.bio.flush()
        self.handshakes += 1
        client.stage = "open"
        if data:
            assert client.bio.read(len(data)) == data

    @rule(client=clients, size=st.integers(1, 70_000), seed=st.integers(0, 2**16))
    def echo(self, client: Client, size: int, seed: int) -> None:
        if client not in self.live or client.stage != "open":
            return
        data = random.Random(seed).randbytes(size)
        assert client.bio.exchange(data, size) == data

    @rule(client=clients)
    def close_notify(self, client: Client) -> None:
        """The client ends its session; the echo app closes on the EOF, with its own close_notify."""
        if client not in self.live or client.stage != "open":
            return
        client.bio.send_close_notify()
        assert client.bio.read_to_close_notify() == b""
        client.bio.wait_eof()
        self.drop(client)

    @rule(client=clients, rst=st.booleans())
    def vanish(self, client: Client, rst: bool) -> None:
        """The client goes without a word, by FIN or by RST, at whatever stage it is."""
        if client not in self.live:
            return
        if client.stage in ("partial", "finished_held"):
            self.failures += 1
        if rst:
            reset(client.bio.sock)
        self.drop(client)

    @rule()
    def shutdown(self) -> None:
        """The server's shutdown, among clients at every stage; then a new server for the next steps."""
        drained = threading.Event()
        in_loop(self.server, lambda: self.server.shutdown(10, drained.set))
        answered = 0
        for client in list(self.live):
            if client.stage == "silent":
                with pytest.raises(ConnectionError):  # closed at once: it had said nothing
                    client.bio.handshake()
            else:
                if client.stage == "partial":
                    self.complete_hello(client)
                if client.stage in ("partial", "finished_held"):
                    client.bio.flush()  # the Finished: the handshake completes, the app is never made
                    answered += 1
                assert client.bio.read_to_close_notify() == b""
                assert client.bio.close_notify
            self.drop(client)
        assert drained.wait(10), "the server did not drain"
        assert self.layers.handshakes == self.handshakes + answered
        assert self.layers.handshake_failures == self.failures
        assert len(self.made) == self.handshakes  # none for the handshakes the shutdown answered
        self.stack.close()
        self.stack = contextlib.ExitStack()
        self.start_server()

    @invariant()
    def the_server_holds_the_clients_that_are_there(self) -> None:
        expected = (len(self.live), self.handshakes, self.failures)
        wait_until(
            lambda: (len(self.server.connections), self.layers.handshakes, self.layers.handshake_failures) == expected
        )
        assert len(self.made) == self.handshakes
        assert not self.tracebacks.records, [record.getMessage() for record in self.tracebacks.records]

    def teardown(self) -> None:
        try:
            for client in list(self.live):
                self.drop(client)
            self.stack.close()
        finally:
            logging.getLogger().removeHandler(self.tracebacks)


def test_tls_sessions_and_a_shutdown_in_random_orders(backend_name: str, certs: Certs) -> None:
    machine = type("ServerTLSSessions_" + backend_name, (ServerTLSSessions,), {"backend": backend_name, "certs": certs})
    machine.TestCase.settings = settings(
        max_examples=25, stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)
    )
    machine.TestCase().runTest()
