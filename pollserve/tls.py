"""TLS as a layer: ciphertext from the connection below, plaintext to the app above.

``TLSLayer`` is the connection's protocol and hands the app a transport of its own
(``TLSTransport``), the shape of asyncio's sslproto.  ``TLSLayerFactory`` stacks it at
accept time, only when ``--tls-cert`` is given: a plain server runs no line of this
module.  The backend still reports readiness of the raw socket, and the connection still
does every recv() and send(); the layer turns bytes into bytes.

Built on ``ssl.MemoryBIO`` and ``SSLObject``, not on non-blocking ``SSLSocket`` objects,
by measurement: two minimal epoll echo servers, one per way, the server's CPU time
(schedstat) over 40,000 1 KiB requests and 400 full handshakes, medians of three
alternated runs (OpenSSL 3.0.19, Python 3.11, 2 cores): 11.4 us a request with the BIOs,
13.0 us with SSLSocket, and 602 against 599 us a handshake, runs scattering by 20%.  In
memory (timeit), a 1 KiB record in and one out through the BIOs take 2.5 to 5.4 us, the
crypto included: the BIOs' own copies and calls are a part of that, within the noise
above.  At equal cost the BIOs win on shape: TLS is
then a layer, the connection keeps its one read and one write per event, its buffers,
lingering close and idle deadline, and ``bytes_in``/``bytes_out`` count the ciphertext
that crosses the socket, which an SSLSocket, reading the fd inside OpenSSL, hides.

The hard parts, and where each is handled:

- *Want-read, want-write.*  Whatever OpenSSL writes is flushed after every call into the
  SSLObject, reads included: the server's handshake ends by writing NewSessionTicket
  messages (RFC 8446 section 4.6.1) that no app write would carry, and a read can write
  an alert.  (The KeyUpdate that answers one with ``update_requested`` is due only
  "prior to sending its next Application Data record", section 4.6.3, and OpenSSL
  writes it with the next SSL_write.)  ``SSLWantWriteError`` cannot happen: the outgoing BIO grows, and a socket that
  does not take the ciphertext is the connection's buffer and WRITE interest, as for
  plain TCP.  A write cannot need a read: the app is handed its transport only once the
  handshake is complete, and TLS 1.2 renegotiation, the case in which SSL_write(3) must
  read, is refused (``OP_NO_RENEGOTIATION``).
- *Plaintext the kernel does not signal.*  Readiness is about bytes in the socket, not
  about records in the incoming BIO or plaintext inside the SSLObject: a client's
  Finished and its first request often arrive in one segment.  So a read drains until
  OpenSSL wants more, and a drain cut short (the app paused reading, or its writes are
  paused) is resumed by a callback of its own when the pause ends.
- *Backpressure in plaintext bytes.*  The app's write-buffer limits count plaintext:
  what waits unencrypted here, plus the plaintext whose records still wait in the
  connection's buffer (a map of records to plaintext lengths, kept only while that
  buffer is not empty).  The connection's own high-water mark is the app's low one, so
  a paused app is always told when its plaintext falls below its low-water mark.
- *close_notify.*  ``write_eof()`` sends close_notify and FIN, and the app may go on
  reading (RFC 8446 section 6.1); a client's close_notify is ``eof_received()``.  A
  client that closes TCP without close_notify is, as with the ssl module's
  ``suppress_ragged_eofs`` default, an end of file too.
- *Handshake deadline.*  A client that connects and says nothing is aborted after
  ``handshake_timeout`` seconds, so it cannot hold a connection slot.
- *Not TLS at all.*  Plain text spoken to the TLS port fails the handshake like any
  other bad client: counted, closed, and logged by episode (rates.EpisodeLog), never
  with a traceback.
- *A client choosing what its handshake costs.*  In TLS 1.3 the client picks the key
  exchange group, and OpenSSL serves RFC 7919's finite-field groups by default: an
  ffdhe8192 handshake cost this server 130 ms of CPU, on the loop, against 1.2 ms for
  X25519 (OpenSSL 3.0.19).  Python 3.10 to 3.13 set one group (``set_ecdh_curve``), not a
  list.  So the layer reads the ClientHello before OpenSSL does (``clienthello.py``; the
  first bytes are held until it is whole, 16 KiB at most) and refuses an offer in which
  OpenSSL would compute in a finite-field group with a handshake_failure alert, a failed
  handshake like any other (``check_client_hello``).  Weighed against it: an OpenSSL
  configuration with ``Groups=`` (``OPENSSL_CONF``, read once when OpenSSL initialises, so
  set before the process starts; it replaces the system's configuration, crypto-policies
  included, for every context in the process), and ``SSL_CTX_set1_groups_list`` through
  ctypes (the SSL_CTX pointer read out of CPython's private SSLContext struct, and the
  libssl that ``_ssl`` links, whose symbols a Python that links OpenSSL statically may not
  export).  Both answer a client that lists X25519 but sends only a finite-field share with
  a HelloRetryRequest where the check refuses it, and both cost nothing per handshake; the
  check costs 47,000 instructions per handshake, 1.5% of a full one's 3.1 million
  (callgrind, ``benchmarks/bench_tls.py --instructions``), works wherever Python's ssl does,
  and overrides nothing: OpenSSL's group list and the system's configuration stay as they
  are.  It applies to the connections this layer serves, whatever context they use; a
  context from ``server_context()`` used elsewhere (asyncio's ``create_server``) accepts what
  OpenSSL does.
- *ALPN with no protocol in common.*  Python's ssl goes on without ALPN then, where RFC 7301
  wants a no_application_protocol alert, and cannot tell such a client from one without
  ALPN.  The ClientHello check can: it sends the alert itself (``check_client_hello``), and
  a client without ALPN is served with no protocol selected.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import ssl
from typing import TYPE_CHECKING, Any

from .apps import LayeredTransport, Protocol, ProtocolFactory, Transport
from .clienthello import (
    ALPN,
    FINITE_FIELD,
    ClientHello,
    ClientHelloReader,
    HelloError,
    HelloTooLarge,
    MalformedHello,
    NotAHandshake,
    alpn_names,
    group_name,
)
from .listeners import format_address
from .rates import EpisodeLog
from .server import _byte_view

if TYPE_CHECKING:
    from .loop import EventLoop, Handle

log = logging.getLogger("pollserve")

#: a client must complete its handshake within this many seconds (--tls-handshake-timeout)
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
#: plaintext asked of SSLObject.read() at a time: a record carries at most 2**14 bytes of it
#: (RFC 8446 section 5.1), so one record is one call
READ_SIZE = 1 << 14
#: plaintext encrypted at a time when a congested socket drains: bounds the ciphertext made ahead
ENCRYPT_CHUNK = 1 << 16
#: the app's write-buffer limits by default, as Connection's and asyncio's
DEFAULT_HIGH_WATER = 64 * 1024
DEFAULT_LOW_WATER = 16 * 1024
#: the TLS 1.2 suites served by default (--tls-ciphers replaces it): ECDHE key exchange, for
#: forward secrecy, and AEAD ciphers only (AES-GCM, ChaCha20-Poly1305).  No CBC suite (Lucky
#: Thirteen and its kin are padding-oracle timing attacks on CBC's MAC-then-encrypt), no DHE
#: (slow, and weak groups are common), no static RSA key exchange (no forward secrecy, ROBOT).
#: TLS 1.3's suites are all AEAD and are left as OpenSSL has them.
DEFAULT_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

#: the alerts the layer sends itself, before OpenSSL has seen the ClientHello (RFC 8446 section 6,
#: RFC 7301 section 3.2)
HANDSHAKE_FAILURE = 40
ILLEGAL_PARAMETER = 47
DECODE_ERROR = 50
NO_APPLICATION_PROTOCOL = 120


# -- configuration ----------------------------------------------------------------------------------------


class TLSConfigError(Exception):
    """A certificate, key or CA file that cannot be loaded; the message is for the user as it is."""


@dataclasses.dataclass(frozen=True)
class TLSOptions:
    """What --tls-* asked for."""

    #: PEM certificate chain, the server's certificate first; it may hold the key too
    cert: str
    #: PEM private key; None when it is in the cert file
    key: str | None = None
    #: PEM CA certificates that client certificates are verified against
    ca: str | None = None
    #: refuse clients without a certificate the CA issued (mutual TLS)
    verify_client: bool = False
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    #: protocols offered through ALPN, most preferred first
    alpn: tuple[str, ...] = ()
    #: OpenSSL cipher string for TLS 1.2; None: DEFAULT_TLS12_CIPHERS
    ciphers: str | None = None


def parse_alpn(text: str) -> tuple[str, ...]:
    """``h2,http/1.1`` as ALPN protocol names; ValueError says which is not one."""
    names = tuple(name.strip() for name in text.split(","))
    for name in names:
        # RFC 7301 section 3.1: a name is 1 to 255 bytes; the registered ones are printable ASCII.
        if not name or not name.isascii() or not name.isprintable() or len(name) > 255:
            raise ValueError(f"{name!r} is not an ALPN protocol name such as h2 or http/1.1")
    return names


def _refuse_password() -> bytes:
    # Without a callback, OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise TLSConfigError("is encrypted with a passphrase, which pollserve cannot ask for; decrypt it first")


def server_context(options: TLSOptions) -> ssl.SSLContext:
    """A server SSLContext: the stdlib's defaults for serving (``create_default_context(
    Purpose.CLIENT_AUTH)``: no compression, the server's cipher order), TLS 1.2 at least with
    the AEAD and ECDHE suites of DEFAULT_TLS12_CIPHERS or --tls-ciphers, no renegotiation.

    Raises TLSConfigError, naming the option and the file, when a file cannot be loaded.
    """
    for option, path in (("--tls-cert", options.cert), ("--tls-key", options.key), ("--tls-ca", options.ca)):
        if path is not None:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise TLSConfigError(f"{option} {path}: {exc.strerror or exc}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Client-initiated renegotiation costs the server a handshake for free (CVE-2011-1473), and
    # it is the one case in which a write must wait for a read.  TLS 1.3 has none.
    context.options |= ssl.OP_NO_RENEGOTIATION
    ciphers = DEFAULT_TLS12_CIPHERS if options.ciphers is None else options.ciphers
    try:
        context.set_ciphers(ciphers)
    except ssl.SSLError:  # "No cipher can be selected."
        raise TLSConfigError(f"--tls-ciphers {ciphers!r}: OpenSSL selects no cipher from it") from None
    try:
        context.load_cert_chain(options.cert, options.key, password=_refuse_password)
    except TLSConfigError as exc:
        raise TLSConfigError(f"--tls-key {options.key or options.cert}: the key {exc}") from None
    except ssl.SSLError as exc:
        raise TLSConfigError(_describe_load_error(options, exc)) from None
    if options.ca is not None:
        try:
            context.load_verify_locations(cafile=options.ca)
        except ssl.SSLError as exc:
            raise TLSConfigError(f"--tls-ca {options.ca}: no PEM CA certificate in it ({_openssl(exc)})") from None
        context.verify_mode = ssl.CERT_REQUIRED if options.verify_client else ssl.CERT_OPTIONAL
    if options.alpn:
        context.set_alpn_protocols(list(options.alpn))
    return context


def _openssl(exc: ssl.SSLError) -> str:
    return f"OpenSSL: {exc.reason.lower().replace('_', ' ')}" if exc.reason else f"OpenSSL: {exc}"


def _describe_load_error(options: TLSOptions, exc: ssl.SSLError) -> str:
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"--tls-key {options.key or options.cert}: the key does not match the certificate in {options.cert}"
    # A PEM that does not parse is reported without a reason, as "[SSL] PEM lib (_ssl.c:NNNN)":
    # nothing there for a user.
    detail = f" ({_openssl(exc)})" if exc.reason else ""
    if options.key is None:
        return (
            f"--tls-cert {options.cert}: no PEM certificate and private key in it (give the key with --tls-key){detail}"
        )
    return f"--tls-cert {options.cert}, --tls-key {options.key}: not a PEM certificate and its private key{detail}"


class ServerTLS:
    """The configuration in service: the options, and the context loaded from them.

    ``reload()`` replaces the context; connections already made keep the one they were made with.
    """

    def __init__(self, options: TLSOptions, context: ssl.SSLContext | None = None) -> None:
        self.options = options
        self.context = context if context is not None else server_context(options)

    @classmethod
    def load(cls, options: TLSOptions) -> ServerTLS:
        """Load the files now; raises TLSConfigError."""
        return cls(options)

    def describe(self) -> str:
        options = self.options
        parts = [
            f"certificate {options.cert}",
            "TLS 1.3, and TLS 1.2 with "
            + ("ECDHE and AEAD ciphers" if options.ciphers is None else f"ciphers {options.ciphers}"),
            f"handshake timeout {options.handshake_timeout:g} s",
        ]
        if options.ca is not None:
            need = "required" if options.verify_client else "verified when sent"
            parts.append(f"client certificates {need} (CA {options.ca})")
        if options.alpn:
            parts.append(f"ALPN {','.join(options.alpn)}")
        return ", ".join(parts)


def reload_certificates(tls: ServerTLS, why: str = "SIGHUP") -> bool:
    """Load the certificate, key and CA files again: new handshakes use them, established
    sessions go on with theirs.  Files that do not load leave the old ones in service, with
    one error line.  True when the new files are in service."""
    try:
        context = server_context(tls.options)
    except TLSConfigError as exc:
        log.error("%s: reload: %s; still serving the certificate loaded before", why, exc)
        return False
    tls.context = context
    log.info("%s: reload: TLS certificate reloaded from %s; new handshakes use it", why, tls.options.cert)
    return True


# -- the layer --------------------------------------------------------------------------------------------------


class TLSLayerFactory:
    """Makes each accepted connection's protocol: the app's, behind a TLSLayer.

    Counts handshakes that completed and that failed (a timeout, a bad or non-TLS client,
    a client that gave up); failures are logged by episode, not per connection.
    """

    def __init__(self, app_factory: ProtocolFactory, loop: EventLoop, tls: ServerTLS, *, name: str = "app") -> None:
        self.app_factory = app_factory
        self.loop = loop
        self.tls = tls
        self.handshakes = 0
        self.handshake_failures = 0
        #: the ALPN protocols the server offers (--tls-alpn), as a ClientHello names them
        self.alpn = frozenset(protocol.encode("ascii") for protocol in tls.options.alpn)
        self._failures = EpisodeLog(log, loop, f"{name}: TLS handshakes failed")

    def __call__(self) -> Protocol:
        app = self.app_factory()
        if not (hasattr(app, "connection_made") and hasattr(app, "data_received")):
            return app  # not a protocol: the server refuses it and says why, as without the layer
        return TLSLayer(app, self)  # type: ignore[return-value]

    def handshake_failed(self, peer: str, reason: str) -> None:
        self.handshake_failures += 1
        self._failures.event(f"from {peer}: {reason}")

    def close(self) -> None:
        """Stop the episode timer (the loop is closing)."""
        self._failures.close()


def describe_handshake_error(exc: BaseException) -> str:
    """One line about a failed handshake, for an operator: what the client did, not OpenSSL's code."""
    reason = getattr(exc, "reason", None)
    if reason == "HTTP_REQUEST":
        return "plain HTTP spoken to the TLS port"
    if reason in ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG", "RECORD_LENGTH_MISMATCH"):
        return f"not TLS: plain text spoken to the TLS port? (OpenSSL: {reason.lower().replace('_', ' ')})"
    if reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION"):
        return "the client offers no TLS version this server accepts (1.2 and later)"
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no client certificate, and --tls-verify-client requires one"
    if reason == "CERTIFICATE_VERIFY_FAILED":
        return f"the client certificate is not trusted: {getattr(exc, 'verify_message', '') or reason}"
    if reason:
        return f"OpenSSL: {reason.lower().replace('_', ' ')}"
    return f"{type(exc).__name__}: {exc}"


def check_client_hello(hello: ClientHello, alpn: frozenset[bytes]) -> tuple[int, str] | None:
    """Why pollserve refuses this ClientHello, as (alert, a line for the log); None: OpenSSL takes it on.
    Raises MalformedHello where an extension read does not parse.

    - A TLS 1.3 key exchange in a finite-field group (RFC 7919): the client chooses the group,
      and ffdhe8192 costs the server a hundred times X25519's CPU.  What counts is the group
      OpenSSL would compute in (``ClientHello.key_exchange_group``), so a client that lists
      ffdhe2048 after X25519 is served; one whose only share is ffdhe2048 is refused, even if it
      lists X25519, as OpenSSL would take that share rather than ask for another.  TLS 1.2
      needs no check: its DHE suites use the server's parameters, and pollserve loads none.
    - ALPN offered, and none of the server's protocols (``alpn``, from --tls-alpn) among it
      (RFC 7301 section 3.2: the server "SHALL respond with a fatal no_application_protocol
      alert"; Python's ssl would go on without a protocol).  A client without ALPN is served,
      and the app sees no protocol selected.
    """
    if hello.offers_tls13():
        group = hello.key_exchange_group()
        if group is not None and group in FINITE_FIELD:
            return HANDSHAKE_FAILURE, (
                f"the client asks for a finite-field key exchange ({group_name(group)}), which costs the "
                "server up to a hundred elliptic-curve ones: refused"
            )
    if alpn:
        offered = hello.alpn()
        if offered is not None and alpn.isdisjoint(offered):
            names = ",".join(name.decode("ascii", "backslashreplace") for name in offered)
            ours = ",".join(sorted(name.decode("ascii") for name in alpn))
            return NO_APPLICATION_PROTOCOL, f"the client offers ALPN {names}, none of {ours}: refused"
    return None


def alert_record(description: int) -> bytes:
    """A fatal alert in a record of its own, in clear: nothing is encrypted before the ServerHello."""
    return bytes((21, 3, 3, 0, 2, 2, description))


class TLSLayer:
    """One connection's TLS: the connection's protocol, and the app's transport (through a
    TLSTransport whose methods are this object's, bound).

    States: handshaking until ``do_handshake()`` succeeds (then the app is made and
    told ``connection_made``), open, and closing once close() or a failure has sent
    close_notify or an alert.  Handshaking begins with the ClientHello check: the first
    bytes are held (``_hello``) until they hold a whole ClientHello, which is refused with
    an alert or handed to OpenSSL with the rest.
    """

    __slots__ = (
        "_app",
        "_factory",
        "_raw",
        "_raw_write",
        "_raw_buffered",
        "_loop",
        "_incoming",
        "_outgoing",
        "_sslobj",
        "_handshaking",
        "_handshake_bytes",
        "_hello",
        "_alpn_offered",
        "_failed",
        "_timer",
        "_app_made",
        "_closing",
        "_write_eof",
        "_no_more_writes",
        "_eof_seen",
        "_eof_delivered",
        "_raw_eof",
        "_reading_paused",
        "_writing_paused",
        "_raw_paused",
        "_drain_scheduled",
        "_backlog",
        "_records",
        "_records_cipher",
        "_records_plain",
        "_high",
        "_low",
        "_peer",
        "_app_error",
        "_close_after_handshake",
    )

    def __init__(self, app: Protocol, factory: TLSLayerFactory) -> None:
        self._app = app
        self._factory = factory
        self._loop = factory.loop
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        # The context of this moment: a reload later changes new connections only.
        self._sslobj = factory.tls.context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._handshaking = True
        self._handshake_bytes = 0
        #: the server closes: a handshake under way is answered, then close_notify (server_closing)
        self._close_after_handshake = False
        #: the first bytes, until they hold a ClientHello that check_client_hello() lets through
        self._hello: ClientHelloReader | None = ClientHelloReader()
        #: the client's ALPN extension, as it sent it (get_extra_info("alpn_offered")); None: it sent none
        self._alpn_offered: bytes | None = None
        self._failed = False
        self._timer: Handle | None = None
        self._app_made = False
        self._closing = False
        self._write_eof = False
        self._no_more_writes = False
        #: close_notify received (the app's EOF), and eof_received() called on the app
        self._eof_seen = False
        self._eof_delivered = False
        #: the connection's EOF: TCP FIN, with or without close_notify before it
        self._raw_eof = False
        self._reading_paused = False
        self._writing_paused = False
        #: the connection's buffer is over its high-water mark: hold plaintext back in _backlog
        self._raw_paused = False
        self._drain_scheduled = False
        self._backlog = bytearray()
        # (ciphertext, plaintext) lengths of the records that may still be in the connection's
        # buffer, oldest first, and their sums: the plaintext that has not reached the socket
        self._records: collections.deque[tuple[int, int]] = collections.deque()
        self._records_cipher = 0
        self._records_plain = 0
        self._high = DEFAULT_HIGH_WATER
        self._low = DEFAULT_LOW_WATER
        self._peer = "?"
        #: what the app raised in a callback the loop made (a drain), for its connection_lost()
        self._app_error: Exception | None = None

    def __repr__(self) -> str:
        state = "handshaking" if self._handshaking else "closing" if self._closing else "open"
        return f"<TLSLayer {self._peer} {state}>"

    # -- the connection's protocol ---------------------------------------------------------------

    def connection_made(self, transport: Transport) -> None:
        self._raw = transport
        self._raw_write = transport.write
        self._raw_buffered = transport.get_write_buffer_size
        self._peer = format_address(transport.get_extra_info("peername"))
        self._set_raw_limits()
        self._timer = self._loop.call_later(self._factory.tls.options.handshake_timeout, self._handshake_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._handshaking:
            self._handshake_received(data)
        else:
            self._incoming.write(data)
            self._read()

    def eof_received(self) -> bool:
        """The connection's EOF.  The layer closes the connection itself (True: do not)."""
        self._raw_eof = True
        if self._handshaking:
            if self._handshake_bytes:
                self._handshake_failed(
                    f"the client closed the connection {self._handshake_bytes} bytes into the handshake"
                )
            else:  # a client that connects and leaves without a byte is no one's mistake
                self._cancel_timer()
                self._closing = self._no_more_writes = True
                self._raw.close()
            return True
        self._read()  # records that came with the FIN, then the EOF, unless the app paused reading
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        # An error is the client's doing (a reset); a clean close mid-handshake is the server's own
        # (a shutdown, the idle timeout), and no failure of the client's.  A reset before any byte
        # is a TCP health check's way to leave (HAProxy's checks close with RST), as a FIN is.
        if self._handshaking and not self._failed and exc is not None and self._handshake_bytes:
            self._failed = True
            self._factory.handshake_failed(self._peer, f"{type(exc).__name__}: {exc}, during the handshake")
        self._closing = self._no_more_writes = True
        self._backlog.clear()
        self._forget_records()
        if self._app_made:
            self._app_made = False
            self._app.connection_lost(exc if exc is not None else self._app_error)

    def pause_writing(self) -> None:
        self._raw_paused = True

    def resume_writing(self) -> None:
        self._raw_paused = False
        if self._backlog and not self._handshaking:
            self._push_backlog()
        if self._writing_paused and self._buffered_plaintext() <= self._low:
            self._writing_paused = False
            self._app.resume_writing()
            self._schedule_drain()

    # -- the handshake ---------------------------------------------------------------------------

    def _handshake_received(self, data: bytes) -> None:
        if self._closing:  # refused, or failed: nothing more goes to OpenSSL
            return
        self._handshake_bytes += len(data)
        reader = self._hello
        if reader is None:
            self._incoming.write(data)
        elif self._hello_read(reader, data):
            self._hello = None
            self._incoming.write(reader.flight)
        else:
            return
        self._do_handshake()

    def _hello_read(self, reader: ClientHelloReader, data: bytes) -> bool:
        """Whether the first bytes go to OpenSSL now; False: more are needed, or they were refused."""
        try:
            hello = reader.feed(data)
            if hello is None:
                return False  # more to come, within the handshake timeout
            refusal = check_client_hello(hello, self._factory.alpn)
        except NotAHandshake:
            return True  # not TLS: OpenSSL refuses it, and says what it is (plain HTTP ...)
        except HelloTooLarge as exc:
            self._refuse(ILLEGAL_PARAMETER, str(exc))
            return False
        except HelloError as exc:
            self._refuse(DECODE_ERROR, f"a malformed ClientHello: {exc}")
            return False
        if refusal is not None:
            self._refuse(*refusal)
            return False
        self._alpn_offered = hello.extensions.get(ALPN)
        return True

    def _refuse(self, alert: int, reason: str) -> None:
        """Fail the handshake before OpenSSL has seen it, telling the client why with an alert."""
        self._hello = None
        self._raw_write(alert_record(alert))
        self._handshake_failed(reason)

    def _do_handshake(self) -> None:
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()  # ServerHello ... Finished: the handshake's flight goes out now
            return
        except (ssl.SSLError, ssl.CertificateError) as exc:
            self._handshake_failed(describe_handshake_error(exc))
            return
        self._handshaking = False
        self._cancel_timer()
        self._factory.handshakes += 1
        self._flush()  # the NewSessionTicket messages (RFC 8446 section 4.6.1)
        if self._close_after_handshake:  # the server is closing: the handshake was its answer
            self._closing = self._no_more_writes = True
            self._send_close_notify()
            self._raw.close()
            return
        self._app_made = True
        self._app.connection_made(TLSTransport(self))
        if self._backlog and not self._raw_paused:
            self._push_backlog()
        # The client's first records often come in the segment that carried its Finished:
        # no readiness event will announce them.
        if self._incoming.pending and not self._closing:
            self._read()

    def _handshake_failed(self, reason: str) -> None:
        self._cancel_timer()
        if not self._failed:
            self._failed = True
            self._factory.handshake_failed(self._peer, reason)
        self._closing = self._no_more_writes = True
        self._flush()  # the alert OpenSSL wrote, if any, so that the client learns why
        self._raw.close()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._handshaking and not self._closing:
            self._failed = True
            timeout = self._factory.tls.options.handshake_timeout
            self._factory.handshake_failed(
                self._peer, f"no handshake within {timeout:g} s ({self._handshake_bytes} bytes received)"
            )
            self._closing = self._no_more_writes = True
            self._raw.abort()  # no reply to protect: free the slot now, without a linger

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- reading -------------------------------------------------------------------------------------

    def _read(self) -> None:
        """Hand the app every record's plaintext until OpenSSL wants more, the app pauses,
        or the connection closes; then send what the reads wrote."""
        sslobj = self._sslobj
        incoming = self._incoming
        while not (self._reading_paused or self._writing_paused or self._closing or self._eof_seen):
            try:
                data = sslobj.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._eof_seen = True
                break
            except ssl.SSLError as exc:
                self._fail(exc)
                return
            if not data:  # close_notify, as SSLObject.read() reports it when it has not sent its own
                self._eof_seen = True
                break
            self._app.data_received(data)
            # Nothing in the BIO and nothing decrypted in the SSLObject: another read would only
            # raise SSLWantReadError, whose message costs OpenSSL and Python more than this check.
            # Without read-ahead (the default) OpenSSL takes from the BIO only the record it decrypts.
            if not incoming.pending and not sslobj.pending():
                break
        if self._outgoing.pending:
            self._flush()  # a read can write: an alert, a ticket acknowledgement
        if (self._eof_seen or self._raw_eof) and not self._eof_delivered and self._drained():
            self._deliver_eof()

    def _drained(self) -> bool:
        """The app has had every byte before the end of file and is reading: close_notify came,
        or the FIN did and neither the BIO nor the SSLObject holds anything more."""
        if self._closing or self._reading_paused or self._writing_paused:
            return False
        return self._eof_seen or not (self._incoming.pending or self._sslobj.pending())

    def _deliver_eof(self) -> None:
        self._eof_delivered = True
        keep_open = self._app.eof_received()
        if not keep_open:
            self.close()
        elif self._write_eof:
            self._raw.close()  # both directions are shut

    def _schedule_drain(self) -> None:
        """After a pause: the kernel will not signal plaintext that is already inside."""
        if self._drain_scheduled or self._closing or self._handshaking:
            return
        if (
            self._incoming.pending
            or self._sslobj.pending()
            or ((self._eof_seen or self._raw_eof) and not self._eof_delivered)
        ):
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        if self._closing:
            return
        eof_delivered = self._eof_delivered
        try:
            self._read()
        except Exception as exc:
            # Called by the loop, not from the connection's handler, which would catch it: fail
            # as it does, with the app's exception for its connection_lost().
            method = "data_received" if self._eof_delivered == eof_delivered else "eof_received"
            log.error("app error in %s for %s; closing it", method, self._peer, exc_info=exc)
            self._app_error = exc
            self.abort()

    def _fail(self, exc: ssl.SSLError) -> None:
        """A fatal TLS error after the handshake (a bad record MAC, an unexpected message): the
        client's fault or the network's; the alert goes out and the connection closes."""
        log.debug("TLS error from %s: %s; closing it", self._peer, exc)
        self._closing = self._no_more_writes = True
        self._flush()
        self._raw.close()

    # -- writing -------------------------------------------------------------------------------------

    def _flush(self) -> None:
        """Send what OpenSSL wrote that is not the app's: handshake, tickets, alerts, close_notify."""
        cipher = self._outgoing.read()
        if cipher:
            self._send(cipher, 0)

    def _send(self, cipher: bytes, plain: int) -> None:
        """Hand ciphertext to the connection, remembering how much plaintext it carries
        while the connection keeps any of it buffered."""
        self._raw_write(cipher)
        if self._raw_buffered():
            self._records.append((len(cipher), plain))
            self._records_cipher += len(cipher)
            self._records_plain += plain
        elif self._records:
            self._forget_records()

    def _forget_records(self) -> None:
        self._records.clear()
        self._records_cipher = self._records_plain = 0

    def _buffered_plaintext(self) -> int:
        """Plaintext the app wrote that has not reached the socket: what waits here, plus what the
        records still in the connection's buffer carry (a record partly sent counts in part)."""
        waiting = self._raw_buffered()
        if not waiting:
            if self._records:
                self._forget_records()
            return len(self._backlog)
        records = self._records
        # The buffer holds the newest `waiting` bytes of the ciphertext: older records have left.
        while records and self._records_cipher - records[0][0] >= waiting:
            cipher, plain = records.popleft()
            self._records_cipher -= cipher
            self._records_plain -= plain
        if not records:
            return len(self._backlog)
        sent_of_oldest = self._records_cipher - waiting
        return len(self._backlog) + self._records_plain - min(sent_of_oldest, records[0][1])

    def _encrypt(self, data: bytes | bytearray | memoryview) -> None:
        try:
            # A memory BIO takes all of it: SSL_write(3) returns only once every record is made.
            self._sslobj.write(data)
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._send(self._outgoing.read(), len(data))

    def _push_backlog(self) -> None:
        """Encrypt held-back plaintext while the connection takes it."""
        backlog = self._backlog
        while backlog and not self._raw_paused and not self._raw.is_closing():
            chunk = bytes(backlog[:ENCRYPT_CHUNK])
            del backlog[:ENCRYPT_CHUNK]
            self._encrypt(chunk)

    # -- the app's transport -----------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send now, unless the socket is congested: then hold the plaintext back."""
        if data.__class__ is not bytes:
            data = _byte_view(data)
        if self._no_more_writes or not data:
            return
        if self._raw_paused or self._backlog:
            self._backlog += data
        else:
            self._encrypt(data)
        if (self._backlog or self._records) and not self._writing_paused and self._buffered_plaintext() > self._high:
            self._writing_paused = True
            self._app.pause_writing()

    def write_eof(self) -> None:
        """Send close_notify, then FIN, and go on reading (TLS 1.3 half-close, RFC 8446 section 6.1)."""
        if self._closing or self._write_eof:
            return
        self._write_eof = self._no_more_writes = True
        # Python's unwrap() calls SSL_shutdown(3) a second time, to read the client's close_notify,
        # and OpenSSL drops application records that read meets once close_notify is sent
        # (ssl3_read_bytes).  Records the app has not read yet are kept out of its way.
        unread = self._incoming.read() if self._incoming.pending else b""
        self._send_close_notify()
        if unread:
            self._incoming.write(unread)
        if self._eof_delivered:
            self._raw.close()  # both directions are shut
        else:
            self._raw.write_eof()

    def close(self) -> None:
        """Send what is held back and close_notify, then close the connection (which lingers)."""
        if self._closing:
            return
        self._closing = self._no_more_writes = True
        if not self._write_eof:
            self._send_close_notify()
        self._raw.close()

    def server_closing(self) -> bool:
        """The server closes this connection itself (shutdown, idle timeout): close_notify first, so
        the client sees the end of the session rather than a truncation (RFC 8446 section 6.1).
        The connection then flushes it and closes as usual.  The app is told as it is without the
        layer, when it has a ``server_closing`` of its own (an ``async def`` app's reader ends there).

        True when the layer closes the connection itself, later: a client whose handshake is under
        way has spoken, and gets its answer before the close, as what any client sent before a
        shutdown does (the handshake's timer and the shutdown's bound it); the app is never made."""
        if self._handshaking:
            if self._handshake_bytes and not (self._closing or self._failed):
                self._close_after_handshake = True
                return True
            return False
        if self._closing or self._write_eof or self._failed:
            return False
        self._closing = self._no_more_writes = True
        self._send_close_notify()
        goodbye = getattr(self._app, "server_closing", None)
        if goodbye is not None:
            goodbye()
        return False

    def _send_close_notify(self) -> None:
        if self._backlog:
            data = bytes(self._backlog)
            self._backlog.clear()
            self._encrypt(data)  # all of it: the connection buffers and flushes it before its FIN
        try:
            self._sslobj.unwrap()
        except ssl.SSLWantReadError:
            pass  # sent; the client's close_notify is not waited for
        except ssl.SSLError as exc:  # after a fatal error no close_notify can be sent
            log.debug("no close_notify to %s: %s", self._peer, exc)
        self._flush()

    def abort(self) -> None:
        self._closing = self._no_more_writes = True
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def pause_reading(self) -> None:
        if self._reading_paused or self._closing:
            return
        self._reading_paused = True
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        self._raw.resume_reading()
        self._schedule_drain()

    def is_reading(self) -> bool:
        return not (self._closing or self._eof_delivered or self._reading_paused or self._writing_paused)

    def get_write_buffer_size(self) -> int:
        """Plaintext bytes not yet sent."""
        return self._buffered_plaintext()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Backpressure thresholds in plaintext bytes (defaults: 64 KiB and a quarter of high)."""
        high = DEFAULT_HIGH_WATER if high is None else high
        low = high // 4 if low is None else low
        if not 0 <= low <= high:
            raise ValueError(f"need 0 <= low <= high, got high={high} low={low}")
        self._high, self._low = high, low
        self._set_raw_limits()
        if not self._writing_paused and not self._closing and self._buffered_plaintext() > high:
            self._writing_paused = True
            self._app.pause_writing()

    def _set_raw_limits(self) -> None:
        # While the connection is not paused, its buffer is at most its high-water mark, and so is
        # the plaintext in it: with that mark at the app's low one, a paused app's plaintext is
        # below its low-water mark by the time the connection resumes, and the app is told then.
        self._raw.set_write_buffer_limits(self._low, self._low // 2)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``ssl_object``, ``peercert``, ``cipher``, ``compression``, ``sslcontext`` as asyncio's
        TLS transports offer them; ``alpn_offered``, the protocols the client's ALPN listed, in
        its order (``[]``: it sent no ALPN); anything else is the connection's (``peername``,
        ``socket``...)."""
        sslobj = self._sslobj
        if name == "ssl_object":
            return sslobj
        if name == "alpn_offered":
            return self._offered_protocols()
        if name == "peercert":
            return sslobj.getpeercert()
        if name == "cipher":
            return sslobj.cipher()
        if name == "compression":
            return sslobj.compression()
        if name == "sslcontext":
            return sslobj.context
        return self._raw.get_extra_info(name, default)

    def _offered_protocols(self) -> list[str]:
        if self._alpn_offered is None:
            return []
        try:
            names = alpn_names(self._alpn_offered)
        except MalformedHello:  # not read when the server has no ALPN, and OpenSSL took it
            return []
        return [name.decode("ascii", "backslashreplace") for name in names]

    def set_protocol(self, protocol: Protocol) -> None:
        self._app = protocol

    def get_protocol(self) -> Protocol:
        return self._app


class TLSTransport(LayeredTransport):
    """What the app behind the layer is handed: every method is the layer's own, bound, so a
    call costs one call; ``get_extra_info`` too (the TLS details are the layer's)."""

    __slots__ = ("get_extra_info",)

    def __init__(self, layer: TLSLayer) -> None:
        super().__init__(layer)
        self.get_extra_info = layer.get_extra_info  # type: ignore[method-assign]
