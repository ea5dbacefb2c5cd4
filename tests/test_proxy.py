"""The PROXY protocol layer (pollserve.proxy), /healthz and --drain-delay.

- The parser, fed bytes: v1 and v2, every family and command, every way a header is wrong,
  and hypothesis fuzzing that only BadHeader ever comes out of it.
- The layer over real sockets on every backend: the app sees the real client, gets the bytes
  that came with the header, and never sees a connection whose header is bad, missing, slow
  or from a peer outside --proxy-from.
- The command: the options' checks, and /healthz with --drain-delay end to end.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from clients import connect, exchange, recv_exactly, recv_until_eof, request_rounds
from hypothesis import given, settings
from hypothesis import strategies as st
from inprocess import in_loop, serving, wait_until
from sample_apps import BIG_REPLY_SIZE, ReplyPeername
from serverproc import run_pollserve
from statsclient import get_stats, http_get, stats_address, wait_for

from pollserve.apps import Echo, Protocol
from pollserve.http import HTTPEndpoint
from pollserve.loop import EventLoop
from pollserve.proxy import (
    V1_MAX_LENGTH,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    BadHeader,
    ProxyHeader,
    ProxyLayerFactory,
    parse_header,
    parse_networks,
)
from pollserve.service import Health

TESTS_DIR = str(Path(__file__).parent)
POSIX = sys.platform != "win32"
HELLO = b"Hello world\n"


# -- building headers, as a balancer sends them ----------------------------------------------------


def v1(protocol: str = "TCP4", source: str = "203.0.113.7", destination: str = "198.51.100.1", ports=(40000, 5001)):
    return f"PROXY {protocol} {source} {destination} {ports[0]} {ports[1]}\r\n".encode()


def v2(block: bytes = b"", *, command: int = 1, family: int = 0x11, version: int = 2) -> bytes:
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + len(block).to_bytes(2, "big") + block


def v2_inet(source: str, destination: str, ports=(40000, 443), tlvs: bytes = b"") -> bytes:
    hosts = [ipaddress.ip_address(source), ipaddress.ip_address(destination)]
    family = 0x11 if hosts[0].version == 4 else 0x21
    block = hosts[0].packed + hosts[1].packed + ports[0].to_bytes(2, "big") + ports[1].to_bytes(2, "big")
    return v2(block + tlvs, family=family)


def v2_unix(source: bytes, destination: bytes) -> bytes:
    return v2(source.ljust(108, b"\0") + destination.ljust(108, b"\0"), family=0x31)


#: one of each kind of valid header, with the source address it names (None: the real one)
VALID = [
    (v1(), ("203.0.113.7", 40000)),
    (v1("TCP6", "2001:db8::7", "2001:db8::1"), ("2001:db8::7", 40000, 0, 0)),
    (b"PROXY UNKNOWN\r\n", None),
    (v2_inet("203.0.113.7", "198.51.100.1"), ("203.0.113.7", 40000)),
    (v2_inet("2001:db8::7", "2001:db8::1"), ("2001:db8::7", 40000, 0, 0)),
    (v2_unix(b"/run/client.sock", b"/run/pollserve.sock"), "/run/client.sock"),
    (v2(b"", command=0, family=0), None),
    (v2(b"\x01" * 12, family=0x00), None),
]


# -- the parser --------------------------------------------------------------------------------------


class TestV1:
    def test_tcp4(self) -> None:
        line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        header = parse_header(line + b"GET / HTTP/1.1\r\n")
        assert header == ProxyHeader(1, False, socket.AF_INET, ("192.168.0.1", 56324), ("192.168.0.11", 443), len(line))

    def test_tcp6_addresses_come_out_as_getpeername_gives_them(self) -> None:
        header = parse_header(v1("TCP6", "2001:DB8:0:0:0:0:0:7", "::ffff:192.0.2.1", (0, 65535)))
        assert header is not None
        assert header.source == ("2001:db8::7", 0, 0, 0)
        assert header.destination == ("::ffff:192.0.2.1", 65535, 0, 0)

    @pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n"])
    def test_unknown_means_the_real_addresses(self, line: bytes) -> None:
        header = parse_header(line + b"data")
        assert header == ProxyHeader(1, False, socket.AF_UNSPEC, None, None, len(line))

    def test_the_longest_line_is_107_bytes(self) -> None:
        longest = b"PROXY UNKNOWN " + b"f" * (V1_MAX_LENGTH - 16) + b"\r\n"
        assert len(longest) == V1_MAX_LENGTH
        assert parse_header(longest) is not None
        with pytest.raises(BadHeader, match="no CRLF in the first 107 bytes"):
            parse_header(longest[:-2] + b"f\r\n")

    def test_107_bytes_without_crlf_are_refused_without_waiting_for_more(self) -> None:
        assert parse_header(b"PROXY UNKNOWN " + b"f" * (V1_MAX_LENGTH - 15)) is None  # 106 bytes
        with pytest.raises(BadHeader):
            parse_header(b"PROXY UNKNOWN " + b"f" * (V1_MAX_LENGTH - 14))

    @pytest.mark.parametrize(
        ("line", "why"),
        [
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "lone LF"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "lone CR"),
            (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "each after one space"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "each after one space"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "each after one space"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "each after one space"),
            (b"PROXY \r\n", "each after one space"),
            (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown v1 protocol"),
            (b"PROXY UNKNOWNX\r\n", "each after one space"),
            (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "not an IPv4 address"),
            (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "not an IPv4 address"),
            (b"PROXY TCP4 ::1 ::1 1 2\r\n", "not an IPv4 address"),
            (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "not an IPv6 address"),
            (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "not an IPv6 address"),
            (b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n", "not an IPv4 address"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "bad port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "bad port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xd9\xa1\r\n", "bad port"),
        ],
    )
    def test_bad_lines(self, line: bytes, why: str) -> None:
        with pytest.raises(BadHeader, match=why):
            parse_header(line)


class TestV2:
    def test_tcp4_with_the_apps_bytes_after_it(self) -> None:
        header = v2_inet("203.0.113.7", "198.51.100.1", (40000, 443))
        assert len(header) == 28
        assert parse_header(header + b"\r\n\r\nmore") == ProxyHeader(
            2, False, socket.AF_INET, ("203.0.113.7", 40000), ("198.51.100.1", 443), 28
        )

    def test_tcp6(self) -> None:
        parsed = parse_header(v2_inet("2001:db8::7", "2001:db8::1", (1, 2)))
        assert parsed is not None and parsed.family == socket.AF_INET6 and parsed.length == 52
        assert (parsed.source, parsed.destination) == (("2001:db8::7", 1, 0, 0), ("2001:db8::1", 2, 0, 0))

    def test_unix_paths_and_abstract_names(self) -> None:
        parsed = parse_header(v2_unix(b"/run/client.sock", b"\0abstract"))
        assert parsed is not None and parsed.family == socket.AF_UNIX and parsed.length == 16 + 216
        assert (parsed.source, parsed.destination) == ("/run/client.sock", b"\0abstract")

    def test_tlvs_after_the_addresses_are_kept_and_skipped(self) -> None:
        tlvs = b"\x05\x00\x04uid1" + b"\x04\x00\x00"  # PP2_TYPE_UNIQUE_ID, PP2_TYPE_NOOP
        parsed = parse_header(v2_inet("203.0.113.7", "198.51.100.1", tlvs=tlvs) + b"app")
        assert parsed is not None and parsed.tlvs == tlvs and parsed.length == 28 + len(tlvs)

    def test_local_skips_whatever_block_it_has(self) -> None:
        """Section 2.2: receivers "must not assume zero is presented for LOCAL connections"; the
        family is ignored, even one that would be refused with PROXY."""
        for family in (0x00, 0x11, 0xFF):
            parsed = parse_header(v2(b"x" * 12, command=0, family=family) + b"app")
            assert parsed == ProxyHeader(2, True, socket.AF_UNSPEC, None, None, 28)

    @pytest.mark.parametrize("family", [0x00, 0x10, 0x20, 0x30])
    def test_unspecified_family_or_transport_means_the_real_addresses(self, family: int) -> None:
        parsed = parse_header(v2(b"\x01" * 36, family=family))
        assert parsed is not None and parsed.source is None and parsed.length == 52

    def test_dgram_addresses_are_read_too(self) -> None:
        block = ipaddress.ip_address("192.0.2.1").packed * 2 + b"\x00\x35\x00\x35"
        parsed = parse_header(v2(block, family=0x12))
        assert parsed is not None and parsed.source == ("192.0.2.1", 53)

    def test_the_largest_block_allowed(self) -> None:
        assert parse_header(v2(b"\0" * V2_MAX_LENGTH, family=0)) is not None

    @pytest.mark.parametrize(
        ("data", "why"),
        [
            (b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c", "signature"),
            (b"\r\n\r\n\r\n", "signature"),
            (v2(b"\0" * 12, version=1), "version 1"),
            (v2(b"\0" * 12, version=3), "version 3"),
            (v2(b"\0" * 12, command=2), "command 2"),
            (v2(b"\0" * 12, command=0xF), "command 15"),
            (v2(b"\0" * 12, family=0x41), "family and transport 0x41"),
            (v2(b"\0" * 12, family=0x13), "family and transport 0x13"),
            (v2(b"\0" * 8, family=0x11), "AF_INET addresses need 12 bytes"),
            (v2(b"\0" * 12, family=0x21), "AF_INET6 addresses need 36 bytes"),
            (v2(b"\0" * 108, family=0x31), "AF_UNIX addresses need 216 bytes"),
        ],
    )
    def test_bad_headers(self, data: bytes, why: str) -> None:
        with pytest.raises(BadHeader, match=why):
            parse_header(data)

    def test_bad_bytes_are_refused_as_soon_as_they_arrive(self) -> None:
        for early in (V2_SIGNATURE + b"\x11", V2_SIGNATURE + b"\x22", V2_SIGNATURE + b"\x21\x41", b"\r\n\r\n\x01"):
            with pytest.raises(BadHeader):
                parse_header(early)

    def test_an_oversize_block_is_refused_from_the_fixed_part_alone(self) -> None:
        with pytest.raises(BadHeader, match=f"more than the {V2_MAX_LENGTH} allowed"):
            parse_header(v2(b"", family=0x11)[:14] + (V2_MAX_LENGTH + 1).to_bytes(2, "big"))


class TestEitherVersion:
    @pytest.mark.parametrize(("header", "source"), VALID)
    def test_every_prefix_needs_more_and_the_whole_is_parsed(self, header: bytes, source) -> None:
        for end in range(len(header)):
            assert parse_header(header[:end]) is None, header[:end]
        parsed = parse_header(header + b"after")
        assert parsed is not None and parsed.length == len(header) and parsed.source == source

    @pytest.mark.parametrize(
        "data", [b"G", b"GET / HTTP/1.1\r\n\r\n", b"PROXZ", b"proxy TCP4", b"\x16\x03\x01\x02\x00", b"\x00", b" PROXY"]
    )
    def test_anything_else_is_refused_from_its_first_bytes(self, data: bytes) -> None:
        with pytest.raises(BadHeader):
            parse_header(data)

    def test_networks(self) -> None:
        assert parse_networks("10.0.0.0/8, ::1,192.0.2.7") == (
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("::1/128"),
            ipaddress.ip_network("192.0.2.7/32"),
        )
        for bad in ("10.0.0.1/8", "nonsense", "10.0.0.0/8,", "10.0.0.0/33"):
            with pytest.raises(ValueError, match=r"is not a network such as 10\.0\.0\.0/8"):
                parse_networks(bad)


class TestFuzz:
    @staticmethod
    def check(data: bytes) -> None:
        """The parser's whole contract: None, a header no longer than the data, or BadHeader."""
        try:
            parsed = parse_header(data)
        except BadHeader:
            return
        assert parsed is None or 0 < parsed.length <= len(data)

    @given(st.binary(max_size=300))
    @settings(max_examples=2000, deadline=None)
    def test_any_bytes(self, data: bytes) -> None:
        self.check(data)

    @given(
        st.sampled_from([header for header, _ in VALID]),
        st.lists(st.tuples(st.integers(min_value=0, max_value=300), st.integers(0, 255)), max_size=4),
        st.integers(min_value=0, max_value=300),
    )
    @settings(max_examples=3000, deadline=None)
    def test_mutated_headers(self, header: bytes, changes: list[tuple[int, int]], cut: int) -> None:
        data = bytearray(header + b"app bytes")
        for index, value in changes:
            data[index % len(data)] = value
        self.check(bytes(data[:cut]))
        self.check(bytes(data))

    @given(
        st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
        st.integers(0, 65535),
        st.integers(0, 65535),
        st.booleans(),
    )
    @settings(max_examples=500, deadline=None)
    def test_addresses_round_trip(self, address, source_port: int, destination_port: int, binary: bool) -> None:
        text = str(address)
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        spelled = socket.inet_ntop(family, address.packed)  # as getpeername() spells it
        if binary:
            data = v2_inet(text, text, (source_port, destination_port))
        else:
            data = v1("TCP4" if address.version == 4 else "TCP6", text, text, (source_port, destination_port))
        parsed = parse_header(data)
        assert parsed is not None and parsed.length == len(data)
        extra = () if address.version == 4 else (0, 0)
        assert parsed.source == (spelled, source_port, *extra)
        assert parsed.destination == (spelled, destination_port, *extra)


# -- the layer, over real sockets ----------------------------------------------------------------


@contextlib.contextmanager
def proxied(backend_name: str, app=ReplyPeername, **options):
    """A server whose app sits behind the PROXY layer: (server, layer factory)."""
    loop = EventLoop(backend_name)
    factory = ProxyLayerFactory(app, loop, **options)
    with serving(backend_name, factory, loop=loop) as server:
        yield server, factory


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1000)
        assert chunk, f"EOF after {line!r}"
        line += chunk
    return line


def closed_by_server(sock: socket.socket) -> bool:
    """The server closed without a byte of reply (EOF, or a reset if it had unread bytes)."""
    try:
        return recv_until_eof(sock) == b""
    except ConnectionResetError:
        return True


#: every transport a Recorder was handed, for the test to inspect
RECORDED: list = []


class Recorder(Protocol):
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        RECORDED.append(transport)


class TestLayer:
    def test_v1_header_and_data_in_one_send(self, backend_name: str) -> None:
        with proxied(backend_name) as (server, _), connect(server.address) as sock:
            sock.sendall(v1() + b"who am I?")
            assert read_line(sock) == b"203.0.113.7 40000 198.51.100.1 5001\n"
            sock.sendall(b"again")  # the layer is gone: the app answers directly
            assert read_line(sock) == b"203.0.113.7 40000 198.51.100.1 5001\n"

    def test_v2_tcp6_header_then_data_later(self, backend_name: str) -> None:
        with proxied(backend_name) as (server, _), connect(server.address) as sock:
            sock.sendall(v2_inet("2001:db8::7", "2001:db8::1", (40000, 443)))
            time.sleep(0.05)
            sock.sendall(b"hi")
            assert read_line(sock) == b"2001:db8::7 40000 2001:db8::1 443\n"

    def test_header_in_one_byte_chunks(self, backend_name: str) -> None:
        with proxied(backend_name) as (server, _), connect(server.address) as sock:
            for byte in v2_inet("192.0.2.9", "192.0.2.1", (1234, 80)):
                sock.send(bytes([byte]))
                time.sleep(0.002)  # each byte its own segment, and most their own recv()
            sock.sendall(b"x")
            assert read_line(sock) == b"192.0.2.9 1234 192.0.2.1 80\n"

    @pytest.mark.parametrize("header", [v2(b"", command=0, family=0), b"PROXY UNKNOWN\r\n"], ids=["LOCAL", "UNKNOWN"])
    def test_local_and_unknown_keep_the_real_addresses(self, backend_name: str, header: bytes) -> None:
        with proxied(backend_name) as (server, _), connect(server.address) as sock:
            sock.sendall(header + b"x")
            client_port, server_port = sock.getsockname()[1], server.address[1]
            assert read_line(sock) == f"127.0.0.1 {client_port} 127.0.0.1 {server_port}\n".encode()

    def test_the_app_gets_the_bytes_after_the_header_then_the_connection_itself(self, backend_name: str) -> None:
        with proxied(backend_name, Echo) as (server, _), connect(server.address) as sock:
            sock.sendall(v1() + b"first")
            assert recv_exactly(sock, 5) == b"first"
            protocols = in_loop(server, lambda: [type(conn.get_protocol()) for conn in server.connections])
            assert protocols == [Echo]  # the layer stepped aside
            sock.sendall(b"second")
            assert recv_exactly(sock, 6) == b"second"

    def test_a_mebibyte_echoed_through_the_apps_transport(self, backend_name: str) -> None:
        payload = os.urandom(1 << 20)
        with proxied(backend_name, Echo) as (server, _):
            assert exchange(server.address, v2_inet("192.0.2.9", "192.0.2.1") + payload, len(payload)) == payload

    def test_the_apps_transport(self, backend_name: str) -> None:
        RECORDED.clear()
        with proxied(backend_name, Recorder) as (server, _), connect(server.address) as sock:
            sock.sendall(v2_inet("192.0.2.9", "192.0.2.1", (1234, 80)))
            wait_until(lambda: RECORDED)
            transport = RECORDED[0]
            assert transport.get_extra_info("peername") == ("192.0.2.9", 1234)
            assert transport.get_extra_info("sockname") == ("192.0.2.1", 80)
            assert transport.get_extra_info("proxy_header").version == 2
            # The socket is still the real one: its peer is the balancer.
            assert transport.get_extra_info("socket").getpeername() == sock.getsockname()
            assert transport.get_extra_info("nonsense", 7) == 7
            in_loop(server, lambda: transport.write(b"through the layer"))
            assert recv_exactly(sock, 17) == b"through the layer"
            in_loop(server, transport.close)
            assert recv_until_eof(sock) == b""

    def test_bad_headers_close_with_one_log_line_per_episode(self, backend_name: str, caplog) -> None:
        caplog.set_level(logging.INFO, logger="pollserve")
        with proxied(backend_name) as (server, factory):
            for garbage in (b"GET / HTTP/1.1\r\n\r\n", b"PROXY TCP4 1.2.3.4\n", v2(b"", family=0x41), b"\x16\x03"):
                with connect(server.address) as sock:
                    sock.sendall(garbage)
                    assert closed_by_server(sock), garbage
            wait_until(lambda: factory.headers_rejected == 4)
            assert server.connections_accepted == 4
        warnings = [r.getMessage() for r in caplog.records if "bad or missing PROXY header" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert "from 127.0.0.1:" in warnings[0] and "neither a PROXY v1 line nor a v2 signature" in warnings[0]

    def test_a_header_ended_by_eof_is_counted_and_an_empty_connection_is_not(self, backend_name: str) -> None:
        with proxied(backend_name) as (server, factory):
            with connect(server.address) as sock:
                sock.sendall(b"PROXY TCP4 1.2")
                sock.shutdown(socket.SHUT_WR)
                assert recv_until_eof(sock) == b""
            with connect(server.address):
                pass
            wait_until(lambda: server.connections_closed == 2)
            assert factory.headers_rejected == 1

    def test_a_slow_header_is_cut_off(self, backend_name: str, caplog) -> None:
        caplog.set_level(logging.INFO, logger="pollserve")
        with proxied(backend_name, timeout=0.3) as (server, factory):
            started = time.monotonic()
            with connect(server.address) as trickling, connect(server.address) as silent:
                trickling.sendall(b"PROXY TCP4 ")
                time.sleep(0.1)
                trickling.sendall(b"19")
                assert closed_by_server(trickling) and closed_by_server(silent)
            assert 0.3 <= time.monotonic() - started < 5
            wait_until(lambda: factory.headers_rejected == 2)
        assert any("not complete within 0.3 s (" in r.getMessage() for r in caplog.records)

    @pytest.mark.parametrize(
        "header",
        [
            v2(b"", family=0x11)[:14] + (V2_MAX_LENGTH + 1).to_bytes(2, "big"),
            b"PROXY UNKNOWN " + b"f" * 200,
        ],
        ids=["v2", "v1"],
    )
    def test_an_oversize_header_is_refused_without_waiting(self, backend_name: str, header: bytes) -> None:
        with proxied(backend_name, timeout=30) as (server, factory), connect(server.address) as sock:
            started = time.monotonic()
            sock.sendall(header)
            assert closed_by_server(sock)
            assert time.monotonic() - started < 5  # not the 30 s timeout
            assert factory.headers_rejected == 1

    def test_proxy_from_refuses_other_peers(self, backend_name: str, caplog) -> None:
        with proxied(backend_name, allowed=parse_networks("10.0.0.0/8,::1")) as (server, factory):
            with connect(server.address) as sock:
                sock.sendall(v1() + b"x")
                assert closed_by_server(sock)
            assert factory.peers_refused == 1 and factory.headers_rejected == 0
        assert any("127.0.0.1" in r.getMessage() and "may not send" in r.getMessage() for r in caplog.records)
        with proxied(backend_name, allowed=parse_networks("127.0.0.0/8")) as (server, factory):
            with connect(server.address) as sock:
                sock.sendall(v1() + b"x")
                assert read_line(sock).startswith(b"203.0.113.7 40000 ")
            assert factory.peers_refused == 0

    def test_an_app_that_is_not_a_protocol_is_still_refused_by_the_server(self, backend_name: str) -> None:
        with proxied(backend_name, lambda: 42) as (server, _), connect(server.address) as sock:
            assert closed_by_server(sock)
            wait_until(lambda: server.connections_refused == 1)


# -- /healthz -----------------------------------------------------------------------------------------


class Written:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += bytes(data)

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("draining", "status", "body"), [(False, 200, b"ok\n"), (True, 503, b"draining\n")])
def test_healthz_route(draining: bool, status: int, body: bytes) -> None:
    health = Health()
    health.draining = draining
    endpoint = HTTPEndpoint({"/healthz": health.route})
    transport = Written()
    endpoint.connection_made(transport)
    endpoint.data_received(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.data.startswith(f"HTTP/1.1 {status} ".encode()) and transport.data.endswith(b"\r\n\r\n" + body)


# -- the command ----------------------------------------------------------------------------------------


def one_line(result, status: int) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


class TestOptions:
    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--proxy-from", "10.0.0.0/8"], "--proxy-from needs --proxy-protocol"),
            (["--proxy-protocol", "--proxy-from", "10.0.0.1/8"], "--proxy-from: '10.0.0.1/8' is not a network"),
            (["--proxy-protocol", "--proxy-from", "nonsense"], "--proxy-from: 'nonsense' is not a network"),
            (["--proxy-protocol", "--proxy-from", "10.0.0.0/8,"], "--proxy-from: '' is not a network"),
            (["--drain-delay", "nan"], "--drain-delay needs a non-negative number of seconds"),
            (["--drain-delay", "-1"], "--drain-delay needs a non-negative number of seconds"),
            (["--drain-delay", "inf"], "--drain-delay needs a non-negative number of seconds"),
        ],
    )
    def test_bad_values_are_one_line_exit_2(self, args: list[str], message: str) -> None:
        line = one_line(run_pollserve("--port", "0", *args), 2)
        assert line.startswith(f"pollserve: {message}"), line

    def test_they_are_server_options(self) -> None:
        line = one_line(run_pollserve("--proxy-protocol", "--drain-delay", "1", "backends"), 2)
        assert line == "pollserve: --proxy-protocol, --drain-delay apply to the server, not to 'pollserve backends'"


class TestEndToEnd:
    def test_proxy_protocol(self, start_server) -> None:
        server = start_server(
            "--proxy-protocol",
            "--proxy-from",
            "127.0.0.0/8,::1",
            "--app",
            "sample_apps:ReplyPeername",
            env={"PYTHONPATH": TESTS_DIR},
        )
        server.wait_for_log(r"PROXY protocol: every app connection must start with a v1 or v2 header, from 127\.0")
        with connect(server.address) as sock:
            sock.sendall(v2_inet("198.51.100.20", "192.0.2.1", (55555, 443)) + b"hi")
            assert read_line(sock) == b"198.51.100.20 55555 192.0.2.1 443\n"
        with connect(server.address) as sock:
            sock.sendall(b"hi")
            assert closed_by_server(sock)
        server.wait_for_log(r"WARNING app: connections closed for a bad or missing PROXY header: from 127\.0\.0\.1:")
        if POSIX:
            server.signal(signal.SIGTERM)
            assert server.wait() == 0
            assert "1 connections closed for a bad or missing header, 0 from peers outside --proxy-from" in server.log

    def test_proxy_from_outsiders_are_closed(self, start_server) -> None:
        server = start_server("--proxy-protocol", "--proxy-from", "10.0.0.0/8")
        with connect(server.address) as sock:
            sock.sendall(v1() + b"hi")
            assert closed_by_server(sock)
        server.wait_for_log(r"connections closed from peers outside --proxy-from: 127\.0\.0\.1:\d+ may not send")

    def test_debug_log_says_the_layer_refused_them(self, start_server) -> None:
        """The app never saw these connections: not "closed by the app"."""
        server = start_server("--log-level", "debug", "--proxy-protocol", "--proxy-from", "10.0.0.0/8")
        with connect(server.address) as sock:
            assert closed_by_server(sock)
        server.wait_for_log(r"DEBUG app: closed .*: refused by the PROXY layer: the peer is outside --proxy-from$")
        inside = start_server("--log-level", "debug", "--proxy-protocol", "--proxy-from", "127.0.0.0/8,::1")
        with connect(inside.address) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert closed_by_server(sock)
        inside.wait_for_log(r"DEBUG app: closed .*: refused by the PROXY layer: bad PROXY header: ")
        assert "closed by the app" not in server.log + inside.log

    def test_without_the_option_a_header_is_just_bytes(self, start_server) -> None:
        server = start_server("--app", "echo")
        with connect(server.address) as sock:
            sock.sendall(v1())
            assert recv_exactly(sock, len(v1())) == v1()


def head(address: tuple[str, int], path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("HEAD", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def healthz(address: tuple[str, int]) -> int:
    return http_get(address, "/healthz")[0]


@pytest.mark.skipif(not POSIX, reason="signals are POSIX")
class TestDrain:
    def test_healthz_while_serving(self, start_server) -> None:
        server = start_server("--stats-port", "0")
        address = stats_address(server)
        assert http_get(address, "/healthz") == (200, "text/plain; charset=utf-8", b"ok\n")
        assert head(address, "/healthz") == (200, b"")

    def test_drain_delay_answers_503_and_keeps_serving_then_stops(self, start_server) -> None:
        server = start_server("--stats-port", "0", "--drain-delay", "1.5")
        address = stats_address(server)
        held = connect(server.address)  # a client of before the signal, served throughout
        try:
            server.signal(signal.SIGTERM)
            signalled = time.monotonic()
            wait_for(lambda: healthz(address) == 503, timeout=1, what="/healthz 503")
            assert http_get(address, "/healthz")[2] == b"draining\n"
            # Still accepting: a balancer's clients that arrive before it notices are served.
            assert request_rounds(server.address, 3, 2, b"hi", HELLO) == 6
            held.sendall(b"hi")
            assert recv_exactly(held, len(HELLO)) == HELLO
            assert get_stats(address)["connections_accepted"] == 4
            assert server.alive()
            assert recv_until_eof(held) == b""  # closed once the delay is over and the shutdown starts
            assert time.monotonic() - signalled >= 1.4  # the delay, give or take the signal's delivery
        finally:
            held.close()
        assert server.wait() == 0
        draining = server.wait_for_log(r"SIGTERM: draining: /healthz answers 503; still accepting for 1\.5 s")
        flushing = server.wait_for_log(r"SIGTERM: no longer accepting; flushing 1 connections")
        assert server.lines.index(draining.string) < server.lines.index(flushing.string)

    def test_the_stats_endpoint_stays_up_while_connections_flush(self, start_server) -> None:
        server = start_server("--stats-port", "0", "--app", "sample_apps:BigReply", env={"PYTHONPATH": TESTS_DIR})
        address = stats_address(server)
        with connect(server.address) as sock:
            sock.sendall(b"go")
            assert sock.recv(1)  # most of the reply waits in the server's buffer: the shutdown must flush it
            server.signal(signal.SIGTERM)
            server.wait_for_log(r"SIGTERM: no longer accepting; flushing 1 connections")
            assert healthz(address) == 503
            assert len(recv_until_eof(sock)) == BIG_REPLY_SIZE - 1
        assert server.wait() == 0

    def test_a_second_signal_during_the_delay_closes_now(self, start_server) -> None:
        server = start_server("--stats-port", "0", "--drain-delay", "60")
        server.signal(signal.SIGTERM)
        server.wait_for_log(r"SIGTERM: draining")
        server.signal(signal.SIGINT)
        started = time.monotonic()
        assert server.wait() == 0
        assert time.monotonic() - started < 10
        assert "SIGINT again: closing now" in server.log
