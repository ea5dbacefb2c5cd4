"""The TLS policy a server serves by default: TLS 1.3, and TLS 1.2 with ECDHE key exchange and AEAD
ciphers only; ``--tls-ciphers`` widens or narrows TLS 1.2.  Checked from outside by Debian's
sslscan against the real command, and by Python's ssl clients offering one kind of suite each,
with an ECDSA and an RSA certificate (static RSA key exchange needs the latter).
"""

from __future__ import annotations

import os
import ssl
import subprocess
import xml.etree.ElementTree as ElementTree

import pytest
import trustme
from clients import connect
from inprocess import wait_until
from serverproc import run_pollserve
from systools import system_tool
from tlshelpers import HOSTNAME, Certs, make_certs, tls_connect, tls_serving

from pollserve.apps import Echo
from pollserve.tls import DEFAULT_TLS12_CIPHERS

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
