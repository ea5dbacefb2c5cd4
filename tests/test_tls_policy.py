"""The TLS policy a server serves by default: TLS 1.3, and TLS 1.2 with ECDHE key exchange and AEAD
ciphers only; ``--tls-ciphers`` widens or narrows TLS 1.2.  Checked from outside by Debian's
sslscan against the real command, and by Python's ssl clients offering one kind of suite each,
with an ECDSA and an RSA certificate (static RSA key exchange needs the latter).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import ssl
import subprocess
import time
import xml.etree.ElementTree as ElementTree

import pytest
import trustme
from clients import connect
from inprocess import wait_until
from serverproc import run_pollserve
from systools import system_tool
from tlshelpers import (
    FFDHE2048,
    FFDHE8192,
    HANDSHAKE_FAILURE,
    HOSTNAME,
    SECP256R1,
    SECP384R1,
    X25519,
    BIOClient,
    Certs,
    client_hello,
    handshake_message,
    make_certs,
    records,
    recv_plain,
    s_client,
    tls_connect,
    tls_serving,
    uses_openssl,
)

from pollserve.apps import Echo
from pollserve.tls import DEFAULT_TLS12_CIPHERS, server_context

AEAD = ("-GCM-", "-CHACHA20-POLY1305")


@pytest.fixture(scope="module", params=["ecdsa", "rsa"])
def certs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Certs:
    folder = tmp_path_factory.mktemp(f"policy-{request.param}")
    if request.param == "ecdsa":
        return make_certs(folder)
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    server = ca.issue_cert(HOSTNAME, "127.0.0.1", key_type=trustme.KeyType.RSA)
    paths = {name: str(folder / name) for name in ("ca.pem", "cert.pem", "key.pem")}
    ca.cert_pem.write_to_path(paths["ca.pem"])
    rsa = Certs(ca, server, paths["ca.pem"], paths["cert.pem"], paths["key.pem"], "")
    rsa.write_server_files(rsa.cert_file, rsa.key_file)
    return rsa


def tls12_client(certs: Certs, ciphers: str) -> ssl.SSLContext:
    context = certs.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(ciphers)
    return context


#: what a client offering only one kind of TLS 1.2 suite gets from the default policy
OFFERS = {
    "ecdhe-aes-gcm": ("ECDHE+AESGCM", True),
    "ecdhe-chacha20": ("ECDHE+CHACHA20", True),
    "ecdhe-cbc": ("ECDHE+AES:!AESGCM:!AESCCM", False),
    "dhe-aead": ("DHE+AESGCM:DHE+CHACHA20", False),
    "static-rsa": ("kRSA", False),
}


@pytest.mark.parametrize("offer", OFFERS)
def test_tls12_suites_served_by_default(backend_name: str, certs: Certs, offer: str) -> None:
    ciphers, accepted = OFFERS[offer]
    with tls_serving(backend_name, Echo, certs.options()) as (server, layers):
        if accepted:
            with tls_connect(server.address, tls12_client(certs, ciphers)) as sock:
                assert sock.version() == "TLSv1.2"
                name = sock.cipher()[0]
                assert name.startswith("ECDHE-") and any(mark in name for mark in AEAD), name
                sock.sendall(b"ping")
                assert sock.recv(4) == b"ping"
        else:
            with pytest.raises(ssl.SSLError), connect(server.address) as raw:
                tls12_client(certs, ciphers).wrap_socket(raw, server_hostname=HOSTNAME).close()
            wait_until(lambda: layers.handshake_failures == 1)


def test_tls13_is_served(backend_name: str, certs: Certs) -> None:
    with (
        tls_serving(backend_name, Echo, certs.options()) as (server, _),
        tls_connect(server.address, certs.client_context()) as sock,
    ):
        assert sock.version() == "TLSv1.3"


def test_tls_ciphers_widens_tls12(backend_name: str, certs: Certs) -> None:
    cbc = OFFERS["ecdhe-cbc"][0]
    with (
        tls_serving(backend_name, Echo, certs.options(ciphers=f"{DEFAULT_TLS12_CIPHERS}:ECDHE+AES")) as (server, _),
        tls_connect(server.address, tls12_client(certs, cbc)) as sock,
    ):
        assert "GCM" not in sock.cipher()[0] and sock.version() == "TLSv1.2"


def test_dhe_suites_named_in_tls_ciphers_are_never_chosen(backend_name: str, certs: Certs) -> None:
    """A context has no DH parameters unless load_dh_params() is called, and pollserve never calls
    it: a client offering only DHE suites is refused even when --tls-ciphers names them."""
    options = certs.options(ciphers=f"{DEFAULT_TLS12_CIPHERS}:DHE+AESGCM")
    with tls_serving(backend_name, Echo, options) as (server, layers):
        with pytest.raises(ssl.SSLError), connect(server.address) as raw:
            tls12_client(certs, OFFERS["dhe-aead"][0]).wrap_socket(raw, server_hostname=HOSTNAME).close()
        wait_until(lambda: layers.handshake_failures == 1)


class TestCommandLine:
    def test_a_cipher_string_openssl_rejects_is_one_line_exit_2(self, certs: Certs) -> None:
        result = run_pollserve(
            "--port", "0", "--tls-cert", certs.cert_file, "--tls-key", certs.key_file, "--tls-ciphers", "NO-SUCH-CIPHER"
        )
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "pollserve: --tls-ciphers 'NO-SUCH-CIPHER': OpenSSL selects no cipher from it"
        ], result.stderr

    def test_tls_ciphers_needs_tls_cert(self) -> None:
        result = run_pollserve("--port", "0", "--tls-ciphers", "ECDHE+AESGCM")
        assert result.returncode == 2
        assert "--tls-ciphers needs --tls-cert" in result.stderr and "Traceback" not in result.stderr


def sslscan(address: tuple[str, int]) -> ElementTree.Element:
    """sslscan's XML report on the server at address (what it accepts, protocol by protocol)."""
    tool = system_tool("sslscan", "sslscan")
    result = subprocess.run(
        [
            tool,
            "--xml=-",
            "--no-colour",
            "--no-groups",
            "--no-heartbleed",
            "--no-compression",
            f"{address[0]}:{address[1]}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return ElementTree.fromstring(result.stdout[result.stdout.index("<?xml") :])


def accepted(report: ElementTree.Element) -> dict[str, list[str]]:
    suites: dict[str, list[str]] = {}
    for cipher in report.iter("cipher"):
        if cipher.get("status") in ("accepted", "preferred"):
            suites.setdefault(cipher.get("sslversion", "?"), []).append(cipher.get("cipher", "?"))
    return suites


@pytest.mark.skipif(
    os.environ.get("POLLSERVE_BACKEND", "auto") != "auto",
    reason="the policy is the TLS layer's, the same over every backend: scanned in the runs without POLLSERVE_BACKEND",
)
def test_sslscan_finds_tls13_and_tls12_ecdhe_aead_only(start_server, certs: Certs) -> None:
    system_tool("sslscan", "sslscan")
    server = start_server("--tls-cert", certs.cert_file, "--tls-key", certs.key_file, "--port", "0")
    report = sslscan(server.address)
    enabled = {
        f"{protocol.get('type')}{protocol.get('version')}"
        for protocol in report.iter("protocol")
        if protocol.get("enabled") == "1"
    }
    assert enabled == {"tls1.2", "tls1.3"}
    suites = accepted(report)
    assert set(suites) == {"TLSv1.2", "TLSv1.3"}, suites
    for name in suites["TLSv1.2"]:
        assert name.startswith("ECDHE-") and any(mark in name for mark in AEAD), suites["TLSv1.2"]
    assert len(suites["TLSv1.2"]) == 3  # AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305 for the key's type
    renegotiation = report.find(".//renegotiation")
    assert renegotiation is not None and renegotiation.get("supported") == "0"


# -- key exchange: a client does not choose what its handshake costs the server ----------------------------------------


@pytest.fixture(scope="module")
def ec_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("groups"))


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def assert_still_serving(server, certs: Certs) -> None:
    with tls_connect(server.address, certs.client_context()) as sock:
        sock.sendall(b"still here")
        assert recv_plain(sock, 10) == b"still here"


#: s_client's -groups, and how its "Server Temp Key" line names the group
ELLIPTIC_CURVES = {"X25519": "X25519", "P-256": "prime256v1", "P-384": "secp384r1"}


@uses_openssl
@pytest.mark.parametrize("group", ELLIPTIC_CURVES)
def test_a_client_offering_one_elliptic_curve_completes(backend_name: str, ec_certs: Certs, group: str) -> None:
    with tls_serving(backend_name, Echo, ec_certs.options()) as (server, layers):
        output = s_client(server.address, ec_certs.ca_file, "-groups", group, "-verify_return_error")
        assert re.search(rf"Server Temp Key: .*\b{ELLIPTIC_CURVES[group]}\b", output), output
        wait_until(lambda: layers.handshakes == 1)
        assert layers.handshake_failures == 0


@uses_openssl
@pytest.mark.parametrize(
    "groups",
    [
        "ffdhe2048",
        "ffdhe8192",
        # X25519 listed, but s_client sends a key share for the first group only: OpenSSL would
        # compute in ffdhe2048 rather than ask for an X25519 share (HelloRetryRequest)
        "ffdhe2048:X25519",
    ],
)
def test_a_client_asking_for_a_finite_field_group_is_refused(
    backend_name: str, ec_certs: Certs, groups: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO, logger="pollserve"),
        tls_serving(backend_name, Echo, ec_certs.options()) as (server, layers),
    ):
        output = s_client(server.address, ec_certs.ca_file, "-groups", groups)
        assert "alert handshake failure" in output and "Server Temp Key" not in output, output
        wait_until(lambda: layers.handshake_failures == 1)
        assert layers.handshakes == 0
        assert_still_serving(server, ec_certs)
    (line,) = warnings_about(caplog, "TLS handshakes failed")
    assert f"finite-field key exchange ({groups.split(':')[0]})" in line, line
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def first_reply(address, flight: bytes, *, chunk: int = 0) -> bytes:
    """What the server sends back to ``flight`` (in ``chunk``-byte sends, if given) up to its
    first pause or its EOF."""
    with connect(address, timeout=10) as sock:
        if chunk:
            for start in range(0, len(flight), chunk):
                sock.sendall(flight[start : start + chunk])
                time.sleep(0.001)  # most of them in segments of their own
        else:
            sock.sendall(flight)
        reply = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while chunk_read := sock.recv(65536):
                reply += chunk_read
                if not reply.startswith(b"\x15"):
                    break  # a handshake: the ServerHello's record came
        return bytes(reply)


#: hand-made TLS 1.3 offers: (supported_groups, key shares sent, served?)
OFFERS_13 = {
    "x25519": ((X25519,), (X25519,), True),
    "ffdhe2048-only": ((FFDHE2048,), (FFDHE2048,), False),
    "ffdhe-share-first": ((FFDHE2048, X25519), (FFDHE2048, X25519), False),
    "x25519-share-first": ((X25519, FFDHE2048), (X25519, FFDHE2048), True),
    "no-share-ffdhe8192": ((FFDHE8192,), (), False),
    "no-share-x25519-listed-first": ((X25519, FFDHE2048), (), True),  # a HelloRetryRequest for X25519
}


@pytest.mark.parametrize("offer", OFFERS_13)
@pytest.mark.parametrize("fragment", [0, 7], ids=["one-record", "7-byte-records"])
def test_offers_made_by_hand(backend_name: str, ec_certs: Certs, offer: str, fragment: int) -> None:
    """The refusal is one handshake_failure alert, in clear, before any ServerHello (RFC 8446
    section 6.2), however the ClientHello is cut into records and segments."""
    groups, shares, served = OFFERS_13[offer]
    hello = client_hello(groups=groups, key_shares=shares)
    flight = records(hello, fragment) if fragment else records(hello)
    with tls_serving(backend_name, Echo, ec_certs.options()) as (server, layers):
        reply = first_reply(server.address, flight, chunk=5 if fragment else 0)
        if served:
            assert reply[:3] == b"\x16\x03\x03", reply[:16]  # ServerHello or HelloRetryRequest
        else:
            assert reply == HANDSHAKE_FAILURE
            wait_until(lambda: layers.handshake_failures == 1)


def test_a_tls12_offer_of_finite_field_groups_gets_ecdhe(backend_name: str, ec_certs: Certs) -> None:
    """TLS 1.2 computes DHE with the server's parameters, never the client's group, and pollserve
    loads none (no DHE suite is served): the groups a TLS 1.2 client lists cost nothing."""
    # P-256 too: in TLS 1.2 the groups also bound the ECDSA certificate's curve (RFC 8422 section 5.1)
    hello = client_hello(groups=(FFDHE2048, X25519, SECP256R1), tls13=False)
    with tls_serving(backend_name, Echo, ec_certs.options()) as (server, _):
        assert first_reply(server.address, records(hello))[:3] == b"\x16\x03\x03"


def test_a_python_client_hello_cut_into_records_and_segments_completes(backend_name: str, ec_certs: Certs) -> None:
    with tls_serving(backend_name, Echo, ec_certs.options()) as (server, layers):
        with BIOClient(server.address, ec_certs.client_context()) as client:
            with contextlib.suppress(ssl.SSLWantReadError):
                client.obj.do_handshake()
            flight = records(handshake_message(client.outgoing.read()), 11)
            for start in range(0, len(flight), 3):  # record headers cut in two, too
                client.sock.sendall(flight[start : start + 3])
            client.handshake()
            client.write(b"ping")
            assert client.read(4) == b"ping"
        wait_until(lambda: layers.handshakes == 1)


#: ServerHello.random of a HelloRetryRequest: SHA-256 of "HelloRetryRequest" (RFC 8446 section 4.1.3)
HELLO_RETRY_REQUEST = hashlib.sha256(b"HelloRetryRequest").digest()


def test_a_context_of_the_apps_own_gets_the_check_and_a_hello_retry_request_works(
    backend_name: str, ec_certs: Certs
) -> None:
    """ServerTLS takes a context the app made, and the layer's check holds for it too.  This one
    serves P-384 only (set_ecdh_curve), so a Python client, whose one share is X25519's, is asked
    for another: its second ClientHello goes to OpenSSL as it comes, and the handshake completes."""
    context = server_context(ec_certs.options())
    context.set_ecdh_curve("secp384r1")
    with tls_serving(backend_name, Echo, ec_certs.options(), context) as (server, layers):
        with BIOClient(server.address, ec_certs.client_context()) as client:
            with contextlib.suppress(ssl.SSLWantReadError):
                client.obj.do_handshake()
            client.flush()
            reply = b""
            while len(reply) < 5 + 4 + 2 + 32:  # record header, handshake header, version, random
                data = client.sock.recv(65536)
                assert data, "EOF before the server's first flight"
                reply += data
            assert reply[11:43] == HELLO_RETRY_REQUEST
            client.incoming.write(reply)
            client.handshake()
            client.write(b"ping")
            assert client.read(4) == b"ping"
        hello = client_hello(groups=(FFDHE2048, SECP384R1), key_shares=(FFDHE2048,))
        assert first_reply(server.address, records(hello)) == HANDSHAKE_FAILURE
        wait_until(lambda: (layers.handshakes, layers.handshake_failures) == (1, 1))
