"""The client's ClientHello, read from the first bytes of a TLS connection, before OpenSSL sees them.

Sans-IO: ``ClientHelloReader.feed()`` takes the bytes as they arrive, however TCP and the
client cut them into segments and TLS records, and returns the ClientHello once it is whole.
Only what pollserve decides on is read (RFC 8446 section 4.1.2): the versions offered, the
groups listed and the groups of the key shares sent, and the ALPN names, each when it is asked
for (a usual handshake needs the versions and the key shares only: reading a ClientHello costs
about 1.5% of a full handshake's instructions).  The TLS layer (``tls.py``) refuses offers by them; everything else is
left to OpenSSL, which reads the same bytes again.

The bytes are the client's and may be hostile: every length is checked against the bytes that
hold it, the reader holds at most ``MAX_HELLO_BYTES``, and it works in one pass (each record is
scanned once, the message parsed once), so a ClientHello in a thousand one-byte records costs a
thousand steps, not a million.  What does not parse raises ``MalformedHello``; each check is
one OpenSSL makes too (``decode_error``), so no offer that OpenSSL would take is lost.
"""

from __future__ import annotations

import struct

#: the record holding a handshake message, and the handshake message that opens one (RFC 8446 section 5.1, 4)
HANDSHAKE_RECORD = 22
CLIENT_HELLO = 1
#: a record's header: content type, legacy version, length
RECORD_HEADER = 5
#: the most a record carries (RFC 8446 section 5.1: "MUST NOT exceed 2^14 bytes")
MAX_RECORD = 1 << 14
#: the most this reader holds: the ClientHello's records, headers included.  Browsers' largest,
#: with a post-quantum key share (X25519MLKEM768, 1,216 bytes), are under 2 KiB; one full
#: record's worth leaves them eight times the room.
MAX_HELLO_BYTES = 1 << 14

#: the extensions read (RFC 8446 section 4.2; RFC 7301 for ALPN)
SUPPORTED_GROUPS = 10
ALPN = 16
SUPPORTED_VERSIONS = 43
KEY_SHARE = 51
READ = frozenset((SUPPORTED_GROUPS, ALPN, SUPPORTED_VERSIONS, KEY_SHARE))

#: the elliptic-curve groups every OpenSSL since 1.1.1 serves by default (RFC 8446 section 4.2.7)
ELLIPTIC_CURVES = {0x0017: "P-256", 0x0018: "P-384", 0x0019: "P-521", 0x001D: "X25519", 0x001E: "X448"}
#: the finite-field groups (RFC 7919; 0x01FC-0x01FF are for private use)
FINITE_FIELD = range(0x0100, 0x0200)
FINITE_FIELD_NAMES = {
    0x0100: "ffdhe2048",
    0x0101: "ffdhe3072",
    0x0102: "ffdhe4096",
    0x0103: "ffdhe6144",
    0x0104: "ffdhe8192",
}


class HelloError(Exception):
    """The first bytes are not a ClientHello this reader accepts; the message says why, for a log."""


class NotAHandshake(HelloError):
    """The first byte is not a handshake record's: plain text, or an SSL 2 style hello.  The
    caller lets OpenSSL judge it (and say what it is)."""


class MalformedHello(HelloError):
    """A handshake record whose ClientHello does not parse."""


class HelloTooLarge(HelloError):
    """A ClientHello over MAX_HELLO_BYTES."""


def group_name(group: int) -> str:
    return ELLIPTIC_CURVES.get(group) or FINITE_FIELD_NAMES.get(group) or f"group 0x{group:04x}"


class ClientHello:
    """The extensions of a ClientHello that pollserve decides on, each read when asked for.

    The methods raise MalformedHello where OpenSSL would refuse the extension.
    """

    __slots__ = ("extensions",)

    def __init__(self, extensions: dict[int, bytes]) -> None:
        #: the bytes of the extensions in READ that the client sent, by type
        self.extensions = extensions

    def offers_tls13(self) -> bool:
        """TLS 1.3 is among the versions of supported_versions (RFC 8446 section 4.2.1)."""
        data = self.extensions.get(SUPPORTED_VERSIONS)
        if data is None:
            return False
        if len(data) < 3 or data[0] + 1 != len(data) or data[0] % 2:  # versions <2..254>
            raise MalformedHello(f"a supported_versions extension of {len(data)} bytes")
        at = data.find(b"\x03\x04", 1)
        while at > 0 and at % 2 == 0:  # the second byte of one version and the first of the next
            at = data.find(b"\x03\x04", at + 1)
        return at > 0

    def groups(self) -> tuple[int, ...]:
        """supported_groups, in the client's order (RFC 8446 section 4.2.7)."""
        data = self.extensions.get(SUPPORTED_GROUPS)
        if data is None:
            return ()
        if len(data) < 4 or _u16(data, 0) + 2 != len(data) or len(data) % 2:  # named_group_list <2..2^16-1>
            raise MalformedHello(f"a supported_groups extension of {len(data)} bytes")
        return struct.unpack_from(f">{len(data) // 2 - 1}H", data, 2)

    def key_exchange_group(self) -> int | None:
        """The group a TLS 1.3 client asks the server to compute in, as OpenSSL picks it: its
        first key share in a group OpenSSL serves, else (a HelloRetryRequest) its first such
        supported group.  Only elliptic-curve and finite-field groups count; None: neither.
        (OpenSSL reads key_share only in a TLS 1.3 offer: ask only then.)"""
        group = self._first_key_share()
        if group is not None:
            return group
        for group in self.groups():
            if group in ELLIPTIC_CURVES or group in FINITE_FIELD:
                return group
        return None

    def _first_key_share(self) -> int | None:
        """The group of the first key share in a group that counts (RFC 8446 section 4.2.8).
        The shares after it are OpenSSL's to check: it would not look at them either."""
        data = self.extensions.get(KEY_SHARE)
        if data is None:
            return None
        if len(data) < 2 or _u16(data, 0) + 2 != len(data):  # client_shares <0..2^16-1>
            raise MalformedHello(f"a key_share extension of {len(data)} bytes")
        at = 2
        while at < len(data):
            if at + 4 > len(data):
                raise MalformedHello("a key share's header cut short")
            group, size = _TYPE_AND_LENGTH.unpack_from(data, at)
            if size == 0 or at + 4 + size > len(data):  # key_exchange <1..2^16-1>
                raise MalformedHello("a key share of no bytes, or past its extension")
            if group in ELLIPTIC_CURVES or group in FINITE_FIELD:
                return group
            at += 4 + size
        return None

    def alpn(self) -> tuple[bytes, ...] | None:
        """The ALPN protocol names, in the client's order; None: it sent no ALPN."""
        data = self.extensions.get(ALPN)
        return None if data is None else alpn_names(data)


def alpn_names(data: bytes) -> tuple[bytes, ...]:
    """An ALPN extension's ProtocolNameList <2..2^16-1>, each name <1..2^8-1> (RFC 7301 section 3.1)."""
    if len(data) < 3 or _u16(data, 0) + 2 != len(data):
        raise MalformedHello(f"an ALPN extension of {len(data)} bytes")
    names = []
    at = 2
    while at < len(data):
        size = data[at]
        if size == 0 or at + 1 + size > len(data):
            raise MalformedHello("an empty ALPN name, or one past its list")
        names.append(data[at + 1 : at + 1 + size])
        at += 1 + size
    return tuple(names)


class ClientHelloReader:
    """Collects a connection's first bytes until they hold a whole ClientHello.

    ``feed()`` returns None while more bytes are needed, then the ClientHello; it raises
    HelloError when the bytes cannot be one.  ``flight`` is every byte fed, for OpenSSL.
    """

    __slots__ = ("flight", "_scanned", "_message")

    def __init__(self) -> None:
        self.flight = bytearray()
        #: where the next record header starts in flight
        self._scanned = 0
        #: the handshake bytes of the records scanned so far
        self._message = bytearray()

    def feed(self, data: bytes) -> ClientHello | None:
        flight = self.flight
        flight += data
        if not flight:
            return None
        if flight[0] != HANDSHAKE_RECORD:
            raise NotAHandshake(f"the first byte is 0x{flight[0]:02x}, not a TLS handshake record's")
        message = self._message
        at = self._scanned
        while len(flight) - at >= RECORD_HEADER:
            if flight[at] != HANDSHAKE_RECORD:
                raise MalformedHello(f"a record of type {flight[at]} inside the ClientHello")
            length = (flight[at + 3] << 8) | flight[at + 4]
            if length > MAX_RECORD:
                raise MalformedHello(f"a record of {length} bytes, over 2^14")
            end = at + RECORD_HEADER + length
            if end > len(flight):
                break
            message += flight[at + RECORD_HEADER : end]
            at = self._scanned = end
            if len(message) >= 4:
                if message[0] != CLIENT_HELLO:
                    raise MalformedHello(f"handshake message {message[0]} where a ClientHello belongs")
                size = 4 + int.from_bytes(message[1:4], "big")
                if size > MAX_HELLO_BYTES:
                    raise HelloTooLarge(f"a ClientHello of {size} bytes, over {MAX_HELLO_BYTES}")
                if len(message) >= size:
                    return parse_body(bytes(message[4:size]))
        if len(flight) > MAX_HELLO_BYTES:
            raise HelloTooLarge(f"over {MAX_HELLO_BYTES} bytes without a whole ClientHello")
        return None


def parse_body(body: bytes) -> ClientHello:
    """The ClientHello's body, after its 4-byte handshake header (RFC 8446 section 4.1.2): its
    frame is checked as OpenSSL's ``tls_process_client_hello`` and ``tls_collect_extensions`` do,
    and the extensions in READ are kept for the ClientHello's methods to read."""
    # legacy_version (2), random (32), then legacy_session_id <0..32>
    at = 34
    session_id = _u8(body, at)
    if session_id > 32:
        raise MalformedHello(f"a session id of {session_id} bytes")
    at += 1 + session_id
    suites = _u16(body, at)  # cipher_suites <2..2^16-2>
    if suites < 2 or suites % 2:
        raise MalformedHello(f"cipher suites of {suites} bytes")
    at += 2 + suites
    at += 1 + _u8(body, at)  # legacy_compression_methods <1..2^8-1>
    if at > len(body):
        raise MalformedHello("truncated before its extensions")
    extensions: dict[int, bytes] = {}
    if at == len(body):  # no extensions: a TLS 1.2 (or older) hello
        return ClientHello(extensions)
    end = at + 2 + _u16(body, at)
    if end != len(body):
        raise MalformedHello("its extensions do not fill it")
    at += 2
    unpack = _TYPE_AND_LENGTH.unpack_from
    try:
        while at < end:
            kind, size = unpack(body, at)
            at += 4
            if kind in READ:
                if kind in extensions:
                    raise MalformedHello(f"extension {kind} twice")  # RFC 8446 section 4.2
                extensions[kind] = body[at : at + size]
            at += size
    except struct.error:  # fewer than 4 bytes left for a header: end is the body's end
        raise MalformedHello("an extension header cut short") from None
    if at != end:
        raise MalformedHello("its last extension runs past it")
    return ClientHello(extensions)


#: an extension's (or a key share's) type and length
_TYPE_AND_LENGTH = struct.Struct(">HH")


def _u8(data: bytes, at: int) -> int:
    if at >= len(data):
        raise MalformedHello("truncated")
    return data[at]


def _u16(data: bytes, at: int) -> int:
    if at + 2 > len(data):
        raise MalformedHello("truncated")
    return (data[at] << 8) | data[at + 1]
