"""pollserve.clienthello without sockets: ClientHellos made by Python's ssl (MemoryBIO) and by hand
(tlshelpers.client_hello), whole and cut into records and chunks; what the reader refuses; and
the group the TLS layer judges a TLS 1.3 offer by.  Random and mutated bytes: test_fuzz.py.
"""

from __future__ import annotations

import ssl

import pytest
from tlshelpers import (
    FFDHE2048,
    FFDHE8192,
    SECP256R1,
    X25519,
    client_hello,
    extension,
    handshake_message,
    records,
)

from pollserve.clienthello import (
    MAX_HELLO_BYTES,
    ClientHello,
    ClientHelloReader,
    HelloTooLarge,
    MalformedHello,
    NotAHandshake,
)


def python_client_flight(*alpn: str, tls12_only: bool = False) -> bytes:
    """What Python's ssl sends first: its ClientHello, in one record."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(list(alpn))
    if tls12_only:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    client = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def read(flight: bytes, chunk: int = 0) -> ClientHello:
    reader = ClientHelloReader()
    step = chunk or len(flight)
    for start in range(0, len(flight), step):
        hello = reader.feed(flight[start : start + step])
        if hello is not None:
            assert start + step >= len(flight), "a ClientHello before its last byte"
            assert bytes(reader.flight) == flight  # every byte, for OpenSSL
            return hello
    raise AssertionError("no ClientHello from the whole flight")


def test_python_clients_hello() -> None:
    hello = read(python_client_flight("h2", "http/1.1"))
    assert hello.offers_tls13()
    assert hello.key_exchange_group() == X25519
    assert hello.groups()[:2] == (X25519, SECP256R1) and FFDHE2048 in hello.groups()  # OpenSSL's defaults
    assert hello.alpn() == (b"h2", b"http/1.1")
    tls12 = read(python_client_flight(tls12_only=True))
    assert not tls12.offers_tls13() and tls12.alpn() is None


@pytest.mark.parametrize("fragment", [1, 4, 5, 100])
@pytest.mark.parametrize("chunk", [1, 3, 7, 0])
def test_any_cut_into_records_and_chunks_reads_the_same(fragment: int, chunk: int) -> None:
    flight = records(handshake_message(python_client_flight("h2")), fragment)
    hello = read(flight, chunk)
    assert hello.key_exchange_group() == X25519 and hello.alpn() == (b"h2",)


#: (supported_groups, key shares) -> the group OpenSSL would compute in
GROUP_CHOICES = [
    ((X25519, FFDHE2048), (X25519,), X25519),
    ((FFDHE2048, X25519), (FFDHE2048,), FFDHE2048),  # X25519 listed, but a share of ffdhe2048 is taken
    ((FFDHE2048, X25519), (FFDHE2048, X25519), FFDHE2048),  # the first share
    ((X25519, FFDHE2048), (X25519, FFDHE2048), X25519),
    ((FFDHE8192,), (), FFDHE8192),  # a HelloRetryRequest would ask for it
    ((SECP256R1, FFDHE2048), (), SECP256R1),
    ((0x0A0A, FFDHE2048), (), FFDHE2048),  # GREASE (RFC 8701) is no group
    ((0x4A4A, X25519), (0x4A4A, X25519), X25519),
    ((0x0A0A,), (), None),
]


@pytest.mark.parametrize(("groups", "shares", "chosen"), GROUP_CHOICES)
def test_the_key_exchange_group(groups, shares, chosen) -> None:
    hello = read(records(client_hello(groups=groups, key_shares=shares)))
    assert hello.offers_tls13()
    assert hello.key_exchange_group() == chosen


def test_not_a_handshake_is_said_at_the_first_byte() -> None:
    for first in (b"G", b"\x80", b"\x00", b"\x17\x03\x03"):
        with pytest.raises(NotAHandshake):
            ClientHelloReader().feed(first)


@pytest.mark.parametrize("declared", [MAX_HELLO_BYTES, MAX_HELLO_BYTES - 100], ids=["too-large", "fits"])
def test_the_reader_holds_at_most_the_bound(declared: int) -> None:
    """A ClientHello that says it is too large, or one in 1-byte records (six times its size):
    the reader stops at 16 KiB of them."""
    message = b"\x01" + declared.to_bytes(3, "big") + bytes(declared)
    flight = records(message, 1 << 14 if declared >= MAX_HELLO_BYTES else 1)
    reader = ClientHelloReader()
    with pytest.raises(HelloTooLarge):
        for start in range(0, len(flight), 1000):
            reader.feed(flight[start : start + 1000])
    assert len(reader.flight) <= MAX_HELLO_BYTES + 1000


def body_of(**kwargs) -> bytearray:
    return bytearray(client_hello(**kwargs)[4:])


def with_body(body: bytes) -> bytes:
    return records(b"\x01" + len(body).to_bytes(3, "big") + body)


def test_malformed_frames() -> None:
    hello = client_hello()
    cases = {
        "a record of another type inside": records(hello[:10]) + b"\x15\x03\x03\x00\x02\x02\x28" + records(hello[10:]),
        "a record over 2^14": b"\x16\x03\x01\x40\x01" + hello,
        "another handshake message": records(b"\x02" + hello[1:]),
        "a session id of 33 bytes": with_body(bytes(body_of()[:34]) + b"\x21" + b"\x00" * 33),
        "extensions that do not fill it": with_body(bytes(body_of()) + b"\x00"),
        "truncated": with_body(bytes(body_of()[:40])),
    }
    for what, flight in cases.items():
        with pytest.raises(MalformedHello):
            read(flight)
        assert what


def test_malformed_extensions_raise_when_read() -> None:
    versions = extension(43, b"\x04\x03\x04")  # a list of 4 bytes that holds 2
    hello = read(records(client_hello(tls13=False, more=versions)))
    with pytest.raises(MalformedHello):
        hello.offers_tls13()
    alpn = extension(16, b"\x00\x03\x02h2\x00")  # a list of 3 bytes in 4
    with pytest.raises(MalformedHello):
        read(records(client_hello(more=alpn))).alpn()
    share = extension(51, b"\x00\x04\x00\x1d\x00\x00")  # a share of no bytes
    with pytest.raises(MalformedHello):
        read(records(client_hello(key_shares=(), more=share))).key_exchange_group()


def test_an_extension_read_twice_is_malformed() -> None:
    """OpenSSL refuses a hello with an extension twice (RFC 8446 section 4.2): which one it would
    read does not arise.  An extension pollserve does not read may come twice, as OpenSSL lets it."""
    alpn = extension(16, b"\x00\x03\x02h2")
    with pytest.raises(MalformedHello):
        read(records(client_hello(alpn=[b"h2"], more=alpn)))
    unknown = extension(0xFE0D, b"x")
    assert read(records(client_hello(more=unknown + unknown))).key_exchange_group() == X25519
